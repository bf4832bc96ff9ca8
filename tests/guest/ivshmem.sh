#!/usr/bin/env bash
# A stock QEMU guest with an ivshmem-doorbell device attached to Ringfence's
# ivshmem server (`ringfence backend --bus ivshmem`): proves that QEMU accepts
# the server and that messages and doorbells work both ways. No virtio-msg
# driver in the guest: the device goes to vfio-pci behind a virtual IOMMU and
# a small static program (ivshmem-guest.c) speaks to it.
# Needs tests/guest/fetch.sh (kernel, busybox) and QEMU 10 in /usr/bin.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
G=${OUT:-$TOP/target/guest}
R=$G/root
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
QEMU=${QEMU10:-/usr/bin/qemu-system-x86_64}
WORK=$(mktemp -d /tmp/ringfence-ivshmem-XXXXXX)
BACKEND_PID=
cleanup() {
    [ -n "$BACKEND_PID" ] && kill "$BACKEND_PID" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "[ivshmem] FAIL: $*"
    echo "--- guest"; tail -n 40 "$WORK/serial.log" 2>/dev/null || true
    echo "--- backend"; tail -n 20 "$WORK/backend.log" 2>/dev/null || true
    exit 1
}

kver=$(ls "$R/lib/modules" | head -n1)
rootfs=$WORK/rootfs
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,modules}
cp "$R/bin/busybox" "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do
    f=$(find "$R/lib/modules/$kver" -name "$m.ko*" | head -n1)
    # Some are built into vfio.ko on newer kernels (vfio_virqfd since 6.2).
    [ -n "$f" ] || { echo "module $m not in this kernel: skipped"; continue; }
    case "$f" in
        *.xz) xz -dc "$f" > "$rootfs/modules/$m.ko" ;;
        *) cp "$f" "$rootfs/modules/$m.ko" ;;
    esac
done
gcc -static -O2 -o "$rootfs/bin/ivshmem-guest" "$HERE/ivshmem-guest.c"
install -m 0755 "$HERE/init-ivshmem" "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

# The guest's RAM is a file the backend maps (addresses are guest-physical).
truncate -s 256M "$WORK/ram"
sock=$WORK/ivshmem.sock
RUST_LOG=${RUST_LOG:-info} "$BIN" backend --bus ivshmem --once --socket-path "$sock" \
    --guest-ram "$WORK/ram" --vectors 1 rng >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || fail "backend did not start"

timeout 300 "$QEMU" -nodefaults -nographic -no-reboot -serial file:"$WORK/serial.log" \
    -machine q35,accel=tcg,memory-backend=mem -smp 1 -m 256M -device intel-iommu \
    -object memory-backend-file,id=mem,size=256M,mem-path="$WORK/ram",share=on \
    -chardev socket,id=iv,path="$sock" \
    -device ivshmem-doorbell,chardev=iv,vectors=1 \
    -kernel "$R/boot/vmlinuz-$kver" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on" >"$WORK/qemu.log" 2>&1 || fail "QEMU: $(tail -n 5 "$WORK/qemu.log")"

grep -q "RF: DONE" "$WORK/serial.log" || fail "guest did not finish"
for check in magic pong interrupt; do
    grep -q "RF: PASS $check" "$WORK/serial.log" || fail "guest: $check"
done
# The backend counted the guest's doorbell and message before QEMU left.
for _ in $(seq 100); do kill -0 "$BACKEND_PID" 2>/dev/null || break; sleep 0.05; done
line=$(grep "ivshmem driver detached" "$WORK/backend.log" || true)
doorbells=$(echo "$line" | grep -o 'doorbells=[0-9]*' | cut -d= -f2)
messages=$(echo "$line" | grep -o 'messages=[0-9]*' | cut -d= -f2)
[ "${doorbells:-0}" -ge 1 ] && [ "${messages:-0}" -ge 1 ] || fail "backend did not count the guest: '$line'"
grep RF: "$WORK/serial.log" | sed 's/^/  /'
echo "[ivshmem] PASS: QEMU attached to Ringfence's ivshmem server; PING/PONG through the queues; doorbells both ways (backend counted $doorbells, guest took an interrupt)"
