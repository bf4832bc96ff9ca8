#!/usr/bin/env bash
# Boots a real Debian kernel under QEMU against `ringfence vhost-user ... blk`
# and checks the data in the guest and, after poweroff, on the host.
#   tests/guest/run.sh full        guest RAM shared with the backend (classic KVM)
#   tests/guest/run.sh restricted  only a 256 MiB memfd window shared; swiotlb=force
# The backend runs `blk --cache none --aio io_uring` (BLK_OPTS overrides).
# Needs tests/guest/fetch.sh to have run. Uses TCG unless RINGFENCE_GUEST_ACCEL=kvm:
# nested KVM on these machines does not run guests (they hang in the decompressor).
set -euo pipefail
MODE=${1:-full}
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
G=${OUT:-$TOP/target/guest}
R=$G/root
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
WORK=$(mktemp -d /tmp/ringfence-guest-XXXXXX)
BACKEND_PID=
cleanup() {
    [ -n "$BACKEND_PID" ] && kill "$BACKEND_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

kver=$(ls "$R/lib/modules" | head -n1)
# --- initramfs: busybox, the virtio modules, mke2fs with its libraries
rootfs=$WORK/rootfs
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,mnt,modules,lib64,lib/x86_64-linux-gnu}
cp "$R/bin/busybox" "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci; do
    cp "$(find "$R/lib/modules/$kver" -name "$m.ko*" | head -n1)" "$rootfs/modules/"
done
cp "$(find "$R/lib/modules/$kver" -name 'virtio_blk.ko*' | head -n1)" "$rootfs/modules/"
mkdir -p "$rootfs/etc"
cp /usr/sbin/mke2fs "$rootfs/sbin/mke2fs"
cp /etc/mke2fs.conf "$rootfs/etc/" 2>/dev/null || true
for lib in $(ldd /usr/sbin/mke2fs | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
if [ -n "${RF_FIO:-}" ] && [ -x "${FIO_BIN:-}" ]; then
    cp "$FIO_BIN" "$rootfs/bin/fio"
    cp "$HERE/fio.sh" "$rootfs/fio.sh"
fi
install -m 0755 "$HERE/init" "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

# --- the disk and the backend
image=$WORK/disk.img
truncate -s 256M "$image"
sock=$WORK/vhost.sock
backend_args=() device_args=(--num-queues 2)
if [ "$MODE" = restricted ]; then backend_args=(--shared-window --window-max-mib 256) device_args=(); fi
# O_DIRECT and many requests in flight on io_uring unless told otherwise.
read -r -a blk_opts <<<"${BLK_OPTS:---cache none --aio io_uring}"
RUST_LOG=${RUST_LOG:-info} "$BIN" vhost-user --socket-path "$sock" "${backend_args[@]}" blk --image "$image" "${device_args[@]}" "${blk_opts[@]}" \
    >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done

# --- QEMU
accel=tcg
[ "${RINGFENCE_GUEST_ACCEL:-}" = kvm ] && [ -w /dev/kvm ] && accel=kvm
append="console=ttyS0 quiet panic=-1"
qemu=("$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios"
    -nodefaults -nographic -no-reboot -serial stdio -machine q35,accel=$accel -smp 1
    -kernel "$R/boot/vmlinuz-$kver" -initrd "$WORK/initrd.gz"
    -chardev socket,id=vu0,path="$sock")
if [ "$MODE" = restricted ]; then
    qemu+=(-m 768M
        -object memory-backend-ram,id=priv,size=512M,share=off
        -object memory-backend-memfd,id=shm,size=256M,share=on
        -numa node,nodeid=0,memdev=priv -numa node,nodeid=1,cpus=0,memdev=shm
        -bios "$R/usr/share/qemu/qboot.rom"
        -device vhost-user-blk-pci,chardev=vu0,num-queues=1,iommu_platform=on,disable-legacy=on)
    append="$append swiotlb=force"
else
    qemu+=(-m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -device vhost-user-blk-pci,chardev=vu0,num-queues=2)
fi
qemu+=(-append "$append ${RF_FIO:+RF_FIO=1}")
start=$(date +%s)
# Grow the image (256 -> 320 MiB) once the guest is ready for it.
( for _ in $(seq 3000); do
      if grep -q '^RF: resize-ready' "$WORK/console.log" 2>/dev/null; then
          truncate -s 320M "$image"; break
      fi
      sleep 0.1
  done ) &
RESIZER_PID=$!
timeout "${GUEST_TIMEOUT:-300}" "${qemu[@]}" >"$WORK/console.log" 2>&1 || true
kill "$RESIZER_PID" 2>/dev/null || true
secs=$(( $(date +%s) - start ))
tr -d '\r' <"$WORK/console.log" >"$WORK/console.txt" && mv "$WORK/console.txt" "$WORK/console.log"
grep '^RF:' "$WORK/console.log" | sed "s/^/[$MODE] /" || true

fail() {
    echo "[$MODE] FAIL: $*"
    echo "--- console"; tail -n 40 "$WORK/console.log"
    echo "--- backend"; tail -n 20 "$WORK/backend.log"
    exit 1
}
grep -q '^RF: DONE' "$WORK/console.log" || fail "guest did not finish"
! grep -q '^RF: FAIL' "$WORK/console.log" || fail "guest check failed"
grep -q '^RF: PASS raw pattern' "$WORK/console.log" || fail "no raw pattern check"
grep -q '^RF: PASS ext4 unmounted' "$WORK/console.log" || fail "no ext4 check"
grep -q '^RF: PASS resize' "$WORK/console.log" || fail "the guest did not see the image grow"

# --- host-side checks on the image the backend wrote
kill "$BACKEND_PID"; wait "$BACKEND_PID" 2>/dev/null || true; BACKEND_PID=
e2fsck -fn "$image" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; fail "e2fsck found errors"; }
while read -r _ _ name sum; do
    host=$(debugfs -R "cat /$name" "$image" 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$host" = "$sum" ] || fail "/$name: guest md5 $sum, host md5 $host"
    echo "[$MODE] host: /$name matches ($sum)"
done < <(grep '^RF: file ' "$WORK/console.log")
if [ "$MODE" = restricted ]; then
    grep -q 'serving shared window' "$WORK/backend.log" || fail "backend did not report a shared window"
    grep 'serving shared window' "$WORK/backend.log" | head -n1 | sed "s/^.*INFO/[$MODE] backend:/"
fi
grep 'negotiated features' "$WORK/backend.log" | tail -n1 | sed "s/^.*INFO/[$MODE] backend:/" || true
grep 'queues started' "$WORK/backend.log" | tail -n1 | sed "s/^.*INFO/[$MODE] backend:/" || true
case "${blk_opts[*]}" in
    *io_uring*) grep -q 'queues started aio=IoUring' "$WORK/backend.log" || fail "io_uring not in use (rings made before the sandbox?)" ;;
esac
grep -q 'config change sent to the frontend' "$WORK/backend.log" || fail "backend sent no config change"
! grep -q 'Unexpected end-of-file' "$WORK/console.log" || fail "QEMU: Unexpected end-of-file"
echo "[$MODE] PASS: guest boot + workload in ${secs}s (accel=$accel), e2fsck clean, file checksums match, resize seen"
