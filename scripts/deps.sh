#!/usr/bin/env bash
# Installs the Debian 12 packages the build, the tests and the demo need, if missing.
set -euo pipefail
pkgs=()
need() { dpkg -s "$1" >/dev/null 2>&1 || pkgs+=("$1"); }
need gcc
need g++               # libFuzzer, built by the fuzz targets (scripts/fuzz.sh)
need libc6-dev
need linux-libc-dev   # Xen ioctl headers, checked by the xen crate's tests
need libxen-dev       # Xen's public headers: the domctl layout, checked by the xen crate's tests
need libtpms-dev      # the vTPM engine
need swtpm            # the reference peer in benchmarks and tests
need swtpm-dev        # tpm_ioctl.h, checked by the swtpm protocol tests
need tpm2-tools       # the TPM 2.0 client
need libtss2-tcti-swtpm0
need tpm2-abrmd       # the resource manager in the Xen test guest
need libtss2-tcti-tabrmd0
need dbus-daemon
need trousers         # tcsd, for the TPM 1.2 tests
need tpm-tools
need qemu-system-x86  # QEMU as a vTPM client (and, later, the Xen-in-QEMU harness)
need busybox-static   # VM images
need cpio
need lintian          # the package's check (scripts/package.sh, tools/tests/package.rs)
need mmdebstrap       # a clean Debian root the package is installed into
need e2fsprogs         # mkfs.ext4 and debugfs: the vTPM stub domains' disks
need make              # SeaBIOS for HVM guests' measured boot (scripts/build-seabios.sh)
need python3
need dpkg-dev          # dpkg-shlibdeps (scripts/package.sh)
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "== installing ${pkgs[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup, or Debian's cargo) first" >&2
    exit 1
fi
