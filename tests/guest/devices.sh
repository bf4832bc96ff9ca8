#!/usr/bin/env bash
# Boots a real Debian kernel under QEMU 10 (bookworm-backports) with net,
# console, rng and vsock, each served by its own `ringfence vhost-user`
# daemon, and checks each from both ends:
#   net      the guest pings the backend's TAP and sends 64 MiB over TCP; sha256 on both sides
#   console  /dev/hvc0 <-> the backend's PTY, a line each way (only with RF_DEVICES=console, see below)
#   rng      /dev/hwrng delivers, rng_current names virtio
#   vsock    guest connect -> host <uds>_5000; host CONNECT 6000 -> guest listener
#   tests/guest/devices.sh full        guest RAM shared with the backends
#   tests/guest/devices.sh restricted  only a 256 MiB memfd window shared; swiotlb=force
# Needs tests/guest/fetch.sh (kernel, busybox) and qemu-system-x86 10 in /usr/bin.
set -euo pipefail
MODE=${1:-full}
# console is served (`vhost-user ... console`) but not booted here: QEMU up to
# 10.1 does not let users create the generic vhost-user-device-pci it needs
# (RF_DEVICES=console with a QEMU that does); the console's guest round trip
# runs over virtio-msg instead (crates/ringfence/tests/endpoints.rs).
# net works because `ringfence vhost-user net` serves through the
# early-enable shim (crates/vhost-user/src/shim.rs): QEMU 10's vhost-user-net
# sends SET_VRING_ENABLE before SET_FEATURES, which rust-vmm's vhost crate refuses.
DEVICES=${RF_DEVICES:-net rng vsock}
has() { case " $DEVICES " in *" $1 "*) return 0 ;; esac; return 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
G=${OUT:-$TOP/target/guest}
R=$G/root
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
QEMU=${QEMU10:-/usr/bin/qemu-system-x86_64}
WORK=$(mktemp -d /tmp/ringfence-devices-XXXXXX)
NS=rfg$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "[$MODE] FAIL: $*"
    echo "--- guest"; tail -n 40 "$WORK/serial.log" 2>/dev/null || true
    for l in "$WORK"/*.log; do echo "--- $l"; tail -n 15 "$l"; done
    exit 1
}

kver=$(ls "$R/lib/modules" | head -n1)
rootfs=$WORK/rootfs
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,modules}
cp "$R/bin/busybox" "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover \
         virtio_net virtio_console virtio-rng vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    f=$(find "$R/lib/modules/$kver" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || fail "module $m not in the kernel package"
    case "$f" in
        *.xz) xz -dc "$f" > "$rootfs/modules/$m.ko" ;;
        *) cp "$f" "$rootfs/modules/$m.ko" ;;
    esac
done
gcc -static -O2 -o "$rootfs/bin/vsock-test" "$HERE/vsock-test.c"
install -m 0755 "$HERE/init-devices" "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

# --- the backends: net in its own network namespace (its TAP is 10.77.0.1)
vu=()
[ "$MODE" = restricted ] && vu=(--shared-window --window-max-mib 256)
ip netns add "$NS"
start() { # name, then the command
    local name=$1; shift
    RUST_LOG=${RUST_LOG:-info} "$@" >"$WORK/backend-$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do [ -S "$WORK/$name.sock" ] && return; sleep 0.05; done
    fail "$name backend did not start"
}
host() { python3 "$HERE/devices_host.py" "$@"; }
if has net; then
    start net ip netns exec "$NS" "$BIN" vhost-user --socket-path "$WORK/net.sock" "${vu[@]}" net --tap rft0
    ip -n "$NS" addr add 10.77.0.1/24 dev rft0
    ip -n "$NS" link set rft0 up
    ip netns exec "$NS" python3 "$HERE/devices_host.py" net-recv 5555 "$WORK/net-recv.txt" >"$WORK/host-net.log" 2>&1 &
    PIDS+=($!)
fi
if has console; then
    start console "$BIN" vhost-user --socket-path "$WORK/console.sock" "${vu[@]}" console --pty
    pty=$(grep -o '/dev/pts/[0-9]*' "$WORK/backend-console.log" | head -n1)
    [ -n "$pty" ] || fail "console backend printed no PTY"
    host console "$pty" >"$WORK/host-console.log" 2>&1 &
    PIDS+=($!)
fi
has rng && start rng "$BIN" vhost-user --socket-path "$WORK/rng.sock" "${vu[@]}" rng
if has vsock; then
    start vsock "$BIN" vhost-user --socket-path "$WORK/vsock.sock" "${vu[@]}" vsock --guest-cid 3 --uds "$WORK/vm.vsock"
    host vsock-echo "$WORK/vm.vsock_5000" >"$WORK/host-vsock-echo.log" 2>&1 &
    PIDS+=($!)
    host vsock-connect "$WORK/vm.vsock" 6000 "$WORK/serial.log" >"$WORK/host-vsock-connect.log" 2>&1 &
    VSOCK_CONNECT=$!
fi

# --- QEMU
iommu=()
append="console=ttyS0 quiet panic=-1"
qemu=("$QEMU" -nodefaults -nographic -no-reboot -serial stdio -machine q35,accel=tcg -smp 1
    -kernel "$R/boot/vmlinuz-$kver" -initrd "$WORK/initrd.gz")
if [ "$MODE" = restricted ]; then
    qemu+=(-m 768M
        -object memory-backend-ram,id=priv,size=512M,share=off
        -object memory-backend-memfd,id=shm,size=256M,share=on
        -numa node,nodeid=0,memdev=priv -numa node,nodeid=1,cpus=0,memdev=shm)
    iommu=(iommu_platform=on disable-legacy=on)
    append="$append swiotlb=force"
else
    qemu+=(-m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem)
fi
opt() { local IFS=,; echo "$*"; }
has net && qemu+=(-chardev socket,id=net,path="$WORK/net.sock" -netdev vhost-user,id=n0,chardev=net
    -device "$(opt virtio-net-pci netdev=n0 "${iommu[@]}")")
has console && qemu+=(-chardev socket,id=con,path="$WORK/console.sock"
    -device "$(opt vhost-user-device-pci chardev=con virtio-id=3 num_vqs=2 config_size=12 "${iommu[@]}")")
has rng && qemu+=(-chardev socket,id=rng,path="$WORK/rng.sock"
    -device "$(opt vhost-user-rng-pci chardev=rng ${iommu[@]:0:1})") # modern-only: no disable-legacy
has vsock && qemu+=(-chardev socket,id=vsock,path="$WORK/vsock.sock"
    -device "$(opt vhost-user-vsock-pci chardev=vsock "${iommu[@]}")")
qemu+=(-append "$append rf_devices=$(echo $DEVICES | tr ' ' ',')")
start_t=$(date +%s)
# The serial console goes to guest.log as it happens (the vsock host end watches it).
timeout "${GUEST_TIMEOUT:-400}" "${qemu[@]}" >"$WORK/serial.log" 2>&1 || true
secs=$(( $(date +%s) - start_t ))
tr -d '\r' <"$WORK/serial.log" >"$WORK/guest.txt"
grep '^RF:' "$WORK/guest.txt" | sed "s/^/[$MODE] /" || true

grep -q '^RF: DONE' "$WORK/guest.txt" || fail "guest did not finish"
! grep -q '^RF: FAIL' "$WORK/guest.txt" || fail "a guest check failed"
checks=()
has rng && checks+=("rng")
has console && checks+=("console echo")
has net && checks+=("ping")
has vsock && checks+=("vsock guest-connect" "vsock host-connect")
for check in "${checks[@]}"; do
    grep -q "^RF: PASS $check" "$WORK/guest.txt" || fail "$check"
done
if has net; then
    guest_sum=$(grep '^RF: net-sum' "$WORK/guest.txt" | awk '{print $3}')
    got=$(cat "$WORK/net-recv.txt" 2>/dev/null || true)
    [ "$got" = "$((64 << 20)) $guest_sum" ] || fail "net: guest sent sha256 $guest_sum, host received '$got'"
    echo "[$MODE] host: 64 MiB received over TCP, sha256 matches"
fi
if has vsock; then
    wait "$VSOCK_CONNECT" || fail "vsock host-connect: $(cat "$WORK/host-vsock-connect.log")"
    sed "s/^/[$MODE] host: /" "$WORK/host-vsock-connect.log"
fi
if [ "$MODE" = restricted ]; then
    for d in $DEVICES; do
        grep -q 'serving shared window' "$WORK/backend-$d.log" || fail "$d backend did not report a shared window"
    done
fi
# Every backend keeps its backend-request channel for the whole connection.
! grep -q 'Unexpected end-of-file' "$WORK/guest.txt" || fail "QEMU: Unexpected end-of-file"
echo "[$MODE] PASS: $DEVICES in a real guest in ${secs}s (QEMU $("$QEMU" --version | head -n1 | awk '{print $4}'))"
