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
# A partition repart created (factory reset, the first boot of an installed copy) makes the
# kernel re-read the table; the uevents it raises must be handled before root and /usr are
# mounted (sysroot.mount is ordered after this service). Handled later, they unmounted
# /sysroot/usr under particle-etc in two of four full test runs: emergency mode.
udevadm settle --timeout=60 || true
exit "$status"
