#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine, then runs every check:
# formatting, clippy with warnings as errors, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
