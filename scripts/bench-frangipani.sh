#!/usr/bin/env bash
# The Frangipani library on one client over 3 Petal replicas on loopback, beside a plain
# local directory on the same disk, in the same run (figures and ratios printed).
#   BENCH_FILES=10000     files created, stat'ed and unlinked
#   BENCH_SMALL=2000      4 KiB files written and read
#   BENCH_BIG_MIB=1024    MiB written and read sequentially
set -euo pipefail
cd "$(dirname "$0")/.."

PORTS=(7401 7402 7403)
log() { echo "bench-frangipani: $*" >&2; }

cargo build --release -p petal -p frangipani --bins
BIN=${CARGO_TARGET_DIR:-target}/release

mkdir -p target/bench-tmp
WORK=$(mktemp -d "$PWD/target/bench-tmp/frangipani.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    rmdir target/bench-tmp 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "data under $WORK ($(stat -f -c %T "$WORK"))"

PEERS=""
for i in 1 2 3; do PEERS+="${PEERS:+,}$i=127.0.0.1:${PORTS[$((i-1))]}"; done
for i in 1 2 3; do
    RUST_LOG=warn "$BIN/petal" serve --id "$i" --peers "$PEERS" --data "$WORK/replica$i" \
        --snapshot-entries 20000 2>"$WORK/replica$i.log" &
    PIDS+=($!)
done
for _ in $(seq 100); do
    "$BIN/petal" status --cluster "$PEERS" >"$WORK/status" 2>/dev/null || true
    if grep -q Leader "$WORK/status"; then break; fi
    sleep 0.1
done
grep -q Leader "$WORK/status" || { log "no leader"; tail "$WORK"/*.log; exit 1; }

"$BIN/frangipani-bench" --petal "$PEERS" --local-dir "$WORK/local" \
    --files "${BENCH_FILES:-10000}" --small-files "${BENCH_SMALL:-2000}" --big-mib "${BENCH_BIG_MIB:-1024}"
