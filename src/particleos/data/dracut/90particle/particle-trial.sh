#!/bin/sh
# ParticleOS trial boots: a boot of a version that systemd-boot still counts (the booted UKI has
# a +LEFT-DONE counter, so systemd-boot set LoaderBootCountPath) must end in a reboot whatever
# goes wrong, with no console interaction: the reboot spends one try, and after the last one
# systemd-boot boots the previous version. Blessed (known good) boots are left alone.
#
# The units are static (the initrd's from the dracut module 90particle, the real root's from
# /usr/lib/systemd/system) and decide when they run: one mechanism for both stages, and a
# boot blessed meanwhile keeps its shell.
#   particle-trial watch initrd|root      (particle-trial.service: record the boot, then
#                                          reboot if it is not through within the deadline)
#   particle-trial stop                   (real root, at shutdown: record why, if unblessed)
#   particle-trial fail WHAT COMMAND...   (emergency/rescue: record, then fail -> reboot-force;
#                                          on a blessed boot: run COMMAND, the usual shell)
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
LOG_VAR="$EFIVARS/ParticleBootLog-$PARTICLE_GUID"
DONE="$RUN/particle-trial.recorded"
MAX_BYTES=3072

# efivarfs may not be mounted yet this early.
ensure_efivars() {
    [ -z "${PARTICLE_EFIVARS:-}" ] && [ -d /sys/firmware/efi ] || return 0
    mounted "$EFIVARS" && return 0
    modprobe -q efivarfs 2>/dev/null
    mount -t efivarfs -o nosuid,nodev,noexec efivarfs "$EFIVARS" 2>/dev/null || true
}

# The booted entry's file name with its counter (e.g. ID_V+2-1.efi); empty on a blessed boot
# or when [boot] on_failure = "none" (no particle.trial_timeout= on the command line).
trial_entry() {
    [ -n "$(cmdline_arg particle.trial_timeout)" ] || return 0
    count_path
}

count_path() {
    f="$EFIVARS/LoaderBootCountPath-$LOADER_GUID"
    [ -r "$f" ] || return 0
    # efivarfs files cannot seek: read them through a pipe.
    p=$(cat "$f" 2>/dev/null | tail -c +5 | tr -d '\000')
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
    case "$event" in start | root) ;; *) : > "$DONE" 2>/dev/null ;; esac
    tmp="$RUN/particle-trial.$$"
    # efivarfs makes variables it does not know immutable at every boot; they cannot be
    # truncated either, so every write goes through >> (open without O_TRUNC).
    [ -e "$LOG_VAR" ] && chattr -i "$LOG_VAR" 2>/dev/null
    if [ -e "$LOG_VAR" ] && [ "$(wc -c < "$LOG_VAR")" -lt "$MAX_BYTES" ]; then
        # EFI_VARIABLE_APPEND_WRITE | NV | BS | RT: attributes and data in one write.
        { printf '\107\000\000\000'; printf '%s\n' "$line"; } > "$tmp"
    else
        # New, or full: rewrite with the last records kept.
        { printf '\007\000\000\000'
          if [ -e "$LOG_VAR" ]; then cat "$LOG_VAR" | tail -c +5 | tail -n 24; fi
          printf '%s\n' "$line"; } > "$tmp"
    fi
    cat "$tmp" >> "$LOG_VAR" || echo "particle-trial: cannot write $LOG_VAR" >&2
    rm -f "$tmp"
}

failed_units() {
    systemctl list-units --failed --no-legend --plain 2>/dev/null | while read -r unit _; do
        printf '%s ' "$unit"
    done
}

running_jobs() {
    systemctl list-jobs --no-legend --plain 2>/dev/null | while read -r _ unit type state _; do
        [ "$type" = start ] && [ "$state" = running ] && printf '%s ' "$unit"
    done
}

uptime_s() {
    read -r up _ < /proc/uptime || up=0
    echo "${up%%.*}"
}

# particle-trial.service: record this stage of a counted boot, then watch its deadline: the
# initrd must reach the real root within the timeout of power-on (the service is stopped at the
# switch), the real root boot-complete.target within the timeout of its own start.
watch() {
    stage=$1
    ensure_efivars
    [ -n "$(trial_entry)" ] || exit 0        # blessed boot: nothing to do
    timeout=$(cmdline_arg particle.trial_timeout)
    # An oops during the trial is a failed try (panic= on the command line reboots).
    echo 1 > /proc/sys/kernel/panic_on_oops 2>/dev/null || true
    if [ "$stage" = initrd ]; then
        record start initrd
        since=0
        target=initrd.target
    else
        record root "switched to the real root"
        since=$(uptime_s)
        target=boot-complete.target
    fi
    trap 'exit 0' TERM INT
    while :; do
        if [ "$stage" = root ] && systemctl -q is-active "$target" 2>/dev/null; then
            exit 0                          # reached: systemd-bless-boot marks the boot good
        fi
        [ $(($(uptime_s) - since)) -ge "$timeout" ] && break
        sleep 5 &
        wait $! || true
    done
    record timeout "$target not reached within ${timeout}s; still starting: $(running_jobs)"
    systemctl reboot || systemctl --force reboot
}

# ExecStop of the real root's particle-trial.service (it runs only while the boot is being
# tried): a shutdown before boot-complete.target is recorded with its cause.
stop() {
    [ -e "$DONE" ] && return 0
    systemctl -q is-active boot-complete.target 2>/dev/null && return 0
    failed=$(failed_units)
    if [ -n "$failed" ]; then
        record failed "$failed"
    else
        record reboot "shut down before boot-complete.target"
    fi
}

fail() {
    what=$1
    shift
    ensure_efivars
    if [ -z "$(trial_entry)" ] ||
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
        *" sysusr-usr.mount"* | *" sysroot-usr.mount"* | *" systemd-veritysetup@usr.service"*)
            stage=usr ;;
    esac
    record "$what" "$stage: ${failed:-no failed unit}"
    echo "particle-trial: trial boot failed ($what, $stage); rebooting to spend a try" >&2
    sleep "${PARTICLE_FAIL_PAUSE:-2}"
    exit 1     # FailureAction=reboot-force
}

case "${1:-}" in
    watch) watch "${2:-root}" ;;
    stop) stop ;;
    fail) shift; fail "$@" ;;
    *)
        echo "usage: particle-trial watch initrd|root | stop | fail WHAT COMMAND..." >&2
        exit 2
        ;;
esac
