# Sourced by the benchmark scripts: a scratch directory on the work tree's disk (not a
# tmpfs, so fsync reaches the disk) and 3 `petal serve` replicas on loopback, all stopped
# and removed on exit. Set NAME (log prefix, scratch name) and PORTS=(p1 p2 p3) first;
# afterwards WORK, BIN and PEERS are set and the group has a leader.

log() { echo "bench-$NAME: $*" >&2; }

BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p target/bench-tmp
WORK=$(mktemp -d "$PWD/target/bench-tmp/$NAME.XXXXXX")
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
for _ in $(seq 100); do
    "$BIN/petal" status --cluster "$PEERS" >"$WORK/status" 2>/dev/null || true
    if grep -q Leader "$WORK/status"; then break; fi
    sleep 0.1
done
grep -q Leader "$WORK/status" || { log "no leader"; tail "$WORK"/*.log; exit 1; }
