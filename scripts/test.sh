#!/usr/bin/env bash
# Runs every check and test of the workspace, as CI does.
#   RAFT_SIM_SEEDS=N            randomized Raft simulation seeds (default 500)
#   FRANGIPANI_CRASH_POINTS=N   crash points of the file system crash test (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
