#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine, then runs every check:
# formatting, clippy with warnings as errors, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --all --manifest-path fuzz/Cargo.toml -- --check
# The QEMU/Xen scenarios (they build VM images from Debian packages) are behind each crate's
# `vm-tests` feature; plain `cargo test --workspace` is the fast suite without them.
VM_TESTS=xvtpm-vtpm/vm-tests,xvtpm-tis/vm-tests,xvtpm-tools/vm-tests
echo "== cargo clippy -D warnings"
# The HVM scenario is linted too, though not run here (tools/Cargo.toml says why).
cargo clippy --workspace --all-targets --locked --features "$VM_TESTS,xvtpm-tools/hvm-tests" -- -D warnings
echo "== cargo test (with the VM scenarios)"
# The scenarios need root (mounts, Xen images, mmdebstrap); so do the sandbox's tests, which
# this makes fail rather than skip if the command ever runs as another user.
export XVTPM_TESTS_AS_ROOT=1
cargo test --workspace --locked --features "$VM_TESTS"
# Every parser a guest, a client or the disk reaches, coverage-guided (fuzz/), 60 s each.
echo "== fuzzing"
./scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
