#!/bin/sh
# Test fault injection: the host chooses this boot's fault with
# `-fw_cfg name=opt/particle/fault,string=panic|hang`.
modprobe qemu_fw_cfg 2>/dev/null
raw=/sys/firmware/qemu_fw_cfg/by_name/opt/particle/fault/raw
fault=$(cat "$raw" 2>/dev/null)
echo "PARTICLE-FAULT fault=${fault:-none}"
case "$fault" in
    panic) echo c > /proc/sysrq-trigger ;;
    hang) exec sleep infinity ;;
esac
exit 0
