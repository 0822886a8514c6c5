#!/bin/sh
# Runs in the initrd with the new root at $1 and its verity-checked /usr mounted (and, from
# the image's /usr, before `particle shell`/`particle run` start a container of it).
# First boot: /etc and /var come from the factory copy. Every boot: the new root's own
# `particleos.machine.etcmerge` (Python from /usr, run in a chroot) keeps /etc in step with
# the running version: a three-way merge at the first boot of a new version, the /etc a
# version last had when it boots again (rollback), nothing otherwise.
set -eu
root="$1"
kmsg="${PARTICLE_KMSG:-/dev/kmsg}"  # `particle shell` (a container on the host) sets /dev/null
factory="$root/usr/share/factory"
stamp="$root/etc/.particle-factory"
if [ ! -e "$stamp" ]; then
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
    sync
    echo "particle: populated /etc and /var from the factory copy" > "$kmsg" || true
fi
# --- /etc across updates (etcmerge) ---
if [ -e "$root/usr/lib/particleos/particleos/machine/etcmerge.py" ] && [ -x "$root/usr/bin/python3" ]; then
    # On the first boot the root has no /lib64 link yet (PID 1 makes it at switch-root):
    # start Python through the dynamic loader in /usr.
    ld=""
    for l in /usr/lib64/ld-linux-x86-64.so.2 /usr/lib/ld-linux-aarch64.so.1; do
        if [ -e "$root$l" ]; then ld="$l"; break; fi
    done
    out=$(PYTHONPATH=/usr/lib/particleos PYTHONDONTWRITEBYTECODE=1 \
          chroot "$root" $ld /usr/bin/python3 -m particleos.machine.etcmerge boot / 2>&1) || true
    echo "$out" | while IFS= read -r line; do
        echo "$line" > "$kmsg" || true
        echo "$line"
    done
fi
