#!/bin/bash
# Drives `particle ext` and `particle overlay` on the guest and prints "PARTICLE-CHECK k=v"
# lines: first boot adds extensions live, second boot checks they survived, then removes one.
say() { echo "PARTICLE-CHECK $*"; }
one() { tr '\n' ' ' | tr -s ' ' | cut -c1-400; }
state=$(systemctl is-system-running --wait)
say "system-state=$state"
. /usr/lib/os-release
say "image-version=$IMAGE_VERSION"
say "sysext-level=$SYSEXT_LEVEL"
mkdir -p /mnt/exts
mount -o ro /dev/vdb /mnt/exts && say "exts-mounted=yes" || say "exts-mounted=no"
mkdir -p /var/lib/particle-check
echo boot >> /var/lib/particle-check/boots
boots=$(wc -l < /var/lib/particle-check/boots)
say "boot-count=$boots"
hello() {
    printf '#include <stdio.h>\nint main(void) { puts("hello from gcc"); return 0; }\n' > /tmp/h.c
    gcc -O2 -o /tmp/h /tmp/h.c 2>&1 | one && /tmp/h
}
modtest() {
    modprobe dkms_test 2>&1 | one
    grep -q '^dkms_test ' /proc/modules && echo loaded || echo missing
}
if [ "$boots" -eq 1 ]; then
    say "base-gcc=$(command -v gcc || echo missing)"
    say "base-make=$(command -v make || echo missing)"
    say "sysext-enabled=$(systemctl is-enabled systemd-sysext.service)"
    say "sync-enabled=$(systemctl is-enabled particle-ext-sync.service)"
    start=$(date +%s%N)
    out=$(particle ext add devtools 2>&1); rc=$?
    end=$(date +%s%N)
    say "add-devtools-rc=$rc"
    say "add-devtools-out=$(echo "$out" | one)"
    say "add-devtools-ms=$(( (end - start) / 1000000 ))"
    say "gcc-path=$(command -v gcc || echo missing)"
    say "gcc-run=$(hello)"
    printf 'all:\n\t@echo made-by-make\n' > /tmp/Makefile
    say "make-run=$(make -s -f /tmp/Makefile 2>&1 | one)"
    say "usr-fstype=$(stat -f -c %T /usr)"
    say "transfer=$(ls /etc/sysupdate.d/ 2>/dev/null | one)"
    say "verity-devices=$(grep -l CRYPT-VERITY /sys/block/dm-*/dm/uuid 2>/dev/null | wc -l)"
    # The transient overlay, then an extension added while it is active.
    out=$(particle overlay 2>&1); rc=$?
    say "overlay-rc=$rc"
    say "overlay-out=$(echo "$out" | one)"
    echo "written in the overlay" > /usr/particle-overlay-test 2>/dev/null \
        && say "overlay-write=ok" || say "overlay-write=refused"
    say "overlay-status=$(particle overlay status 2>&1 | one)"
    dk=$(ls /mnt/exts/*-dkmstest_*.raw)
    out=$(particle ext add "$dk" 2>&1); rc=$?
    say "add-dkms-rc=$rc"
    say "add-dkms-out=$(echo "$out" | one)"
    say "overlay-kept=$(cat /usr/particle-overlay-test 2>&1 | one)"
    say "modprobe=$(modtest)"
    say "dmesg-dkms=$(dmesg | grep -c 'DKMS Test Module')"
    # An extension built for another version of this base: particle refuses it...
    other=$(ls /mnt/exts/*-hello_*.raw)
    out=$(particle ext add "$other" 2>&1); rc=$?
    say "add-other-rc=$rc"
    say "add-other-out=$(echo "$out" | one)"
    # ... and so does systemd-sysext when it is put in place by hand.
    cp "$other" /var/lib/extensions/handmade.raw
    systemd-sysext refresh >/dev/null 2>&1
    say "handmade-merged=$(grep -c handmade /usr/.systemd-sysext/extensions 2>/dev/null)"
    say "hello-path=$(type -P hello || echo missing)"
    rm -f /var/lib/extensions/handmade.raw
    particle ext sync --refresh >/dev/null 2>&1
    say "list=$(particle ext list 2>&1 | one)"
    say "merged=$(cat /usr/.systemd-sysext/extensions 2>/dev/null | one)"
    sync
    say "done-first-boot"
    systemctl reboot
else
    say "overlay-after-reboot=$(particle overlay status 2>&1 | one)"
    say "overlay-file-after-reboot=$(test -e /usr/particle-overlay-test && echo present || echo gone)"
    say "sysext-state=$(systemctl is-active systemd-sysext.service)"
    say "merged-after-reboot=$(cat /usr/.systemd-sysext/extensions 2>/dev/null | one)"
    say "gcc-after-reboot=$(hello)"
    say "modprobe-after-reboot=$(modtest)"
    if touch /usr/particle-write-test 2>/dev/null; then say "usr-write=allowed"; else say "usr-write=refused"; fi
    out=$(particle ext remove devtools 2>&1); rc=$?
    say "remove-rc=$rc"
    say "remove-out=$(echo "$out" | one)"
    say "gcc-after-remove=$(command -v gcc || echo missing)"
    say "make-after-remove=$(command -v make || echo missing)"
    say "modprobe-still=$(grep -q '^dkms_test ' /proc/modules && echo loaded || echo missing)"
    out=$(particle ext remove nosuchext 2>&1); rc=$?
    say "remove-missing-rc=$rc remove-missing-out=$(echo "$out" | one)"
    say "list-after-remove=$(particle ext list 2>&1 | one)"
    say "done-second-boot"
    systemctl poweroff
fi
