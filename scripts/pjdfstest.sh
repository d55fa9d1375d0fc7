#!/usr/bin/env bash
# Runs pjdfstest (the Rust rewrite; `cargo install pjdfstest`) against a mounted file system,
# as root, in a fresh directory under MOUNTPOINT, and prints pass/fail/skip counts with the
# failures grouped by syscall.
#
# Usage: scripts/pjdfstest.sh MOUNTPOINT [TEST_PATTERN...]
# Example: frangipani mount-memory /mnt/f & scripts/pjdfstest.sh /mnt/f
# Needs the dummy users of pjdfstest (nobody:nogroup and tests:tests); creates `tests` if
# it is missing. Full output is kept in pjdfstest.log (or $PJDFSTEST_LOG).
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT [TEST_PATTERN...]}
shift
log=${PJDFSTEST_LOG:-pjdfstest.log}
command -v pjdfstest >/dev/null || { echo "pjdfstest is not installed: cargo install pjdfstest" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root: pjdfstest switches users and changes owners" >&2; exit 2; }
nobody_group=$(id -gn nobody)
getent group tests >/dev/null || groupadd tests
getent passwd tests >/dev/null || useradd -g tests -M -N -s /usr/sbin/nologin tests

conf=$(mktemp)
# A directory on another file system, for the EXDEV cases of link and rename.
secondary=$(mktemp -d)
trap 'rm -rf "$conf" "$secondary"' EXIT
cat >"$conf" <<CONF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.001
allow_remount = false

[dummy_auth]
entries = [["nobody", "$nobody_group"], ["tests", "tests"]]
CONF

work=$(mktemp -d -p "$mnt" pjdfstest.XXXXXX)
chmod 0755 "$work"
echo "pjdfstest in $work (log: $log)"
start=$(date +%s)
set +e
(cd "$work" && pjdfstest -c "$conf" -p "$work" -s "$secondary" "$@") >"$log" 2>&1
rc=$?
set -e
echo "pjdfstest exited $rc after $(( $(date +%s) - start )) s"
grep -E '^Summary:' "$log" || echo "no summary line: see $log"
if grep -qE '\sFAILED$' "$log"; then
    echo "failures by syscall:"
    grep -E '\sFAILED$' "$log" | sed -E 's/^([a-z_0-9]+)::.*/\1/' | sort | uniq -c | sort -rn
fi
rm -rf "$work" || true
