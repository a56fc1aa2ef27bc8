#!/usr/bin/env bash
# Builds SeaBIOS for Xen HVM guests whose TPM the vtpm serves, from Debian 12's seabios source
# package, as Debian builds its bios-256k.bin, with two edits (docs/hvm.md, "Measured boot"):
#   1. Under Xen, SeaBIOS 1.16 finds the TPM and then skips TPM_Startup, the SMBIOS measurement
#      and the log's first event (src/tcgbios.c, tpm_setup): nobody starts the TPM, so every
#      measurement fails. The edit lets it start the TPM as it does on other platforms.
#   2. Xen's hvmloader 4.17 writes no TPM2 ACPI table. The domain file's `acpi_firmware=` passes
#      ours (xvtpm's `acpi-tpm2.bin`: the log's length, address 0); the edit makes SeaBIOS, under
#      Xen, take the log's memory from its own reserved memory and write its address into the
#      table, where the guest's OS reads it.
# The result is SeaBIOS (LGPL-3.0); this script and the lines it inserts are ours.
# Cached: nothing is done when OUTDIR holds a build from the same source version and script.
# Usage: build-seabios.sh OUTDIR   (writes OUTDIR/seabios-xen-tpm.bin)
set -euo pipefail
OUT=${1:?usage: build-seabios.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
work=$OUT/seabios-src
apt_src() {
    mkdir -p "$work/apt/lists/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
        >"$work/apt/sources.list"
    apt-get -qq -o Dir::Etc::sourcelist="$work/apt/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$work/apt/lists" "$@"
}
mkdir -p "$work"
if ! ls "$work"/seabios_*.dsc >/dev/null 2>&1; then
    apt_src update
    (cd "$work" && apt_src source --download-only seabios 2>&1 | grep -v unsandboxed || true)
fi
dsc=$(ls "$work"/seabios_*.dsc | tail -1)
stamp="$(basename "$dsc") $(sha256sum "$SELF" | cut -c1-16)"
if [ -f "$OUT/seabios-xen-tpm.bin" ] && [ "$(cat "$OUT/seabios.stamp" 2>/dev/null)" = "$stamp" ]; then exit 0; fi
src=$work/build
rm -rf "$src"; mkdir -p "$src"
tar -xzf "$(ls "$work"/seabios_*.orig.tar.gz | tail -1)" -C "$src" --strip-components=1
python3 - "$src/src/tcgbios.c" <<'EOF'
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
        if (!log)
            return -1;
        tpm2->log_area_start_address = (u32)log;
        tpm2->checksum = 0;
        tpm2->checksum = -checksum(tpm2, tpm2->length);
    }

    dprintf(DEBUG_tcg, "TCGBIOS: TPM2: LASA = %p, LAML = %u\\n",""")
if '#include "malloc.h"' not in s:
    edit('#include "fw/paravirt.h" // runningOnXen', '#include "fw/paravirt.h" // runningOnXen\n#include "malloc.h" // memalign_high')
open(p, "w").write(s)
EOF
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
echo "$stamp" >"$OUT/seabios.stamp"
