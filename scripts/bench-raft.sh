#!/usr/bin/env bash
# Raft benchmark (figures printed, not a test): 3 `raft-kv serve` nodes over tonic on
# loopback with real fsync, put load from `raft-bench` with 1 KiB and 64 KiB values and
# 1, 16 and 256 concurrent clients; then the same load on a 3-node etcd 3.4 cluster on
# the same machine (Debian's etcd-server, installed when missing and we are root), and
# a table with our throughput as a ratio of etcd's.
#
# Each pattern gets fresh clusters, so one pattern's data (and snapshots) do not weigh
# on the next. Data directories live under target/bench-tmp on the work tree's disk, not
# on a tmpfs, so every fsync reaches the disk.
#
#   BENCH_SECONDS=5    measured seconds per pattern (after a 1 s warm-up)
#   BENCH_ETCD=auto    auto: run etcd when installed or installable; no: skip it
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-5}
ETCD_MODE=${BENCH_ETCD:-auto}
VALUE_SIZES=(1024 65536)
CLIENT_COUNTS=(1 16 256)
RAFT_PORTS=(7201 7202 7203)
ETCD_CLIENT_PORTS=(23791 23792 23793)
ETCD_PEER_PORTS=(23801 23802 23803)
# Most time one bench run may take beyond its planned length (its puts' deadline is 10 s).
RUN_SLACK_SECS=60

log() { echo "bench-raft: $*" >&2; }

cargo build --release -p raft --bins
BIN=${CARGO_TARGET_DIR:-target}/release

mkdir -p target/bench-tmp
WORK=$(mktemp -d "$PWD/target/bench-tmp/run.XXXXXX")
PIDS=()

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    rm -rf "$WORK"
    rmdir target/bench-tmp 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fs_type=$(stat -f -c %T "$WORK")
log "data under $WORK ($fs_type; $(df -h --output=source "$WORK" | tail -1))"
if [ "$fs_type" = tmpfs ]; then
    log "warning: $WORK is on tmpfs: fsync costs nothing there and the figures flatter both systems"
fi

# field LINE KEY: the value of KEY=VALUE in a raft-bench line.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

# bench WHAT VALUE_BYTES CLIENTS TARGET_ARGS...: runs raft-bench and prints its line;
# fails (printing nothing) when raft-bench did.
bench() {
    local what=$1 value=$2 clients=$3 line
    shift 3
    if line=$(timeout $((SECONDS_PER_RUN + 1 + RUN_SLACK_SECS)) "$BIN/raft-bench" "$@" \
        --value-bytes "$value" --clients "$clients" --seconds "$SECONDS_PER_RUN"); then
        log "$what: $line"
        echo "$line"
    else
        log "$what: raft-bench failed"
        return 1
    fi
}

mkdir -p "$WORK/logs"
RAFT_CLUSTER=$(for i in 1 2 3; do printf '%s=127.0.0.1:%s,' "$i" "${RAFT_PORTS[i - 1]}"; done)
RAFT_CLUSTER=${RAFT_CLUSTER%,}

# run_raft NAME VALUE_BYTES CLIENTS: a fresh raft-kv cluster, the bench against it, then
# the cluster stopped and its data removed.
run_raft() {
    local name=$1 value=$2 clients=$3 i ok=""
    for i in 1 2 3; do
        RUST_LOG=${RUST_LOG:-warn} "$BIN/raft-kv" serve --id "$i" --peers "$RAFT_CLUSTER" \
            --data "$WORK/raft-$name/node$i" 2>"$WORK/logs/raft-$name-$i.log" &
        PIDS+=($!)
    done
    for _ in $(seq 100); do
        if "$BIN/raft-kv" status --cluster "$RAFT_CLUSTER" 2>/dev/null | grep -q ': Leader '; then
            ok=1
            break
        fi
        sleep 0.2
    done
    if [ -n "$ok" ]; then
        bench "raft-kv $name" "$value" "$clients" --cluster "$RAFT_CLUSTER" || ok=""
    else
        log "raft-kv $name: no leader within 20 s"
    fi
    if [ -z "$ok" ]; then
        tail -n 5 "$WORK/logs/raft-$name-"*.log >&2 || true
    fi
    stop_all
    rm -rf "$WORK/raft-$name"
}

# run_etcd NAME VALUE_BYTES CLIENTS: the same with a fresh etcd cluster.
run_etcd() {
    local name=$1 value=$2 clients=$3 i initial="" urls=""
    for i in 1 2 3; do
        initial+="e$i=http://127.0.0.1:${ETCD_PEER_PORTS[i - 1]},"
        urls+="http://127.0.0.1:${ETCD_CLIENT_PORTS[i - 1]},"
    done
    for i in 1 2 3; do
        # Defaults otherwise (fsync of the WAL on every commit, as ours); the quota is
        # raised so that 64 KiB runs cannot fill the 2 GiB default backend.
        etcd --name "e$i" --data-dir "$WORK/etcd-$name/e$i" \
            --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORTS[i - 1]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORTS[i - 1]}" \
            --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[i - 1]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[i - 1]}" \
            --initial-cluster "${initial%,}" --initial-cluster-token "bench-$name" \
            --initial-cluster-state new --quota-backend-bytes $((8 << 30)) \
            --logger zap --log-level warn 2>"$WORK/logs/etcd-$name-$i.log" &
        PIDS+=($!)
    done
    # raft-bench waits (bounded) for etcd's leader itself.
    if ! bench "etcd $name" "$value" "$clients" --etcd "${urls%,}"; then
        tail -n 5 "$WORK/logs/etcd-$name-"*.log >&2 || true
    fi
    stop_all
    rm -rf "$WORK/etcd-$name"
}

etcd_ready() {
    case $ETCD_MODE in
        no) return 1 ;;
    esac
    command -v etcd >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "etcd not installed: installing Debian's etcd-server and etcd-client"
        # Debian's package may start a default etcd on 2379/2380; ours use other ports.
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >&2; then
            apt-get update -qq >&2 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >&2 || true
        fi
    fi
    command -v etcd >/dev/null
}

have_etcd=""
if etcd_ready; then
    have_etcd=1
    log "etcd: $(etcd --version | head -1)"
fi

# Each pattern runs on raft-kv and then at once on etcd, so that whatever else loads the
# machine meanwhile weighs on both alike. The runs write their lines to files: a run in
# $(...) would start its servers in a subshell, out of reach of the EXIT trap.
mkdir -p "$WORK/results"
PATTERNS=()
for value in "${VALUE_SIZES[@]}"; do
    for clients in "${CLIENT_COUNTS[@]}"; do
        name="$((value / 1024))KiBx$clients"
        PATTERNS+=("$name")
        run_raft "$name" "$value" "$clients" >"$WORK/results/raft-$name"
        if [ -n "$have_etcd" ]; then
            run_etcd "$name" "$value" "$clients" >"$WORK/results/etcd-$name"
        fi
    done
done

echo
echo "3 nodes on loopback, fsync on every commit; ${SECONDS_PER_RUN} s per pattern after a 1 s warm-up;" \
    "pattern = value size x clients; latency in ms"
printf '%-12s | %13s | %8s | %8s | %10s | %8s | %8s | %6s\n' \
    pattern "raft-kv ops/s" p50 p99 "etcd ops/s" p50 p99 ratio
printf '%s\n' "-------------+---------------+----------+----------+------------+----------+----------+-------"
for name in "${PATTERNS[@]}"; do
    r=$(cat "$WORK/results/raft-$name")
    e=$(cat "$WORK/results/etcd-$name" 2>/dev/null || true)
    r_ops=$(field "$r" ops_per_s)
    e_ops=$(field "$e" ops_per_s)
    ratio="-"
    if [ -n "$r_ops" ] && [ -n "$e_ops" ]; then
        ratio=$(awk -v a="$r_ops" -v b="$e_ops" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    fi
    printf '%-12s | %13s | %8s | %8s | %10s | %8s | %8s | %6s\n' "$name" \
        "${r_ops:-failed}" "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" \
        "${e_ops:--}" "$(field "$e" p50_ms)" "$(field "$e" p99_ms)" "$ratio"
done
if [ -z "$have_etcd" ]; then
    echo "etcd was unavailable (not installed and not installable here, or BENCH_ETCD=no): no comparison"
fi
