#!/bin/sh
# Runs in the initrd with the new root at $1 and its verity-checked /usr mounted.
# First boot: /etc and /var come from the factory copy. Later boots keep the machine's own
# /etc (the update merge is done by `particle` in the running system).
set -eu
root="$1"
factory="$root/usr/share/factory"
stamp="$root/etc/.particle-factory"
if [ -e "$stamp" ]; then
    exit 0
fi
mkdir -p "$root/etc" "$root/var"
cp -a --no-clobber "$factory/etc/." "$root/etc/"
if [ -d "$factory/var" ]; then
    cp -a --no-clobber "$factory/var/." "$root/var/"
fi
if [ -e "$root/usr/lib/os-release" ]; then
    cp "$root/usr/lib/os-release" "$stamp.tmp"
    mv "$stamp.tmp" "$stamp"
else
    : > "$stamp"
fi
echo "particle: populated /etc and /var from the factory copy" > /dev/kmsg || true
