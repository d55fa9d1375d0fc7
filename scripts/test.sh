#!/usr/bin/env bash
# Runs every check and test of the workspace, as CI does.
#   RAFT_SIM_SEEDS=N            randomized Raft simulation seeds (default 500)
#   FRANGIPANI_CRASH_POINTS=N   crash points of the file system crash test (default 200)
#   CRASH_SEEDS=N               seeds per scenario of the cluster crash suite (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
# The programs the cluster tests run are built by this very command (every package with
# them has integration tests), so the crash suite need not build them again.
export CLUSTER_TESTS_PREBUILT=1
cargo test --workspace --no-fail-fast
# The crash suite once more with every process on a simulated host of its own.
CRASH_HOSTS=1 CRASH_SEEDS=1 cargo test -p cluster-tests --test crash
