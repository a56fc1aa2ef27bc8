#!/usr/bin/env bash
# Builds the PV stub-domain images from Debian 12 packages and our binaries:
#   vmlinuz                 Debian's kernel (what a domain file's kernel= names),
#   vmlinux                 the same kernel as an uncompressed ELF (boots faster under emulation),
#   vtpmmgr-stubdom.cpio.xz the manager domain's initramfs: busybox, vtpmmgr, its init,
#   vtpm-stubdom.cpio.xz    a vTPM domain's initramfs: busybox, vtpm with libtpms, its init.
# Each initramfs holds only its binary, the shared libraries it needs and the kernel modules
# its role loads. xz, not gzip: Xen's domain builder unpacks a gzip'd ramdisk into the
# domain's memory before the kernel unpacks it again, and leaves an xz one as it is, which
# lowers the memory a domain needs to boot by the unpacked size (9 MiB for the vTPM's).
# Cached: rebuilt when an input changes.
# Usage: build-images.sh OUTDIR BINDIR   (BINDIR holds vtpm and vtpmmgr)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-images.sh OUTDIR BINDIR}; BIN=${2:?usage: build-images.sh OUTDIR BINDIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
. "$HERE/../../tests/harness/debian-kernel.sh"
KPKG=$(kernel_package); KVER=${KPKG#linux-image-}
stamp="xz $KPKG $(cat "$HERE"/*.sh | sha256sum | cut -c1-16) $(cat "$BIN/vtpm" "$BIN/vtpmmgr" | sha256sum | cut -c1-16) $(dpkg-query -W -f='${Version} ' busybox-static libtpms0 libssl3)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ]; then exit 0; fi

fetch_kernel "$OUT" "$KPKG"
python3 "$HERE/../../tests/harness/extract-vmlinux.py" "$OUT/vmlinuz" "$OUT/vmlinux"
# The modules of the roles, from the same package.
deb=$(ls "$OUT/debs/${KPKG}"_*.deb | tail -1)
rm -rf "$OUT/mods" && mkdir -p "$OUT/mods"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$OUT/mods" --wildcards "./lib/modules/$KVER/kernel/drivers/xen/*" \
    "./lib/modules/$KVER/kernel/drivers/block/xen-blkfront.ko" "./lib/modules/$KVER/kernel/fs/ext4/*" \
    "./lib/modules/$KVER/kernel/fs/jbd2/*" "./lib/modules/$KVER/kernel/fs/mbcache.ko" \
    "./lib/modules/$KVER/kernel/lib/crc16.ko" "./lib/modules/$KVER/kernel/crypto/crc32c_generic.ko"

# role NAME INIT BINARY MODULE...: the initramfs of one role; modules load in the order given.
role() {
    local name=$1 init=$2 binary=$3; shift 3
    local S="$OUT/stage-$name" m
    new_stage "$S"
    mkdir -p "$S/lib/modules" "$S/etc" "$S/run" "$S/mnt"
    for m in "$@"; do
        cp "$(find "$OUT/mods" -name "$m.ko" | head -1)" "$S/lib/modules/"
        echo "$m" >> "$S/lib/modules/order"
    done
    strip -o "$S/bin/$(basename "$binary")" "$binary"
    copy_libs "$S" "$binary"
    install -m 755 "$HERE/$init" "$S/init"
    install -m 644 "$HERE/init-common.sh" "$S/lib/init-common.sh"
    # The kernel's xz decoder checks CRC32 only and allocates the whole dictionary: keep it small.
    ( cd "$S" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | xz --check=crc32 --lzma2=preset=9,dict=2MiB ) > "$OUT/$name.cpio.xz"
    rm -rf "$S"
}
role vtpmmgr-stubdom vtpmmgr-init.sh "$BIN/vtpmmgr" xen-blkfront xen-evtchn xen-gntdev
role vtpm-stubdom vtpm-init.sh "$BIN/vtpm" xen-blkfront crc16 mbcache jbd2 crc32c_generic ext4 \
    xen-evtchn xen-gntdev xen-gntalloc
rm -rf "$OUT/mods" "$OUT/kroot"
echo "$stamp" > "$OUT/stamp"
