#!/usr/bin/env bash
# The main job on its embedded default. Until the QEMU-emulated Xen harness lands, this runs
# the most real thing that works: our tpmback and tpmfront, in separate processes, on the
# simulated Xen (xenstored wire protocol, grants as shared pages, event channels).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust first" >&2; exit 1; }
cargo build --release --locked -q -p xvtpm-tests --bins
exec ./target/release/xvtpm-sim-demo
