#!/bin/sh
# PID 1 of the test guests that tests/vm/guest.py boots (busybox sh, static).
#
# 1. mounts proc, sysfs and devtmpfs; loads the kernel modules listed in /lib/modules/load-order
#    (dependencies first, written by guest.py at build time);
# 2. brings up lo and eth0 as 10.0.2.15/24 (QEMU user networking; the host NBD server is reached
#    through the guestfwd address 10.0.2.100:10809);
# 3. copies the fw_cfg blob opt/nbdcsi/cmd to /run/nbdcsi/cmd, links /run/nbdcsi/NAME to each
#    virtio disk whose serial is NAME (data files from the host), and runs /run/nbdcsi/cmd with
#    sh, from /run/nbdcsi;
# 4. prints "NBDCSI-GUEST-EXIT rc=N" with the script's exit status and powers off.
# Setup problems are reported ("nbdcsi-init: ...") but never stop the boot: the script still
# runs (or rc=125 if it never arrived), then the marker and the power-off follow. A hung script
# is the host's business: guest.py kills qemu at its timeout.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run/nbdcsi

say() { echo "nbdcsi-init: $*"; }

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || say "insmod $mod failed"
done < /lib/modules/load-order

# Devices appear asynchronously after insmod: wait for them, but boundedly (600 x 0.1 s: a
# bound for a stuck guest, far above what a slow TCG guest on a loaded host takes).
wait_for() {
    n=0
    while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ] || say "gave up waiting for $1"
}

FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/nbdcsi
wait_for /sys/class/net/eth0
wait_for "$FWCFG/cmd/raw"

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip addr add 10.0.2.15/24 dev eth0
    ip link set eth0 up
fi

[ -r "$FWCFG/cmd/raw" ] && cat "$FWCFG/cmd/raw" > /run/nbdcsi/cmd
for disk in /sys/block/vd*; do
    serial=$(cat "$disk/serial" 2>/dev/null) || serial=
    [ -n "$serial" ] && ln -s "/dev/${disk##*/}" "/run/nbdcsi/$serial"
done

say "ready after $(cut -d' ' -f1 /proc/uptime)s"
if [ -f /run/nbdcsi/cmd ]; then
    (cd /run/nbdcsi && sh /run/nbdcsi/cmd)
    rc=$?
else
    say "no guest script at $FWCFG/cmd"
    rc=125
fi
sync
echo "NBDCSI-GUEST-EXIT rc=$rc"
poweroff -f
