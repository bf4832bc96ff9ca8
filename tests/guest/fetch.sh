#!/usr/bin/env bash
# Fetches what the real-guest test needs into $OUT (default target/guest), from
# Debian's archive, without installing a kernel or QEMU on the host:
#   - qemu-system-x86 7.2 (extracted; installing it would remove the host's qemu-utils 10)
#     plus the shared libraries it needs (ordinary library packages, installed)
#   - linux-image-cloud-amd64 (vmlinuz + the virtio/ext4 modules)
#   - busybox-static
# Idempotent: a second run with everything present does nothing.
set -euo pipefail
OUT=${OUT:-$(cd "$(dirname "$0")/../.." && pwd)/target/guest}
mkdir -p "$OUT/debs" "$OUT/root"
if [ -x "$OUT/root/usr/bin/qemu-system-x86_64" ] && [ -f "$OUT/ready" ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null || true
    # Runtime libraries of qemu-system-x86 7.2 that a fresh machine lacks; none conflicts with qemu-utils 10.
    apt-get install -y -qq --no-install-recommends \
        libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgnutls30 libibverbs1 \
        libjpeg62-turbo libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1 libsasl2-2 \
        libseccomp2 libslirp0 liburing2 libvdeplug2 libzstd1 e2fsprogs cpio >/dev/null
fi
cd "$OUT/debs"
apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data seabios \
    linux-image-cloud-amd64 busybox-static >/dev/null
# The metapackage names the versioned kernel package.
kpkg=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*' | head -n1)
apt-get download -qq "$kpkg" >/dev/null
for d in *.deb; do dpkg -x "$d" "$OUT/root"; done
touch "$OUT/ready"
echo "guest tools in $OUT"
