#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser a guest, a client or the disk reaches (fuzz/).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 60), all targets by default
#
# Installs what it needs if missing (Debian packages through scripts/deps.sh; cargo-fuzz from
# crates.io), builds every target with libFuzzer on the stable toolchain (cargo-fuzz's
# `--sanitizer none`, which passes no -Z flag; debug assertions and overflow checks on), then
# runs each target for SECONDS (FUZZ_JOBS at a time, default one per CPU) on a temporary copy
# of its seed corpus (fuzz/corpus/TARGET) plus its saved crash inputs (fuzz/regressions/TARGET),
# so the inputs a run finds never touch the work tree. Prints executions, time and speed per
# target; exits non-zero if any target crashed, timed out or ran out of memory, leaving the
# input under fuzz/artifacts/TARGET/ (ignored by git) and printing the panic.
set -euo pipefail

SECS=${1:-60}
shift || true
case "$SECS" in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac
ALL_TARGETS=(tpmif_page xenstore_wire mgr_request swtpm_ctrl state_header tis_response)
TARGETS=()
# Each target once: two runs of one target would share its corpus copy and log.
for t in "${@:-${ALL_TARGETS[@]}}"; do
    case " ${TARGETS[*]} " in *" $t "*) ;; *) TARGETS+=("$t") ;; esac
done
CARGO_FUZZ_VERSION=0.13.2

cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ=$ROOT/fuzz
start=$(date +%s)

# Debian packages (a C++ compiler for libFuzzer, libtpms for the vTPM crate the state-file
# target links): the project's list.
./scripts/deps.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
echo "== $(rustc --version), $(cargo fuzz --version)"
installed=$(date +%s)

# The fuzz crate builds against the versions the main workspace has locked: its own lock
# (ignored by git) starts as a copy of the workspace's, renewed whenever that one changes.
if [ ! -f "$FUZZ/Cargo.lock" ] || [ "$ROOT/Cargo.lock" -nt "$FUZZ/Cargo.lock" ]; then
    cp "$ROOT/Cargo.lock" "$FUZZ/Cargo.lock"
fi
echo "== building the fuzz targets"
cargo fuzz build --sanitizer none --debug-assertions --target-dir "$FUZZ/target"
BIN=$FUZZ/target/$(rustc -vV | sed -n 's/^host: //p')/release
built=$(date +%s)

# The corpus copies and the state-file target's scratch directories: in memory where there is
# a tmpfs (that target writes and opens files on every run).
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
WORK=$(mktemp -d "$shm/xvtpm-fuzz.XXXXXX")
# Stopped early (a signal, an error), the targets still running stop too.
trap 'kill $(jobs -p) 2>/dev/null || true; wait; rm -rf "$WORK"' EXIT
ulimit -c 0

max_len() {
    case "$1" in
        xenstore_wire | swtpm_ctrl) echo 8400 ;;
        *) echo 4200 ;;
    esac
}

# Each target alone on one core, as many at once as there are cores: the same SECONDS each,
# in less wall time (the CI machine has two).
JOBS=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}
case "$JOBS" in '' | *[!0-9]* | 0) echo "FUZZ_JOBS must be a positive number" >&2; exit 2 ;; esac
[ "$JOBS" -le ${#TARGETS[@]} ] || JOBS=${#TARGETS[@]}
for t in "${TARGETS[@]}"; do
    if [ ! -x "$BIN/$t" ]; then
        echo "unknown target $t (known: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

# Runs one target; its summary line goes to $WORK/$t.line, and $WORK/$t.failed marks a failure.
fuzz_one() {
    local t=$1
    mkdir -p "$WORK/corpus/$t" "$WORK/artifacts/$t" "$WORK/tmp/$t"
    if [ -d "$FUZZ/corpus/$t" ]; then
        cp -R "$FUZZ/corpus/$t/." "$WORK/corpus/$t/"
    fi
    local seeds dirs log t0 t1 rc execs rate added cov line
    seeds=$(find "$WORK/corpus/$t" -type f | wc -l)
    dirs=("$WORK/corpus/$t")
    if [ -d "$FUZZ/regressions/$t" ]; then
        dirs+=("$FUZZ/regressions/$t")
    fi
    echo "== $t: ${SECS}s from $seeds seeds"
    log=$WORK/$t.log
    t0=$(date +%s.%N)
    rc=0
    TMPDIR=$WORK/tmp/$t "$BIN/$t" \
        -max_total_time="$SECS" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$WORK/artifacts/$t/" "${dirs[@]}" >"$log" 2>&1 &
    # The script's exit trap stops this job with TERM: the fuzzer goes with it.
    local pid=$!
    trap 'kill "$pid" 2>/dev/null; wait "$pid"; exit 143' TERM
    wait "$pid" || rc=$?
    t1=$(date +%s.%N)
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    execs=$(stat number_of_executed_units)
    rate=$(stat average_exec_per_sec)
    added=$(stat new_units_added)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
    line=$(printf '%-14s %10s execs %8.1fs %8s exec/s  cov %5s  +%s inputs' \
        "$t" "${execs:-?}" "$(awk "BEGIN { print $t1 - $t0 }")" "${rate:-?}" "${cov:-?}" "${added:-0}")
    if [ "$rc" != 0 ] || [ -n "$(ls -A "$WORK/artifacts/$t")" ]; then
        : >"$WORK/$t.failed"
        line="$line  FAILED (exit $rc)"
        mkdir -p "$FUZZ/artifacts/$t"
        cp -R "$WORK/artifacts/$t/." "$FUZZ/artifacts/$t/"
        cp "$log" "$FUZZ/artifacts/$t/$t.log"
        {
            echo "---- $t failed (whole log: fuzz/artifacts/$t/$t.log)"
            grep -A4 'panicked at' "$log" | head -20 || true
            grep -E '^SUMMARY|ERROR: libFuzzer|Test unit written' "$log" || true
            for a in "$WORK/artifacts/$t"/*; do
                [ -f "$a" ] || continue
                a=$FUZZ/artifacts/$t/$(basename "$a")
                echo "---- input $a ($(wc -c <"$a") bytes; replay: $BIN/$t $a)"
                od -A d -t x1 -N 256 "$a"
            done
        } >"$WORK/$t.report"
    fi
    echo "$line" >"$WORK/$t.line"
}

running=0
for t in "${TARGETS[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    fuzz_one "$t" &
    running=$((running + 1))
done
wait
failed=()
summary=()
for t in "${TARGETS[@]}"; do
    [ -f "$WORK/$t.report" ] && cat "$WORK/$t.report"
    line=$(cat "$WORK/$t.line" 2>/dev/null || echo "$t  did not report")
    # A job that stopped before its summary line failed too.
    if [ ! -f "$WORK/$t.line" ] || [ -f "$WORK/$t.failed" ]; then failed+=("$t"); fi
    summary+=("$line")
done
end=$(date +%s)

echo
echo "== fuzzing summary (${SECS}s per target, $JOBS at a time)"
printf '%s\n' "${summary[@]}"
echo "install $((installed - start))s, build $((built - installed))s, runs $((end - built))s, total $((end - start))s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (inputs under fuzz/artifacts/; keep one under fuzz/regressions/TARGET/ once fixed)" >&2
    exit 1
fi
echo "no crashes"
