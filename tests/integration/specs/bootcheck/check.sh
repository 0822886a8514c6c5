#!/bin/sh
# Prints "PARTICLE-CHECK key=value" lines on the console, then reboots once and powers off
# after the second boot, so one QEMU run proves both boot and persistence.
say() { echo "PARTICLE-CHECK $*"; }
state=$(systemctl is-system-running --wait)
say "system-state=$state"
say "multi-user=$(systemctl is-active multi-user.target)"
. /usr/lib/os-release
say "image-version=$IMAGE_VERSION"
say "image-id=$IMAGE_ID"
say "usr-source=$(findmnt -no SOURCE /usr)"
say "usr-fstype=$(findmnt -no FSTYPE /usr)"
case ",$(findmnt -no OPTIONS /usr)," in *,ro,*) say "usr-mount=ro" ;; *) say "usr-mount=rw" ;; esac
dev=$(basename "$(readlink -f "$(findmnt -no SOURCE /usr)")")
say "usr-dm-name=$(cat /sys/block/$dev/dm/name 2>/dev/null)"
say "usr-dm-uuid=$(cat /sys/block/$dev/dm/uuid 2>/dev/null)"
if touch /usr/particle-write-test 2>/dev/null; then say "usr-write=allowed"; else say "usr-write=refused"; fi
say "root-fstype=$(findmnt -no FSTYPE /)"
say "machine-id=$(cat /etc/machine-id)"
say "motd=$(head -n1 /etc/motd)"
say "admin-user=$(getent passwd admin | cut -d: -f1,7)"
say "serial-getty=$(systemctl is-active serial-getty@ttyS0.service)"
say "networkd=$(systemctl is-enabled systemd-networkd.service)"
mkdir -p /var/lib/particle-check
if echo boot >> /var/lib/particle-check/boots 2>/dev/null; then say "root-write=ok"; else say "root-write=failed"; fi
boots=$(wc -l < /var/lib/particle-check/boots)
say "boot-count=$boots"
if [ "$boots" -eq 1 ]; then
    echo "$state" > /var/lib/particle-check/first-boot-marker
    sync
    say "done-first-boot"
    systemctl reboot
else
    say "persisted=$(cat /var/lib/particle-check/first-boot-marker 2>/dev/null || echo missing)"
    say "done-second-boot"
    systemctl poweroff
fi
