#!/usr/bin/env bash
# The Frangipani library on one client over 3 Petal replicas on loopback, beside a plain
# local directory on the same disk, in the same run (figures and ratios printed).
#   BENCH_FILES=10000     files created, stat'ed and unlinked
#   BENCH_SMALL=2000      4 KiB files written and read
#   BENCH_BIG_MIB=1024    MiB written and read sequentially
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=frangipani
PORTS=(7401 7402 7403)
cargo build --release -p petal -p frangipani --bins
# shellcheck source=scripts/petal-cluster.sh
source scripts/petal-cluster.sh

"$BIN/frangipani-bench" --petal "$PEERS" --local-dir "$WORK/local" \
    --files "${BENCH_FILES:-10000}" --small-files "${BENCH_SMALL:-2000}" --big-mib "${BENCH_BIG_MIB:-1024}"
