#!/usr/bin/env bash
# The same workloads on a frangipani mount (`frangipani up`: 3 Petal replicas, 3 lock
# servers, one mount) and on a plain local directory on the same disk, in the same run;
# each printed with its ratio to the local directory.
#   BENCH_FILES=5000  BENCH_SMALL=2000  BENCH_FIO_MB=1024
set -euo pipefail
cd "$(dirname "$0")/.."

FILES=${BENCH_FILES:-5000}
SMALL=${BENCH_SMALL:-2000}
FIO_MB=${BENCH_FIO_MB:-1024}
log() { echo "bench-mount: $*" >&2; }

if ! command -v fio >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y fio >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; }; fi
fi
command -v fio >/dev/null || { log "fio is needed (apt-get install fio)"; exit 1; }

cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p target/bench-tmp
WORK=$(mktemp -d "$PWD/target/bench-tmp/mount.XXXXXX")
MNT="$WORK/mnt"; LOCAL="$WORK/local"; mkdir -p "$MNT" "$LOCAL"
UP_PID=""
cleanup() {
    if [ -n "$UP_PID" ]; then kill -TERM "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi
    if grep -q " $MNT " /proc/mounts; then umount -l "$MNT" || true; fi
    rm -rf "$WORK"
    rmdir target/bench-tmp 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN/frangipani" up "$MNT" --data "$WORK/data" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 300); do grep -q " $MNT " /proc/mounts && break; sleep 0.1; done
grep -q " $MNT " /proc/mounts || { log "not mounted"; cat "$WORK/up.log"; exit 1; }

# A source tree to untar: the workspace's own sources.
tar --exclude=./target --exclude=./.git -cf "$WORK/src.tar" .

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
declare -A T
run() { # run NAME DIR
    local name=$1 dir=$2 t0 t1
    case $name in
    create) t0=$(now); (cd "$dir" && mkdir -p many && cd many && for i in $(seq "$FILES"); do : > "f$i"; done); t1=$(now) ;;
    stat) t0=$(now); (cd "$dir/many" && for i in $(seq "$FILES"); do stat -c %s "f$i" >/dev/null; done); t1=$(now) ;;
    unlink) t0=$(now); (cd "$dir/many" && for i in $(seq "$FILES"); do rm "f$i"; done); t1=$(now) ;;
    small-write) t0=$(now); (cd "$dir" && mkdir -p small && head -c 4096 /dev/urandom > "$WORK/4k" && for i in $(seq "$SMALL"); do cp "$WORK/4k" "small/s$i"; done && sync); t1=$(now) ;;
    small-read) t0=$(now); (cd "$dir/small" && cat s* >/dev/null); t1=$(now) ;;
    fio-write) t0=$(now); fio --name=w --directory="$dir" --rw=write --bs=1M --size="${FIO_MB}M" --end_fsync=1 --output=/dev/null; t1=$(now) ;;
    fio-read) t0=$(now); fio --name=w --directory="$dir" --rw=read --bs=1M --size="${FIO_MB}M" --output=/dev/null; t1=$(now) ;;
    untar) t0=$(now); (mkdir -p "$dir/tree" && tar -C "$dir/tree" -xf "$WORK/src.tar"); t1=$(now) ;;
    grep) t0=$(now); (grep -r "fn main" "$dir/tree" >/dev/null || true); t1=$(now) ;;
    rm-rf) t0=$(now); rm -rf "$dir/tree"; t1=$(now) ;;
    esac
    T["$name,$dir"]=$(secs "$t0" "$t1")
}
STEPS="create stat unlink small-write small-read fio-write fio-read untar grep rm-rf"
for step in $STEPS; do
    log "$step"
    run "$step" "$MNT"
    run "$step" "$LOCAL"
done
printf "%-12s | %12s | %12s | %s\n" workload "frangipani s" "local dir s" "speed vs local"
printf -- "-------------+--------------+--------------+---------------\n"
for step in $STEPS; do
    f=${T["$step,$MNT"]}; l=${T["$step,$LOCAL"]}
    printf "%-12s | %12.3f | %12.3f | %.3fx\n" "$step" "$f" "$l" "$(echo "$l / $f" | bc -l)"
done
echo "(create/stat/unlink: $FILES files; small: $SMALL x 4 KiB; fio: $FIO_MB MiB in 1 MiB blocks)"
