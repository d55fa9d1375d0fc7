#!/usr/bin/env bash
# Runs fsx (the Rust rewrite; `cargo install fsx`) against a mounted file system: random
# reads, writes, mmap reads and writes, truncates, fsyncs, fallocates, hole punches,
# sendfile, fadvise and copy_file_range on one file, every read checked against a model.
#
# Usage: scripts/fsx.sh MOUNTPOINT [NUMOPS] [SEED]
# Defaults: 100000 operations, seed 1. Artifacts of a failure are kept in fsx-artifacts/
# (or $FSX_ARTIFACTS). Runs twice: a 256 KiB file (mostly the 4 KiB small blocks) and a
# 4 MiB one (the large block).
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT [NUMOPS] [SEED]}
ops=${2:-100000}
seed=${3:-1}
artifacts=${FSX_ARTIFACTS:-fsx-artifacts}
command -v fsx >/dev/null || { echo "fsx is not installed: cargo install fsx" >&2; exit 2; }
mkdir -p "$artifacts"
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT

status=0
for flen in 262144 4194304; do
    cat >"$conf" <<CONF
flen = $flen
[opsize]
max = 65536
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
CONF
    file="$mnt/fsx.$flen.$$"
    start=$(date +%s)
    if fsx -f "$conf" -N "$ops" -S "$seed" -P "$artifacts" "$file" >"$artifacts/fsx.$flen.log" 2>&1; then
        echo "fsx flen=$flen: $ops operations OK in $(( $(date +%s) - start )) s (seed $seed)"
    else
        echo "fsx flen=$flen: FAILED (seed $seed); last lines of $artifacts/fsx.$flen.log:"
        tail -20 "$artifacts/fsx.$flen.log"
        status=1
    fi
    rm -f "$file"
done
exit $status
