#!/bin/bash
# ParticleOS initrd module: fills an empty root file system from the factory copy in /usr
# before the switch to it, so that PID 1 already sees a complete /etc on the first boot; and
# makes every failure of a trial boot (a boot-counted entry) end in a reboot (particle-trial).

check() {
    return 0
}

depends() {
    echo systemd
    return 0
}

install() {
    inst_multiple cp mkdir cat rm ln mv sh tail head tr wc sleep grep mount modprobe chattr
    # /etc across updates: the merge runs the new root's Python in a chroot (etcmerge).
    inst_multiple chroot sync
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
}
