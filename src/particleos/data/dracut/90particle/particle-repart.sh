#!/bin/sh
# Runs systemd-repart in the initrd on the disk the firmware booted from: the one whose ESP
# has the UUID systemd-boot put in LoaderDevicePartUUID. Without a device, repart takes the
# disk behind /sysusr/usr; with a copy of the same version on a second disk (`particle
# install`), /usr may come from either disk (same PARTUUIDs by design: usrhash= names them),
# and root would then be grown, created or factory-reset on the wrong one.
set -u
EFIVARS=/sys/firmware/efi/efivars
var="$EFIVARS/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
disk=""
if [ -r "$var" ]; then
    # efivarfs files cannot seek: read them through a pipe.
    uuid=$(cat "$var" 2>/dev/null | tail -c +5 | tr -d '\000' | tr 'A-F' 'a-f')
    link="/dev/disk/by-partuuid/$uuid"
    n=0
    while [ -n "$uuid" ] && [ ! -e "$link" ] && [ "$n" -lt 30 ]; do
        sleep 1
        n=$((n + 1))
    done
    if [ -e "$link" ]; then
        part=$(basename "$(readlink -f "$link")")
        parent=$(basename "$(readlink -f "/sys/class/block/$part/..")")
        [ -b "/dev/$parent" ] && disk="/dev/$parent"
    fi
fi
status=0
if [ -n "$disk" ]; then
    echo "particle: systemd-repart on $disk (the disk of the booted ESP)" > /dev/kmsg || true
    systemd-repart --dry-run=no "$disk" || status=$?
else
    systemd-repart --dry-run=no || status=$?
fi
# udev's view of the disk is stale now. /dev/gpt-auto-root is made from the disk's record of its
# root partition's UUID (ID_PART_GPT_AUTO_ROOT_UUID, read when the disk last had an event), and a
# factory reset gives root a new UUID at the same place: the kernel sees no change, and the
# first event on the partition (the file system check closing it) removed the link, the device
# went away and took the mount of /sysroot with it (emergency mode, seen on CI). A root repart
# created (the first boot of an installed copy, an encrypted root) gets no link at all until
# the disk is read again. So: the disk first, then its partitions, each waited for; root is
# checked and mounted only after this (after-repart.conf). udev's own re-read after repart
# closes the disk is switched off in the initrd: it removes and re-adds every partition
# (initrd-nowatch.rules).
if [ -n "$disk" ]; then
    name=${disk#/dev/}
    udevadm trigger --settle --action=change "$disk" || true
    parts=""
    for p in /sys/class/block/"$name"/"$name"*; do
        [ -e "$p/partition" ] && parts="$parts /dev/${p##*/}"
    done
    # shellcheck disable=SC2086 # one argument per partition
    [ -n "$parts" ] && { udevadm trigger --settle --action=change $parts || true; }
fi
udevadm settle --timeout=60 || true
exit "$status"
