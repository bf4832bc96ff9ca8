#!/usr/bin/env bash
# QEMU's own vhost-user-blk test suite (tests/qtest/vhost-user-blk-test.c,
# built into qos-test) against `ringfence vhost-user blk`, started through
# ringfence-qsd the way the suite starts qemu-storage-daemon.
#
# Builds QEMU 7.2 (qemu-system-x86_64 and qos-test only) from Debian
# bookworm's source package, once: the build is cached under
# target/qemu-qtest (about 5-10 minutes on 2 cores; a second run is free).
# Runs the six tests twice, each in its own process with a timeout:
#   official  the unmodified sources; Ringfence offers 1 DISCARD and 1
#             WRITE_ZEROES segment, as QEMU's own backends do
#   default   Ringfence's default 32 segments; `basic` follows the advertised
#             limit instead of assuming 1 (basic-follows-advertised-limit.patch)
# Prints "N passed, N failed" and fails if any test failed, or if QEMU
# logged "Unexpected end-of-file" (a backend-request channel dropped).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$TOP/target/qemu-qtest}
BIN=${RINGFENCE_BIN:-$TOP/target/release/ringfence}
TIMEOUT=${QTEST_TIMEOUT:-120}
mkdir -p "$OUT"

need=(meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev zlib1g-dev
      libfdt-dev flex bison dpkg-dev patch gcc seabios ipxe-qemu)
missing=()
for p in "${need[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "qemu-qtest: installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [ ! -x "$OUT/qos-test-official" ] || [ ! -x "$OUT/qos-test-default" ]; then
    SRC=$OUT/src
    if [ ! -d "$SRC"/qemu-*/ ]; then
        if [ ! -e /etc/apt/sources.list.d/ringfence-deb-src.sources ]; then
            cat > /etc/apt/sources.list.d/ringfence-deb-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            apt-get update -qq >/dev/null
        fi
        rm -rf "$SRC" && mkdir -p "$SRC"
        (cd "$SRC" && apt-get source -qq qemu >/dev/null 2>&1)
    fi
    tree=$(echo "$SRC"/qemu-*/)
    build=$tree/build
    if [ ! -x "$build/qemu-system-x86_64" ] || [ ! -x "$build/tests/qtest/qos-test" ]; then
        echo "qemu-qtest: building QEMU $(basename "$tree") (qemu-system-x86_64, qos-test)"
        mkdir -p "$build"
        (cd "$build" && ../configure --target-list=x86_64-softmmu --disable-docs \
            --enable-tools --enable-vhost-user-blk-server --disable-werror \
            --meson=meson >"$OUT/configure.log" 2>&1) \
            || { tail -20 "$OUT/configure.log"; exit 1; }
    fi
    # The official test first, then the one-line adjustment on top.
    (cd "$tree" && { patch -R -p1 -s -f --dry-run <"$HERE/basic-follows-advertised-limit.patch" >/dev/null 2>&1 \
        && patch -R -p1 -s <"$HERE/basic-follows-advertised-limit.patch"; } || true)
    ninja -C "$build" qemu-system-x86_64 tests/qtest/qos-test >"$OUT/build.log" 2>&1 \
        || { tail -20 "$OUT/build.log"; exit 1; }
    cp "$build/tests/qtest/qos-test" "$OUT/qos-test-official"
    (cd "$tree" && patch -p1 -s <"$HERE/basic-follows-advertised-limit.patch")
    ninja -C "$build" tests/qtest/qos-test >>"$OUT/build.log" 2>&1 \
        || { tail -20 "$OUT/build.log"; exit 1; }
    cp "$build/tests/qtest/qos-test" "$OUT/qos-test-default"
    (cd "$tree" && patch -R -p1 -s <"$HERE/basic-follows-advertised-limit.patch")
    mkdir -p "$OUT/bin"
    # qos-test takes the target from the binary's name; firmware comes from
    # Debian's seabios and ipxe packages (the source package carries none).
    cat >"$OUT/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
exec "$build/qemu-system-x86_64" -L /usr/share/seabios -L /usr/lib/ipxe/qemu "\$@"
EOF
    chmod +x "$OUT/bin/qemu-system-x86_64"
fi

export QTEST_QEMU_BINARY=$OUT/bin/qemu-system-x86_64
export QTEST_QEMU_STORAGE_DAEMON_BINARY=$HERE/ringfence-qsd
export RINGFENCE_BIN=$BIN
LOGS=$OUT/logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
passed=0 failed=0
for mode in official default; do
    qos=$OUT/qos-test-$mode
    case $mode in
    official) export RINGFENCE_QSD_ARGS="--max-discard-seg 1 --max-write-zeroes-seg 1" ;;
    default) export RINGFENCE_QSD_ARGS="" ;;
    esac
    mapfile -t tests < <("$qos" -l 2>/dev/null | grep '^/.*vhost-user-blk')
    [ ${#tests[@]} -eq 6 ] || { echo "qemu-qtest: expected 6 vhost-user-blk tests, found ${#tests[@]}"; exit 1; }
    for t in "${tests[@]}"; do
        name=$mode-$(basename "$t")
        # Each test in its own process, from a scratch directory (the suite
        # creates its images in the working directory).
        if (cd "$OUT" && timeout "$TIMEOUT" "$qos" -p "$t" >"$LOGS/$name.log" 2>&1); then
            if grep -q "Unexpected end-of-file" "$LOGS/$name.log"; then
                echo "FAIL $name (QEMU: Unexpected end-of-file)"
                failed=$((failed + 1))
            else
                echo "PASS $name"
                passed=$((passed + 1))
            fi
        else
            echo "FAIL $name; last lines of $LOGS/$name.log:"
            tail -5 "$LOGS/$name.log" | sed 's/^/    /'
            failed=$((failed + 1))
        fi
    done
done
echo "qemu-qtest vhost-user-blk: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
