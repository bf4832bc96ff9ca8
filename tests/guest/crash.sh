#!/usr/bin/env bash
# A real guest writes with 4 processes at queue depth 16 (O_DIRECT, a flush
# every 32 writes and after every pass), while 2 more read at depth 16 from
# holes of the sparse image, through `ringfence vhost-user blk --cache none
# --aio io_uring`: the reads complete ahead of older writes. The backend is
# killed with SIGKILL eight times under that load and restarted, and QEMU
# reconnects (reconnect=1).
#   tests/guest/crash.sh on    in-flight tracking on: no hang, no I/O error,
#                              every block holds its last acknowledged write
#                              (exit 3: no kill found requests in flight)
#   tests/guest/crash.sh off   --no-inflight-tracking: shows what goes wrong
#                              (exit 0 when a failure was seen)
# Needs tests/guest/fetch.sh (kernel, busybox, QEMU 7.2 in its root).
set -euo pipefail
MODE=${1:-on}
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
G=${OUT:-$TOP/target/guest}
R=$G/root
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
WORK=$(mktemp -d /tmp/ringfence-crash-XXXXXX)
JOBS=4 BLOCKS=256 PASSES=${RF_PASSES:-12}
BACKEND_PID= QEMU_PID=
cleanup() {
    [ -n "$BACKEND_PID" ] && kill -9 "$BACKEND_PID" 2>/dev/null || true
    [ -n "$QEMU_PID" ] && kill -9 "$QEMU_PID" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

kver=$(ls "$R/lib/modules" | head -n1)
rootfs=$WORK/rootfs
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,modules}
cp "$R/bin/busybox" "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    cp "$(find "$R/lib/modules/$kver" -name "$m.ko*" | head -n1)" "$rootfs/modules/"
done
gcc -static -O2 -o "$rootfs/bin/crash-writer" "$HERE/crash-writer.c"
install -m 0755 "$HERE/init-crash" "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

image=$WORK/disk.img
truncate -s 64M "$image"
# Real zeros at [8, 32) MiB for the 1 MiB reader; the rest stays sparse.
dd if=/dev/zero of="$image" bs=1M seek=8 count=24 conv=notrunc,fsync status=none
sock=$WORK/vhost.sock
tracking=()
[ "$MODE" = off ] && tracking=(--no-inflight-tracking)
start_backend() {
    RUST_LOG=${RUST_LOG:-info} "$BIN" vhost-user --socket-path "$sock" "${tracking[@]}" \
        blk --image "$image" --cache none --aio io_uring >>"$WORK/backend.log" 2>&1 &
    BACKEND_PID=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
}
start_backend

accel=tcg
[ "${RINGFENCE_GUEST_ACCEL:-}" = kvm ] && [ -w /dev/kvm ] && accel=kvm
"$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
    -nodefaults -nographic -no-reboot -serial stdio -machine q35,accel=$accel -smp 1 \
    -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel "$R/boot/vmlinuz-$kver" -initrd "$WORK/initrd.gz" \
    -chardev socket,id=vu0,path="$sock",reconnect=1 \
    -device vhost-user-blk-pci,chardev=vu0,num-queues=1 \
    -append "console=ttyS0 quiet panic=-1 RF_JOBS=$JOBS RF_BLOCKS=$BLOCKS RF_PASSES=$PASSES" \
    >"$WORK/console.log" 2>&1 &
QEMU_PID=$!
start=$(date +%s)

# Kill the backend while the writers are busy: after each of job 0's first
# eight flushed passes by default (RF_KILLS). Under TCG the guest makes
# requests more slowly than the disk serves them, so a kill finds some in
# flight about every other time; eight kills make a run that found none
# (and so tested nothing) rare.
KILLS=${RF_KILLS:-0 1 2 3 4 5 6 7}
kills=0
for at in $KILLS; do
    for _ in $(seq 2400); do
        grep -q "^RF: job 0 pass $at flushed" "$WORK/console.log" 2>/dev/null && break
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.05
    done
    grep -q "^RF: job 0 pass $at flushed" "$WORK/console.log" || break
    sleep 0.2
    kill -9 "$BACKEND_PID"; wait "$BACKEND_PID" 2>/dev/null || true
    kills=$((kills + 1))
    echo "[crash-$MODE] backend killed with SIGKILL under load ($kills); restarting"
    start_backend
done

# The guest finishes, or hangs (a request that never completes).
limit=${GUEST_TIMEOUT:-300}
while kill -0 "$QEMU_PID" 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 0.5; done
hung=no
if kill -0 "$QEMU_PID" 2>/dev/null; then hung=yes; kill -9 "$QEMU_PID"; fi
wait "$QEMU_PID" 2>/dev/null || true; QEMU_PID=
secs=$(( $(date +%s) - start ))
tr -d '\r' <"$WORK/console.log" >"$WORK/console.txt"
grep -E '^RF: (FAIL|PASS|writers|io errors)' "$WORK/console.txt" | sed "s/^/[crash-$MODE] /" || true
resubmitted=$(grep -c 'resubmitting the requests' "$WORK/backend.log" || true)
out_of_order=$(grep -c 'resubmitting the requests.*out_of_order=true' "$WORK/backend.log" || true)
echo "[crash-$MODE] kills $kills, restarts that resubmitted requests: $resubmitted (out of order: $out_of_order), guest hung: $hung, ${secs}s"
grep 'resubmitting the requests' "$WORK/backend.log" | sed "s/^.*INFO/[crash-$MODE] backend:/" || true

# Host side: every block holds the last pass, as the guest wrote it.
kill "$BACKEND_PID" 2>/dev/null; wait "$BACKEND_PID" 2>/dev/null || true; BACKEND_PID=
host=$(python3 - "$image" $JOBS $BLOCKS $PASSES <<'PY'
import struct, sys
path, jobs, blocks, passes = sys.argv[1], *map(int, sys.argv[2:])
bad = 0
with open(path, "rb") as f:
    for j in range(jobs):
        for b in range(blocks):
            f.seek((1 << 20) + (j * blocks + b) * 4096)
            blk = f.read(4096)
            want = struct.pack("<4I", 0x52464352, j, b, passes - 1) + bytes(
                (j * 7 + b * 13 + (passes - 1) * 31 + i) & 0xFF for i in range(16, 4096))
            bad += blk != want
print(f"{bad} of {jobs * blocks} blocks wrong")
PY
)
echo "[crash-$MODE] host: $host"

problems=()
want_kills=$(echo $KILLS | wc -w)
[ "$kills" = "$want_kills" ] || problems+=("the backend was killed $kills times, not $want_kills")
[ "$hung" = no ] || problems+=("the guest hung")
grep -q "^RF: writers done $JOBS/$JOBS, readers 2/2" "$WORK/console.txt" || problems+=("not every writer and reader passed")
! grep -q '^RF: FAIL' "$WORK/console.txt" || problems+=("the guest reported a failure")
grep -q '^RF: io errors in dmesg: 0' "$WORK/console.txt" || problems+=("I/O errors in the guest")
case "$host" in "0 of"*) ;; *) problems+=("image: $host") ;; esac
grep -q 'queues started aio=IoUring' "$WORK/backend.log" || problems+=("io_uring not in use")
! grep -q 'aio sync' "$WORK/backend.log" || problems+=("a queue fell back to aio sync")
if [ "$MODE" = off ]; then
    if [ ${#problems[@]} -gt 0 ]; then
        printf '[crash-off] failure shown without in-flight tracking: %s\n' "${problems[@]}"
        exit 0
    fi
    # Rewinding to the used index is right whenever the requests in flight
    # were the next ones on the available ring; the on-mode log says how
    # often a kill found them otherwise (out_of_order=true).
    echo "[crash-off] no failure seen this time: every kill found the requests in flight in ring order"
    exit 1
fi
if [ "$resubmitted" -lt 1 ] && [ ${#problems[@]} -eq 0 ]; then
    # Not a failure of the backend: no kill happened to land among requests
    # in flight. Exit 3 so that a caller can run it again.
    echo "[crash-on] no restart found requests in flight: nothing was tested; run again"
    exit 3
fi
if [ ${#problems[@]} -gt 0 ]; then
    printf '[crash-on] FAIL: %s\n' "${problems[@]}"
    echo "--- console"; tail -n 30 "$WORK/console.txt"
    echo "--- backend"; tail -n 30 "$WORK/backend.log"
    exit 1
fi
echo "[crash-on] PASS: $JOBS writers x QD16 survived $kills SIGKILLs of the backend ($resubmitted restarts resubmitted); every block holds its last write (${secs}s, accel=$accel)"
