#!/usr/bin/env bash
# Builds the xvtpm Debian package (dpkg-deb; no debhelper): the four binaries, the systemd
# units, the default configuration, man pages and shell completions generated from the
# binaries' own clap definitions, and the maintainer scripts in packaging/deb.
#
#   scripts/package.sh                       cargo build --release, package target/release
#   scripts/package.sh --bin-dir DIR         package binaries built elsewhere (the tests
#                                            package their debug build)
#   ... --out DIR                            where the .deb goes [target/deb]
#   ... --seabios-dir DIR                    the measured-boot SeaBIOS for HVM guests, as
#                                            scripts/build-seabios.sh leaves it [built by
#                                            it, cached in target/seabios]
# Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN= OUT=target/deb SEABIOS=target/seabios
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN=$2; shift 2;;
        --out) OUT=$2; shift 2;;
        --seabios-dir) SEABIOS=$2; shift 2;;
        *) echo "usage: $0 [--bin-dir DIR] [--out DIR] [--seabios-dir DIR]" >&2; exit 2;;
    esac
done
BINS="vtpm vtpmmgr xvtpm xvtpmd"
if [ -z "$BIN" ]; then
    cargo build --release --locked -p xvtpm-vtpm -p xvtpm-vtpmmgr -p xvtpm-tools >&2
    BIN=target/release
fi
# Reproducible: the same binaries give the same .deb (file times from the changelog's date).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date -d "$(sed -n 's/^ -- .*>  //p' packaging/deb/changelog | head -n 1)" +%s)}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root; DOCS=$WORK/docs
P=packaging
mkdir -p "$ROOT/DEBIAN" "$ROOT/usr/bin" "$DOCS"
for b in $BINS; do
    install -m 0755 "$BIN/$b" "$ROOT/usr/bin/$b"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$ROOT/usr/bin/$b"
done
for b in vtpm vtpmmgr xvtpm; do "$BIN/$b" generate-docs "$DOCS"; done
"$BIN/xvtpmd" --generate-docs "$DOCS"
install -d "$ROOT/usr/share/man/man1"
for m in "$DOCS"/man1/*.1; do gzip -9n < "$m" > "$ROOT/usr/share/man/man1/$(basename "$m").gz"; done
install -d "$ROOT/usr/share/bash-completion/completions" "$ROOT/usr/share/zsh/vendor-completions" \
    "$ROOT/usr/share/fish/vendor_completions.d"
for b in $BINS; do
    install -m 0644 "$DOCS/completions/$b.bash" "$ROOT/usr/share/bash-completion/completions/$b"
    install -m 0644 "$DOCS/completions/_$b" "$ROOT/usr/share/zsh/vendor-completions/_$b"
    install -m 0644 "$DOCS/completions/$b.fish" "$ROOT/usr/share/fish/vendor_completions.d/$b.fish"
done
install -D -m 0644 $P/systemd/vtpmmgr.service "$ROOT/lib/systemd/system/vtpmmgr.service"
install -D -m 0644 $P/systemd/xvtpmd.service "$ROOT/lib/systemd/system/xvtpmd.service"
install -D -m 0644 $P/tmpfiles.conf "$ROOT/usr/lib/tmpfiles.d/xvtpm.conf"
install -D -m 0644 $P/xvtpmd.toml "$ROOT/etc/xvtpm/xvtpmd.toml"
install -D -m 0755 $P/xen/xvtpm-qemu-dm "$ROOT/usr/lib/xvtpm/xvtpm-qemu-dm"
install -D -m 0755 $P/xen/xvtpm-qemu-dm-tpm1.2 "$ROOT/usr/lib/xvtpm/xvtpm-qemu-dm-tpm1.2"
# Measured boot of HVM guests (docs/hvm.md): the firmware and the TPM2 table it fills in.
# SeaBIOS (LGPL-3) with its source's name, Debian's copyright file of it and our diff.
scripts/build-seabios.sh "$SEABIOS" >&2
install -D -m 0644 "$SEABIOS/seabios-xen-tpm.bin" "$ROOT/usr/lib/xvtpm/seabios-xen-tpm.bin"
for f in seabios-xen-tpm.diff seabios.copyright seabios-source.txt; do
    install -D -m 0644 "$SEABIOS/$f" "$ROOT/usr/share/doc/xvtpm/$f"
done
"$BIN/xvtpm" hvm-acpi-table "$ROOT/usr/lib/xvtpm/acpi-tpm2.bin"
chmod 0644 "$ROOT/usr/lib/xvtpm/acpi-tpm2.bin"
install -D -m 0644 $P/deb/copyright "$ROOT/usr/share/doc/xvtpm/copyright"
gzip -9n < $P/deb/changelog > "$ROOT/usr/share/doc/xvtpm/changelog.gz"
for s in postinst prerm postrm; do install -m 0755 "$P/deb/$s" "$ROOT/DEBIAN/$s"; done
echo /etc/xvtpm/xvtpmd.toml > "$ROOT/DEBIAN/conffiles"
# Library dependencies as dpkg-shlibdeps finds them (it wants a debian/control to exist).
mkdir -p "$WORK/src/debian"
printf 'Source: xvtpm\n\nPackage: xvtpm\nArchitecture: any\n' > "$WORK/src/debian/control"
DEPENDS=$(cd "$WORK/src" && dpkg-shlibdeps -O $(for b in $BINS; do printf -- '-e%s ' "$ROOT/usr/bin/$b"; done) 2>/dev/null \
    | sed -n 's/^shlibs:Depends=//p')
[ -n "$DEPENDS" ] || { echo "dpkg-shlibdeps found no dependencies" >&2; exit 1; }
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" -e "s/@DEPENDS@/$DEPENDS/" \
    $P/deb/control.in > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$ROOT/DEBIAN/md5sums"
chmod -R go-w "$ROOT"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$OUT"
DEB=$OUT/xvtpm_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >&2
echo "$DEB"
