#!/usr/bin/env bash
# Builds a static fio from Debian's fio source package (Debian's binary pulls
# ~70 MB of shared libraries into a busybox initramfs). Output: $OUT/fio.
set -euo pipefail
OUT=${OUT:-$(cd "$(dirname "$0")/../.." && pwd)/target/guest}
[ -x "$OUT/fio" ] && exit 0
mkdir -p "$OUT/fio-src"
if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
    signed=$(grep -m1 '^Signed-By:' /etc/apt/sources.list.d/debian.sources || true)
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n%s\n' "$signed" \
        > /etc/apt/sources.list.d/ringfence-src.sources
    apt-get update -qq >/dev/null
fi
command -v dpkg-source >/dev/null || apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
cd "$OUT/fio-src"
apt-get source -qq --download-only fio >/dev/null
dpkg-source -x --skip-patches fio_*.dsc src >/dev/null 2>&1 || dpkg-source -x fio_*.dsc src >/dev/null
cd src
./configure --build-static --disable-native >/dev/null
make -j"$(nproc)" fio >/dev/null 2>&1
cp fio "$OUT/fio"
echo "static fio in $OUT/fio"
