#!/usr/bin/env bash
# Builds SeaBIOS for Xen HVM guests whose TPM the vtpm serves, from Debian 12's seabios source
# package, in Debian's bios-256k.bin configuration, with two edits (docs/hvm.md, "Measured
# boot"):
#   1. Under Xen, SeaBIOS 1.16 finds the TPM and then skips TPM_Startup, the SMBIOS measurement
#      and the log's first event (src/tcgbios.c, tpm_setup): nobody starts the TPM, so every
#      measurement fails. The edit lets it start the TPM as it does on other platforms.
#   2. Xen's hvmloader 4.17 writes no TPM2 ACPI table. The domain file's `acpi_firmware=` passes
#      ours (`xvtpm hvm-acpi-table`: the log's length, address 0); the edit makes SeaBIOS, under
#      Xen, take the log's memory from its own reserved memory and write its address into the
#      table, where the guest's OS reads it.
# The result is SeaBIOS (LGPL-3); this script and the lines it inserts are ours. Beside the
# firmware it leaves what its licence asks to ship with it: the source package's name, Debian's
# copyright file of it, and the diff of the edits.
# Cached: nothing is done when OUTDIR holds a build from the same source version and script.
# Usage: build-seabios.sh OUTDIR   (writes OUTDIR/seabios-xen-tpm.{bin,diff}, seabios.copyright,
#        seabios-source.txt)
set -euo pipefail
OUT=${1:?usage: build-seabios.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
work=$OUT/seabios-src
apt_src() { # a private source list, lists and cache: the system's apt state is left alone
    mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
        >"$work/apt/sources.list"
    apt-get -qq -o Dir::Etc::sourcelist="$work/apt/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt/cache" "$@"
}
unpack() { # the source package as Debian builds it (dpkg-source checks the .dsc's checksums)
    local dsc
    dsc=$(ls "$work"/dl/seabios_*.dsc 2>/dev/null | tail -n 1)
    [ -n "$dsc" ] || return 1
    rm -rf "$work/build"
    dpkg-source --no-copy -x "$dsc" "$work/build" >/dev/null 2>&1 || return 1
    basename "$dsc" >"$work/dsc"
}
mkdir -p "$work"
if ! unpack; then
    # First use, or a download cut short: fetch it (again).
    rm -rf "$work/dl"; mkdir -p "$work/dl"
    apt_src update
    (cd "$work/dl" && apt_src source --download-only seabios) 2>&1 | grep -v unsandboxed || true
    unpack || { echo "build-seabios.sh: cannot fetch and unpack Debian's seabios source package" >&2; exit 1; }
fi
stamp="$(cat "$work/dsc") $(sha256sum "$SELF" | cut -c1-16)"
if [ -f "$OUT/seabios-xen-tpm.bin" ] && [ "$(cat "$OUT/seabios.stamp" 2>/dev/null)" = "$stamp" ]; then exit 0; fi
src=$work/build
cp "$src/src/tcgbios.c" "$work/tcgbios.c.orig"
python3 - "$src/src/tcgbios.c" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
def edit(old, new):
    global s
    assert s.count(old) == 1, f"build-seabios.sh: {old!r} is not in {p} once"
    s = s.replace(old, new)
# 1. Start the TPM under Xen too.
edit("    if (runningOnXen())\n        return;\n\n    ret = tpm_startup();", "    ret = tpm_startup();")
# 2. Under Xen, a TPM2 table with a length and no address gets a log area SeaBIOS reserves.
edit("""    dprintf(DEBUG_tcg, "TCGBIOS: TPM2: LASA = %p, LAML = %u\\n",""",
"""    if (runningOnXen() && !tpm2->log_area_start_address
        && tpm2->log_area_minimum_length) {
        /* xvtpm: the log lives in memory the OS sees reserved; the table says where. */
        void *log = memalign_high(16, tpm2->log_area_minimum_length);
        if (!log) {
            dprintf(1, "TCGBIOS: no room for a TPM2 log of %u bytes\\n",
                    tpm2->log_area_minimum_length);
            return -1;
        }
        tpm2->log_area_start_address = (u32)log;
        tpm2->checksum = 0;
        tpm2->checksum = -checksum(tpm2, tpm2->length);
    }

    dprintf(DEBUG_tcg, "TCGBIOS: TPM2: LASA = %p, LAML = %u\\n",""")
open(p, "w").write(s)
PY
(cd "$work" && diff -u --label a/src/tcgbios.c --label b/src/tcgbios.c tcgbios.c.orig build/src/tcgbios.c >"$OUT/seabios-xen-tpm.diff") || true
cd "$src"
# Debian's bios-256k.bin configuration (debian/rules: QEMU=y ROM_SIZE=256; Xen and the TCG BIOS
# are on by default); the version string says what this is.
printf 'CONFIG_QEMU=y\nCONFIG_ROM_SIZE=256\nCONFIG_XEN=y\nCONFIG_TCGBIOS=y\n' >.config
log=$work/build.log
{ make -s PYTHON="python3 -B" KCONFIG_CONFIG="$src/.config" OUT=out/ oldnoconfig &&
  grep -q '^CONFIG_TCGBIOS=y' .config && grep -q '^CONFIG_XEN=y' .config &&
  make -s -j2 PYTHON="python3 -B" EXTRAVERSION="-debian-xvtpm-tpm" KCONFIG_CONFIG="$src/.config" OUT=out/ out/bios.bin
} >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "build-seabios.sh: the build failed ($log)" >&2; exit 1; }
cp out/bios.bin "$OUT/seabios-xen-tpm.bin"
cp debian/copyright "$OUT/seabios.copyright"
echo "Debian 12 source package $(cat "$work/dsc"), edited by xvtpm's scripts/build-seabios.sh (seabios-xen-tpm.diff)" \
    >"$OUT/seabios-source.txt"
echo "$stamp" >"$OUT/seabios.stamp"
