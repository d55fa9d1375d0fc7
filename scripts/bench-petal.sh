#!/usr/bin/env bash
# Petal benchmark (figures printed, not a test): 3 `petal serve` replicas (release build)
# on loopback with real fsync, load through the client from `petal-bench`: 64 KiB
# sequential writes (MiB/s), 4 KiB random writes and reads (IOPS), with 1 and 16
# concurrent clients; each beside the same pattern on a local file with an fdatasync per
# request, measured in the same run, and the ratio. Target: replicated writes at 16
# clients reach at least half the local fsync'd throughput (ratio >= 0.5).
#
# Data lives under target/bench-tmp on the work tree's disk, not on a tmpfs, so every
# fsync reaches the disk, for Petal and the baseline alike.
#
#   BENCH_SECONDS=5      measured seconds per pattern (after a 1 s warm-up)
#   BENCH_CLIENTS=1,16   client counts
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CLIENTS=${BENCH_CLIENTS:-1,16}
PORTS=(7301 7302 7303)

log() { echo "bench-petal: $*" >&2; }

cargo build --release -p petal --bins
BIN=${CARGO_TARGET_DIR:-target}/release

mkdir -p target/bench-tmp
WORK=$(mktemp -d "$PWD/target/bench-tmp/petal.XXXXXX")
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

fs_type=$(stat -f -c %T "$WORK")
log "data under $WORK ($fs_type)"
if [ "$fs_type" = tmpfs ]; then
    log "warning: $WORK is on tmpfs: fsync costs nothing there and the figures flatter both sides"
fi

PEERS=""
for i in 1 2 3; do PEERS+="${PEERS:+,}$i=127.0.0.1:${PORTS[$((i-1))]}"; done
for i in 1 2 3; do
    RUST_LOG=warn "$BIN/petal" serve --id "$i" --peers "$PEERS" --data "$WORK/replica$i" \
        --snapshot-entries 20000 2>"$WORK/replica$i.log" &
    PIDS+=($!)
done
# Wait for a leader.
for _ in $(seq 100); do
    "$BIN/petal" status --cluster "$PEERS" >"$WORK/status" 2>/dev/null || true
    if grep -q Leader "$WORK/status"; then break; fi
    sleep 0.1
done
grep -q Leader "$WORK/status" || { log "no leader"; tail "$WORK"/*.log; exit 1; }

"$BIN/petal-bench" --cluster "$PEERS" --local-dir "$WORK/local" --seconds "$SECONDS_PER_RUN" --clients "$CLIENTS"
