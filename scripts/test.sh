#!/usr/bin/env bash
# Runs every test of the workspace. RAFT_SIM_SEEDS raises the randomized Raft run (default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
