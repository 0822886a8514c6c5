#!/bin/sh
# Prints "PARTICLE-CHECK key=value" lines on the console, then powers off.
say() { echo "PARTICLE-CHECK $*"; }
efivar() { # last byte of an EFI global variable (1/0), or "missing"
    f=/sys/firmware/efi/efivars/$1-8be4df61-93ca-11d2-aa0d-00e098032b8c
    if [ -r "$f" ]; then od -An -tu1 -j4 -N1 "$f" | tr -d ' '; else echo missing; fi
}
state=$(systemctl is-system-running --wait)
say "system-state=$state"
. /usr/lib/os-release
say "image-version=$IMAGE_VERSION"
say "secure-boot=$(efivar SecureBoot)"
say "setup-mode=$(efivar SetupMode)"
say "bootctl-secure-boot=$(bootctl status 2>/dev/null | sed -n 's/^ *Secure Boot: *//p' | head -n1)"
say "lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)"
say "require-signatures=$(cat /sys/module/dm_verity/parameters/require_signatures 2>/dev/null)"
say "platform-certs=$(dmesg | sed -n "s/.*integrity: Loaded X.509 cert '\(.*\)'.*/\1/p" | paste -sd'|')"
say "usr-source=$(findmnt -no SOURCE /usr)"
dev=$(basename "$(readlink -f "$(findmnt -no SOURCE /usr)")")
say "usr-dm-uuid=$(cat /sys/block/$dev/dm/uuid 2>/dev/null)"
if dmsetup table usr 2>/dev/null | grep -q root_hash_sig_key_desc; then
    say "usr-table-signed=yes"
else
    say "usr-table-signed=no"
fi
if touch /usr/particle-write-test 2>/dev/null; then say "usr-write=allowed"; else say "usr-write=refused"; fi
say "verity-cert=$(ls /usr/lib/verity.d/ 2>/dev/null | paste -sd'|')"
say "private-keys=$(grep -rlE 'PRIVATE KEY|PGP PRIVATE' /usr/lib/verity.d /usr/lib/systemd/import-pubring.gpg 2>/dev/null | wc -l)"

# Offer the slot-A /usr partitions to the kernel again under a new name, three ways.
rh=$(sed -n 's/.*usrhash=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
uuid() { echo "$1" | sed 's/^\(.\{8\}\)\(.\{4\}\)\(.\{4\}\)\(.\{4\}\)\(.\{12\}\)$/\1-\2-\3-\4-\5/'; }
data=/dev/disk/by-partuuid/$(uuid "$(echo "$rh" | cut -c1-32)")
hash=/dev/disk/by-partuuid/$(uuid "$(echo "$rh" | cut -c33-64)")
# libcryptsetup will not open partitions that the running /usr already holds, so the probes go
# through linear device-mapper copies of them (the kernel shares the partitions between maps).
sectors() { echo $(( $(blockdev --getsize64 "$1") / 512 )); }
dmsetup create probe-data --readonly --table "0 $(sectors "$data") linear $data 0"
dmsetup create probe-hash --readonly --table "0 $(sectors "$hash") linear $hash 0"
V=/usr/lib/systemd/systemd-veritysetup
attach() { # NAME [OPTIONS]: "accepted" or "refused: <the reason given>"
    if err=$($V attach "$1" /dev/mapper/probe-data /dev/mapper/probe-hash "$rh" ${2:+"$2"} 2>&1); then
        $V detach "$1" >/dev/null 2>&1
        echo accepted
    else
        echo "refused: $(echo "$err" | tail -n1)"
    fi
}
mkdir -p /run/particle-check
say "attach-unsigned=$(attach probe-unsigned)"
foreign=${CREDENTIALS_DIRECTORY:-/nonexistent}/particle.foreign-sig
if [ -s "$foreign" ]; then
    say "attach-foreign=$(attach probe-foreign root-hash-signature=$foreign)"
else
    say "attach-foreign=no-credential"
fi
sigpart=$(lsblk -nrpo PATH,PARTTYPE,PARTLABEL | awk -v l="${IMAGE_ID}_${IMAGE_VERSION}" \
    '$2 == "e7bb33fb-06cf-4e81-8273-e543b413e2e2" && $3 == l { print $1 }')
say "sig-partition=${sigpart:-none}"
if [ -n "$sigpart" ]; then
    python3 - "$sigpart" "$rh" <<'PY'
import base64, json, sys
raw = open(sys.argv[1], "rb").read().rstrip(b"\0")
doc = json.loads(raw)
print("PARTICLE-CHECK sig-json-roothash=" + ("match" if doc["rootHash"] == sys.argv[2] else "differs"))
open("/run/particle-check/partition.sig", "wb").write(base64.b64decode(doc["signature"]))
PY
    say "attach-partition-sig=$(attach probe-signed root-hash-signature=/run/particle-check/partition.sig)"
fi
# Updates: the image's own transfer files (Verify=yes), pointed at one test directory per case.
if [ -d /usr/lib/sysupdate.d ]; then
    say "verify-setting=$(sed -n 's/^Verify=//p' /usr/lib/sysupdate.d/*.transfer | sort -u | paste -sd'|')"
    say "pubring-fingerprints=$(gpg --homedir /run/particle-check --batch --quiet --with-colons \
        --show-keys /usr/lib/systemd/import-pubring.gpg 2>/dev/null | awk -F: '$1 == "fpr" {print $10}' | paste -sd'|')"
    /usr/lib/systemd/systemd-networkd-wait-online --timeout=120 >/dev/null 2>&1
    SU=/usr/lib/systemd/systemd-sysupdate
    for case in good unsigned foreign badhash downgrade; do
        d=/run/particle-check/sysupdate-$case
        mkdir -p "$d"
        for f in /usr/lib/sysupdate.d/*.transfer; do
            sed "s|^Path=http://10.0.2.100/|Path=http://10.0.2.100/$case/|" "$f" > "$d/${f##*/}"
        done
        if [ "$case" = good ]; then verb=check-new; else verb=update; fi
        out=$($SU --definitions="$d" $verb 2>&1); rc=$?
        echo "$out" | sed "s/^/PARTICLE-LOG $case: /"
        say "update-$case=rc=$rc $(echo "$out" | grep -v '^$' | tail -n1)"
    done
    say "usr-labels-after=$(lsblk -nro PARTTYPE,PARTLABEL | awk '$1 == "8484680c-9521-48c6-9c11-b0720656f69e" {print $2}' | paste -sd'|')"
    say "ukis-after=$(ls /efi/EFI/Linux /boot/EFI/Linux 2>/dev/null | grep '\.efi$' | paste -sd'|')"
    # Asking for the older version by name (only root can): recorded, see the test.
    out=$($SU --definitions=/run/particle-check/sysupdate-downgrade update 0.9 2>&1); rc=$?
    echo "$out" | sed "s/^/PARTICLE-LOG downgrade-explicit: /"
    say "update-downgrade-explicit=rc=$rc $(echo "$out" | grep -v '^$' | tail -n1)"
    say "default-entry=$(bootctl list --json=short 2>/dev/null | python3 -c 'import json, sys
print(next((e["id"] for e in json.load(sys.stdin) if e.get("isDefault")), "none"))')"
fi
say "done"
systemctl poweroff
