#!/bin/bash
# ParticleOS initrd module: fills an empty root file system from the factory copy in /usr
# before the switch to it, so that PID 1 already sees a complete /etc on the first boot; and
# makes every failure of a trial boot (a boot-counted entry) end in a reboot (particle-trial).

check() {
    return 0
}

# An encrypted root (image.encrypt = "tpm2" puts libtss2 into the tree): systemd-repart creates
# it at the first boot and systemd-cryptsetup unlocks it with the TPM2 at every boot.
# (find, not a glob: dracut runs modules with globbing off.)
particle_tpm2() {
    [ -n "$(find /usr/lib -maxdepth 2 -name 'libtss2-esys.so.0' -print -quit 2>/dev/null)" ]
}

depends() {
    echo systemd
    # systemd-repart grows root to fill the disk, creates it when missing (encrypted or not),
    # and empties it on a factory reset (its definition lives in /usr/lib/repart.d of the
    # verity /usr). bookworm's images have no systemd-repart: there the root stays as built.
    if find_binary systemd-repart >/dev/null 2>&1; then
        echo systemd-repart
    fi
    if particle_tpm2; then
        echo systemd-cryptsetup
    fi
    return 0
}

installkernel() {
    # repart formats a new root through a loop device over its partition.
    hostonly='' instmods loop ext4
}

install() {
    inst_multiple cp mkdir cat rm ln mv sh tail head tr wc sleep grep mount modprobe chattr
    # /etc across updates: the merge runs the new root's Python in a chroot (etcmerge).
    inst_multiple chroot sync
    # Root created by systemd-repart (Format=ext4): after `particle install` or a factory reset.
    inst_multiple mkfs.ext4 mke2fs
    [ -e /etc/mke2fs.conf ] && inst_simple /etc/mke2fs.conf
    inst_simple "$moddir/after-repart.conf" \
        "$systemdsystemunitdir/sysroot.mount.d/50-particle-repart.conf"
    inst_simple "$moddir/after-repart.conf" \
        "$systemdsystemunitdir/systemd-fsck-root.service.d/50-particle-repart.conf"
    inst_simple "$moddir/initrd-nowatch.rules" "$udevrulesdir/61-particle-initrd-nowatch.rules"
    inst_multiple basename readlink udevadm
    inst_script "$moddir/particle-repart.sh" /usr/lib/particle/particle-repart
    inst_simple "$moddir/repart-loader-disk.conf" \
        "$systemdsystemunitdir/systemd-repart.service.d/50-particle-loader-disk.conf"
    inst_script "$moddir/particle-etc.sh" /usr/lib/particle/particle-etc
    inst_simple "$moddir/particle-etc.service" "$systemdsystemunitdir/particle-etc.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target particle-etc.service
    inst_script "$moddir/particle-trial.sh" /usr/lib/particle/particle-trial
    inst_simple "$moddir/particle-trial.service" "$systemdsystemunitdir/particle-trial.service"
    $SYSTEMCTL -q --root "$initdir" add-wants sysinit.target particle-trial.service
    inst_simple "$moddir/emergency-trial.conf" \
        "$systemdsystemunitdir/emergency.service.d/50-particle-trial.conf"
    inst_simple "$moddir/rescue-trial.conf" \
        "$systemdsystemunitdir/rescue.service.d/50-particle-trial.conf"
    if particle_tpm2; then
        inst_simple "$moddir/after-repart.conf" \
            "$systemdsystemunitdir/systemd-cryptsetup@root.service.d/50-particle-repart.conf"
        # systemd dlopens libtss2 (not seen by ldd-based resolution), cryptsetup's TPM2 token
        # plugin too (mkfs.ext4 for repart's Format= is installed above for every image).
        inst_libdir_file "libtss2-esys.so.*" "libtss2-rc.so.*" "libtss2-mu.so.*" \
            "libtss2-sys.so.*" "libtss2-tcti-device.so.*" "libtss2-tctildr.so.*" \
            "cryptsetup/libcryptsetup-token-systemd-tpm2.so"
    fi
}
