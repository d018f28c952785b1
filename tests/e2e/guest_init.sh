#!/bin/sh
# PID 1 of the end-to-end guest (busybox sh, static), booted by SYSLINUX from its own disk.
#
# The disk (/dev/vda) holds the boot partition (vda1) and a data partition (vda2), laid out in
# 4 KiB blocks:
#   block 0            header "NBDCSI-E2E seed=MD5": absent on the first boot
#   blocks 1..1024     4 MiB of random seed data, written once, MD5 in the header
#   blocks 2048..2111  a ring of 64 records; record N goes to slot N % 64 and holds
#                      "REC %010d\n" then a fixed filler (so every record can be rebuilt)
#
# First boot: write the seed and the header, print "E2E SEED MD5".
# Later boots (a clone of a snapshot): check the seed against the header and every ring slot
# against one point in time, print "E2E SEED-CHECK ..." and "E2E RING max=M bad=K".
# Then forever: write record N (O_DIRECT + fsync: it reaches the storage node), read it back
# (O_DIRECT), compare; print "E2E REC N" on success, "E2E IOERR ..." or "E2E MISMATCH N" on
# failure (and go on); print "E2E SIZE BYTES" whenever the size of vda changes.
# The host reads these lines from the serial console (tests/e2e/qemu.py) and timestamps them.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp

say() { echo "E2E $*"; }

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || say "WARN insmod $mod failed"
done < /lib/modules/load-order

DATA=/dev/vda2
n=0
while [ ! -b "$DATA" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$DATA" ]; then
    say "IOERR no data partition $DATA"
    sleep 5
    poweroff -f
fi
say "BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"

RING=2048
SLOTS=64
yes 'nbd-csi end-to-end ring record' | head -c 4081 > /tmp/fill

record() { printf 'REC %010d\n' "$1"; cat /tmp/fill; }

read_block() { dd if="$DATA" of="$2" bs=4096 skip="$1" count=1 iflag=direct 2>/tmp/err; }

hdr=$(dd if="$DATA" bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)
case "$hdr" in
NBDCSI-E2E\ seed=*)
    seed=${hdr#*seed=}
    actual=$(dd if="$DATA" bs=4096 skip=1 count=1024 iflag=direct 2>/dev/null | md5sum)
    say "SEED-CHECK expected=$seed actual=${actual%% *}"
    # The highest record in the ring is the snapshot point M; every slot must hold the last
    # record written to it up to M (or nothing, when M never reached it).
    max=-1
    slot=0
    while [ $slot -lt $SLOTS ]; do
        read_block $((RING + slot)) /tmp/slot
        line=$(tr -d '\000' < /tmp/slot | head -n 1)
        case "$line" in REC\ *) v=${line#REC }; v=$((1${v} - 10000000000)) ;; *) v=-1 ;; esac
        [ "$v" -gt "$max" ] && max=$v
        slot=$((slot + 1))
    done
    bad=0
    slot=0
    while [ $slot -lt $SLOTS ]; do
        read_block $((RING + slot)) /tmp/slot
        want=$((max - (max - slot + SLOTS * 1000000) % SLOTS))
        if [ "$want" -lt 0 ]; then
            [ -z "$(tr -d '\000' < /tmp/slot)" ] || bad=$((bad + 1))
        else
            record "$want" > /tmp/want
            cmp -s /tmp/want /tmp/slot || bad=$((bad + 1))
        fi
        slot=$((slot + 1))
    done
    say "RING max=$max bad=$bad"
    n=$((max + 1))
    ;;
*)
    dd if=/dev/urandom of=/tmp/seed bs=4096 count=1024 2>/dev/null
    seed=$(md5sum < /tmp/seed)
    seed=${seed%% *}
    dd if=/tmp/seed of="$DATA" bs=4096 seek=1 oflag=direct conv=notrunc,fsync 2>/tmp/err ||
        say "IOERR seed $(cat /tmp/err)"
    printf 'NBDCSI-E2E seed=%s\n' "$seed" |
        dd of="$DATA" bs=4096 count=1 oflag=direct conv=sync,notrunc,fsync 2>/tmp/err ||
        say "IOERR header $(cat /tmp/err)"
    rm -f /tmp/seed
    say "SEED $seed"
    n=0
    ;;
esac

size=
while :; do
    block=$((RING + n % SLOTS))
    record "$n" > /tmp/rec
    if ! dd if=/tmp/rec of="$DATA" bs=4096 seek=$block oflag=direct conv=notrunc,fsync \
        2>/tmp/err; then
        say "IOERR write $n $(tr '\n' ' ' < /tmp/err)"
    elif ! read_block $block /tmp/back; then
        say "IOERR read $n $(tr '\n' ' ' < /tmp/err)"
    elif ! cmp -s /tmp/rec /tmp/back; then
        say "MISMATCH $n"
    else
        say "REC $n"
    fi
    now=$(cat /sys/block/vda/size)
    if [ "$now" != "$size" ]; then
        size=$now
        say "SIZE $((now * 512))"
    fi
    n=$((n + 1))
    # Pace the loop a little: two TCG guests and the storage nodes share two host cores.
    sleep 0.05
done
