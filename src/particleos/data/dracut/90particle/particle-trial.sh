#!/bin/sh
# ParticleOS trial boots: a boot of a version that systemd-boot still counts (the booted UKI has
# a +LEFT-DONE counter, so systemd-boot set LoaderBootCountPath) must end in a reboot whatever
# goes wrong, with no console interaction: the reboot spends one try, and after the last one
# systemd-boot boots the previous version. Blessed (known good) boots are left alone.
#
# One script for all of it:
#   particle-trial-generator DIR EARLY LATE  (real root: a systemd generator, via a symlink)
#   particle-trial initrd                    (initrd: record the boot, then its deadline)
#   particle-trial start                     (real root: record the switch, panic on oops)
#   particle-trial stop                      (real root, at shutdown: record why, if unblessed)
#   particle-trial fail WHAT [COMMAND...]    (emergency/rescue: record, then fail -> reboot;
#                                             on a blessed boot: run COMMAND, the usual shell)
# In the initrd the units are static (dracut module 90particle) and decide when they run: a
# generator there runs before efivarfs is mounted, so it cannot tell a counted boot.
#
# Records go into the EFI variable ParticleBootLog-$PARTICLE_GUID (one line each:
# BOOT ENTRY UPTIME EVENT DETAIL), which survives the reboot and is read by `particle status`.
set -u

LOADER_GUID=4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
PARTICLE_GUID=ead965b3-f7cd-4255-8a2d-8d4e823b83e5
EFIVARS=${PARTICLE_EFIVARS:-/sys/firmware/efi/efivars}
CMDLINE=${PARTICLE_CMDLINE:-/proc/cmdline}
INITRD_RELEASE=${PARTICLE_INITRD_RELEASE:-/etc/initrd-release}
SYSROOT=${PARTICLE_SYSROOT:-/sysroot}
RUN=${PARTICLE_RUN:-/run}
KMSG=${PARTICLE_KMSG:-/dev/kmsg}
SELF=/usr/lib/particle/particle-trial
LOG_VAR="$EFIVARS/ParticleBootLog-$PARTICLE_GUID"
MAX_BYTES=3072

# efivarfs: PID 1 of the initrd may not have mounted it yet.
ensure_efivars() {
    [ -z "${PARTICLE_EFIVARS:-}" ] && [ -d /sys/firmware/efi ] || return 0
    mounted "$EFIVARS" && return 0
    modprobe -q efivarfs 2>/dev/null
    mount -t efivarfs -o nosuid,nodev,noexec efivarfs "$EFIVARS" 2>/dev/null || true
}

# The booted entry's file name with its counter (e.g. ID_V+2-1.efi); empty on a blessed boot.
count_path() {
    f="$EFIVARS/LoaderBootCountPath-$LOADER_GUID"
    [ -r "$f" ] || return 0
    p=$(tail -c +5 "$f" 2>/dev/null | tr -d '\000')
    printf '%s\n' "${p##*\\}"
}

cmdline_arg() {
    for w in $(cat "$CMDLINE" 2>/dev/null); do
        case "$w" in "$1="*) printf '%s\n' "${w#*=}" ;; esac
    done
}

in_initrd() { [ -e "$INITRD_RELEASE" ]; }

mounted() {
    while read -r _ target _; do
        [ "$target" = "$1" ] && return 0
    done < /proc/self/mounts
    return 1
}

# Append one record (BOOT ENTRY UPTIME EVENT DETAIL) to the EFI variable and the kernel log.
record() {
    entry=$(count_path)
    [ -n "$entry" ] || return 0
    read -r boot < /proc/sys/kernel/random/boot_id || boot=unknown
    boot=${boot%%-*}
    read -r up _ < /proc/uptime || up=0
    event=$1
    shift
    detail=$(printf '%s' "$*" | tr -c '[:print:]' ' ' | tr -s ' ' | head -c 160)
    line="$boot $entry ${up%%.*} $event ${detail:--}"
    echo "particle-trial: $line" > "$KMSG" 2>/dev/null || true
    echo "particle-trial: $line"
    tmp="$RUN/particle-trial.$$"
    if [ -e "$LOG_VAR" ] && [ "$(wc -c < "$LOG_VAR")" -lt "$MAX_BYTES" ]; then
        # EFI_VARIABLE_APPEND_WRITE | NV | BS | RT: attributes and data in one write.
        { printf '\107\000\000\000'; printf '%s\n' "$line"; } > "$tmp"
    else
        # New, or full: rewrite with the last records kept.
        { printf '\007\000\000\000'
          if [ -e "$LOG_VAR" ]; then tail -c +5 "$LOG_VAR" | tail -n 12; fi
          printf '%s\n' "$line"; } > "$tmp"
    fi
    cat "$tmp" >> "$LOG_VAR" || echo "particle-trial: cannot write $LOG_VAR" >&2
    rm -f "$tmp"
}

generate() {
    out=$1
    entry=$(count_path)
    [ -n "$entry" ] || exit 0                  # blessed boot: normal behaviour
    timeout=$(cmdline_arg particle.trial_timeout)
    [ -n "$timeout" ] || exit 0                # [boot] on_failure = "none"
    # `particle update --soft` masks systemd-bless-boot for a boot the loader did not count.
    [ "$(readlink /run/systemd/system/systemd-bless-boot.service 2>/dev/null)" = /dev/null ] && exit 0
    in_initrd && exit 0                        # the initrd has static units (see above)
    deadline_unit=boot-complete.target
    emergency_cmd="/usr/lib/systemd/systemd-sulogin-shell"
    for unit in emergency.service rescue.service; do
        mkdir -p "$out/$unit.d"
        what=${unit%.service}
        cat > "$out/$unit.d/50-particle-trial.conf" <<EOF
# Trial boot of $entry: no shell that waits for a password; record the failure and
# reboot, which spends a try (particle-trial-generator; a blessed boot keeps the shell).
[Unit]
FailureAction=reboot-force

[Service]
ExecStart=
ExecStart=$SELF fail $what $emergency_cmd $what
EOF
    done
    mkdir -p "$out/$deadline_unit.d"
    cat > "$out/$deadline_unit.d/50-particle-trial.conf" <<EOF
# Trial boot of $entry: a boot that hangs is a failed try ([boot] trial_timeout).
[Unit]
JobTimeoutSec=$timeout
JobTimeoutAction=reboot
EOF
    mkdir -p "$out/reboot.target.d"
    cat > "$out/reboot.target.d/50-particle-trial.conf" <<EOF
# Trial boot of $entry: a shutdown that hangs must not keep the next try from starting.
[Unit]
JobTimeoutSec=5min
JobTimeoutAction=reboot-force
EOF
    cat > "$out/particle-trial.service" <<EOF
# Trial boot of $entry (particle-trial-generator).
[Unit]
Description=Record the trial boot of $entry
DefaultDependencies=no
Conflicts=shutdown.target
Before=sysinit.target shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=PARTICLE_TRIAL_TIMEOUT=$timeout
ExecStart=$SELF start
ExecStop=$SELF stop
EOF
    mkdir -p "$out/sysinit.target.wants"
    ln -sf ../particle-trial.service "$out/sysinit.target.wants/particle-trial.service"
}

start() {
    # An oops during the trial is a failed try (panic= on the command line reboots).
    echo 1 > /proc/sys/kernel/panic_on_oops 2>/dev/null || true
    record root "switched to the real root"
}

# The initrd part of a counted boot: record it, then reboot if the switch to the real root has
# not come within the trial timeout (this service is stopped at the switch).
initrd() {
    ensure_efivars
    [ -n "$(count_path)" ] || exit 0
    timeout=$(cmdline_arg particle.trial_timeout)
    [ -n "$timeout" ] || exit 0
    echo 1 > /proc/sys/kernel/panic_on_oops 2>/dev/null || true
    record start initrd
    trap 'exit 0' TERM INT
    while :; do
        read -r up _ < /proc/uptime || up=0
        [ "${up%%.*}" -ge "$timeout" ] && break
        sleep 5 &
        wait $! || true
    done
    running=$(systemctl list-jobs --no-legend --plain 2>/dev/null | while read -r _ unit type state _; do
        [ "$type" = start ] && [ "$state" = running ] && printf '%s ' "$unit"
    done)
    record timeout "initrd.target not reached within ${timeout}s; still starting: ${running:--}"
    systemctl reboot || systemctl --force reboot
}

failed_units() {
    systemctl list-units --failed --no-legend --plain 2>/dev/null | while read -r unit _; do
        printf '%s ' "$unit"
    done
}

# Runs when particle-trial.service of the real root stops (a shutdown): one before the boot was
# blessed is recorded with its cause.
stop() {
    target=boot-complete.target
    systemctl -q is-active "$target" 2>/dev/null && return 0
    failed=$(failed_units)
    if journalctl -b -q -o cat -u "$target" 2>/dev/null | grep -q 'timed out'; then
        waiting=""
        for u in $(systemctl show -p Requires -p Wants --value "$target" 2>/dev/null); do
            case "$u" in *.target) continue ;; esac
            systemctl -q is-active "$u" 2>/dev/null || waiting="$waiting $u"
        done
        record timeout "$target not reached within ${PARTICLE_TRIAL_TIMEOUT:-?}s; not done:${waiting:- -}"
    elif [ -n "$failed" ]; then
        record failed "$failed"
    else
        record reboot "shut down before $target"
    fi
}

fail() {
    what=$1
    shift
    ensure_efivars
    if [ -z "$(count_path)" ] || [ -z "$(cmdline_arg particle.trial_timeout)" ] ||
        { ! in_initrd && systemctl -q is-active boot-complete.target 2>/dev/null; }; then
        # A blessed boot (or one blessed meanwhile): the owner gets the usual shell.
        [ $# -gt 0 ] && "$@"
        exit 0
    fi
    failed=$(failed_units)
    stage=root
    if in_initrd; then
        stage=initrd
        mounted "${SYSROOT%/}/usr" || stage=usr
        mounted "$SYSROOT" || stage=root-fs
    fi
    case " $failed" in
        *" sysroot-usr.mount"* | *" systemd-veritysetup@usr.service"*) stage=usr ;;
    esac
    record "$what" "$stage: ${failed:-no failed unit}"
    echo "particle-trial: trial boot failed ($what, $stage); rebooting to spend a try" >&2
    sleep "${PARTICLE_FAIL_PAUSE:-2}"
    exit 1     # FailureAction=reboot-force
}

case "${1:-}" in
    start) start ;;
    initrd) initrd ;;
    stop) stop ;;
    fail) shift; fail "$@" ;;
    *)
        if [ $# -ge 1 ] && [ -d "$1" ]; then
            generate "$@"
        else
            echo "usage: particle-trial initrd|start|stop|fail WHAT [COMMAND...] | generator DIR EARLY LATE" >&2
            exit 2
        fi
        ;;
esac
