#!/usr/bin/env bash
# Same in-guest fio jobs against `ringfence vhost-user blk` and against
# `qemu-storage-daemon --export type=vhost-user-blk`, same image, same run.
# Needs fetch.sh and build-fio.sh. A benchmark, not a test: it prints a table.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
G=${OUT:-$TOP/target/guest}
R=$G/root
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
QSD=${QSD:-$(command -v qemu-storage-daemon || echo "$R/usr/bin/qemu-storage-daemon")}
WORK=$(mktemp -d /tmp/ringfence-bench-XXXXXX)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$WORK"' EXIT
kver=$(ls "$R/lib/modules" | head -n1)

rootfs=$WORK/rootfs
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,mnt,modules,etc}
cp "$R/bin/busybox" "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    cp "$(find "$R/lib/modules/$kver" -name "$m.ko*" | head -n1)" "$rootfs/modules/"
done
cp "$G/fio" "$rootfs/bin/fio"
cp "$HERE/fio.sh" "$rootfs/fio.sh"
cat > "$rootfs/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /modules/$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
sh /fio.sh
echo "RF: DONE"
poweroff -f
INIT
chmod +x "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

image=$WORK/disk.img
truncate -s 1G "$image"
accel=tcg
[ "${RINGFENCE_GUEST_ACCEL:-}" = kvm ] && [ -w /dev/kvm ] && accel=kvm

boot() { # $1 = label
    timeout 600 "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
        -nodefaults -nographic -no-reboot -serial stdio -machine q35,accel=$accel -smp 2 \
        -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
        -kernel "$R/boot/vmlinuz-$kver" -initrd "$WORK/initrd.gz" -append "console=ttyS0 quiet" \
        -chardev socket,id=vu0,path="$WORK/$1.sock" -device vhost-user-blk-pci,chardev=vu0,num-queues=1 \
        2>&1 | tr -d '\r' | grep -o 'RF: fio .*' | sed "s/^RF: fio /$1 /" > "$WORK/$1.txt" || true
}
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

"$BIN" vhost-user --socket-path "$WORK/ours.sock" blk --image "$image" 2>/dev/null & PID=$!
wait_sock "$WORK/ours.sock"; boot ours; kill $PID; wait $PID 2>/dev/null || true; PID=
"$QSD" --blockdev driver=file,node-name=file0,filename="$image" \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path="$WORK/qsd.sock",writable=on,num-queues=1 \
    >/dev/null 2>&1 & PID=$!
wait_sock "$WORK/qsd.sock"; boot qsd; kill $PID; wait $PID 2>/dev/null || true; PID=

cat "$WORK/ours.txt" "$WORK/qsd.txt" >&2
echo "in-guest fio (accel=$accel, io_uring, direct), ringfence vhost-user vs $("$QSD" --version | head -n1)"
printf '%-20s %12s %12s %8s\n' job ours theirs ratio
while read -r _ job iops _; do
    ours=${iops#iops=}
    theirs=$(grep " $job " "$WORK/qsd.txt" | sed 's/.*iops=\([0-9]*\).*/\1/')
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    printf '%-20s %12s %12s %8s\n' "$job" "$ours IOPS" "$theirs IOPS" "$ratio"
done < "$WORK/ours.txt"
