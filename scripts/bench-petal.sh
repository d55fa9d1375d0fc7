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
#   BENCH_PATTERNS=...   a subset of seq-write-64k,rand-write-4k,rand-read-4k
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CLIENTS=${BENCH_CLIENTS:-1,16}
PATTERNS=${BENCH_PATTERNS:-seq-write-64k,rand-write-4k,rand-read-4k}
NAME=petal
PORTS=(7301 7302 7303)
cargo build --release -p petal --bins
# shellcheck source=scripts/petal-cluster.sh
source scripts/petal-cluster.sh

"$BIN/petal-bench" --cluster "$PEERS" --local-dir "$WORK/local" --seconds "$SECONDS_PER_RUN" --clients "$CLIENTS" \
    --patterns "$PATTERNS"
