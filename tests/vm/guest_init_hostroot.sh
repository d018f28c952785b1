#!/bin/sh
# PID 1 of the guests that run the host's own tree (tests/vm/guest.py, host_root=True).
#
# 1. mounts proc, sysfs and devtmpfs; loads the modules in /lib/modules/load-order (virtio,
#    nbd, 9p, overlayfs, ext4, xfs, with their dependencies first);
# 2. mounts the host's / (shared read-only over 9p, tag "hostroot") under a tmpfs overlay at
#    /newroot, with the guest's own proc, sys, dev and run inside it;
# 3. brings up lo and eth0 as 10.0.2.15/24 (the host NBD server is 10.0.2.100:10809);
# 4. copies the fw_cfg blob opt/nbdcsi/cmd to /newroot/run/nbdcsi/cmd and runs it with the
#    host's bash, chrooted into /newroot, from /run/nbdcsi;
# 5. prints "NBDCSI-GUEST-EXIT rc=N" and powers off.
# Setup problems are reported ("nbdcsi-init: ...") but never stop the boot.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /host /ovl /newroot

say() { echo "nbdcsi-init: $*"; }

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || say "insmod $mod failed"
done < /lib/modules/load-order

wait_for() {
    n=0
    while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ] || say "gave up waiting for $1"
}

FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/nbdcsi
wait_for /sys/class/net/eth0
wait_for "$FWCFG/cmd/raw"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
    || say "9p mount of the host root failed"
mount -t tmpfs -o size=256m tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot \
    || say "overlay mount failed"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
# /tmp stays the host's (under the overlay, so writes stay in the guest): the checkout, and
# the tests' data, may live there.
mount -t tmpfs -o size=64m tmpfs /newroot/run
mkdir -p /newroot/run/nbdcsi

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip addr add 10.0.2.15/24 dev eth0
    ip link set eth0 up
fi

[ -r "$FWCFG/cmd/raw" ] && cat "$FWCFG/cmd/raw" > /newroot/run/nbdcsi/cmd
say "ready after $(cut -d' ' -f1 /proc/uptime)s"
if [ -f /newroot/run/nbdcsi/cmd ]; then
    chroot /newroot /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        /bin/bash -c 'cd /run/nbdcsi && bash ./cmd'
    rc=$?
else
    say "no guest script at $FWCFG/cmd"
    rc=125
fi
sync
echo "NBDCSI-GUEST-EXIT rc=$rc"
poweroff -f
