#!/bin/bash
# ParticleOS initrd module: fills an empty root file system from the factory copy in /usr
# before the switch to it, so that PID 1 already sees a complete /etc on the first boot.

check() {
    return 0
}

depends() {
    echo systemd
    return 0
}

install() {
    inst_multiple cp mkdir cat rm ln mv sh
    # /etc across updates: the merge runs the new root's Python in a chroot (etcmerge).
    inst_multiple chroot sync
    inst_script "$moddir/particle-etc.sh" /usr/lib/particle/particle-etc
    inst_simple "$moddir/particle-etc.service" "$systemdsystemunitdir/particle-etc.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target particle-etc.service
}
