#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine, then runs every check:
# formatting, clippy with warnings as errors, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v cc >/dev/null || need_pkgs+=(gcc libc6-dev)
# The ioctl layout tests compile against Linux's uapi Xen headers.
[ -f /usr/include/xen/gntdev.h ] || need_pkgs+=(linux-libc-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup or Debian's cargo) first" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
