#!/bin/bash
# The sandbox's cost on the mount path: immount with and without
# --no-sandbox, measured in pairs back to back.
#
# usage (root): bench/sandbox-cost.sh [IMAGE]
#   IMAGE / env IMG     the EROFS image (default
#                       /work/bench/images/rootfs-lz4hc.erofs)
#   env N=30            pairs
#   env IMMOUNT=PATH    the immount binary (default: target/release/immount,
#                       then $CARGO_TARGET_DIR/release/immount)
#   env MP=DIR          the mountpoint (default: a fresh temporary directory)
#   env DROP_CACHES=1   drop the page cache before each mount (default 0:
#                       "cold-ish", the server and its mount are fresh but
#                       the image file and the binary stay cached, which is
#                       what makes 1% visible at all)
#
# Per mount: the time `immount mount IMAGE MP` takes to return (the server
# confined and ready), then the time of a stat walk of the whole tree
# (`find MP -printf ''`) on that fresh mount, then umount.
#
# Why pairs: on a shared machine two measurements taken back to back share
# most of the noise, so the ratio within a pair is steadier than a ratio of
# two medians; the order inside a pair alternates, so that a drift within a
# pair cancels. The figure to read is the median of the per-pair ratios
# (sandbox / no-sandbox); the medians of each side are printed as well.
set -euo pipefail

IMG=${1:-${IMG:-/work/bench/images/rootfs-lz4hc.erofs}}
N=${N:-30}
DROP_CACHES=${DROP_CACHES:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${IMMOUNT:-}" ]; then
    for cand in "$HERE/target/release/immount" "${CARGO_TARGET_DIR:-$HERE/target}/release/immount"; do
        if [ -x "$cand" ]; then IMMOUNT=$cand; break; fi
    done
fi
[ -n "${IMMOUNT:-}" ] || { echo "build immount first (cargo build --release) or set IMMOUNT" >&2; exit 2; }
[ -r "$IMG" ] || { echo "no image $IMG" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root (the confined path forks from a root server)" >&2; exit 2; }

OWN_MP=
if [ -z "${MP:-}" ]; then
    MP=$(mktemp -d /tmp/sandbox-cost.XXXXXX)
    OWN_MP=1
fi
RESULTS=$(mktemp /tmp/sandbox-cost-results.XXXXXX)
ERRS=$(mktemp /tmp/sandbox-cost-errors.XXXXXX)

cleanup() {
    # Always leave nothing mounted, even after a failure or ^C.
    while mountpoint -q "$MP" 2>/dev/null; do
        umount "$MP" 2>/dev/null || umount -l "$MP" 2>/dev/null || break
    done
    [ -n "$OWN_MP" ] && rmdir "$MP" 2>/dev/null
    rm -f "$RESULTS" "$ERRS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s%N; }

# One mount, walk and umount; prints "mount_ns walk_ns".
measure() {
    local flags=$1 t0 t1 t2
    [ "$DROP_CACHES" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    t0=$(now)
    # shellcheck disable=SC2086  # $flags is empty or one flag
    # stderr aside: the --no-sandbox warning is expected (not shown 2N
    # times), any other message is shown if the mount fails.
    "$IMMOUNT" mount $flags "$IMG" "$MP" 2>"$ERRS" || { cat "$ERRS" >&2; return 1; }
    t1=$(now)
    find "$MP" -printf ''
    t2=$(now)
    umount "$MP"
    # The server exits once unmounted; let it go before the next mount.
    while mountpoint -q "$MP"; do sleep 0.01; done
    echo "$((t1 - t0)) $((t2 - t1))"
}

# A warm-up pair, not counted: the binary and the image into the cache.
measure "" >/dev/null
measure "--no-sandbox" >/dev/null

for i in $(seq 1 "$N"); do
    # (assignments, so that a failed mount stops the script: set -e)
    if [ $((i % 2)) = 1 ]; then
        s=$(measure "")
        u=$(measure "--no-sandbox")
    else
        u=$(measure "--no-sandbox")
        s=$(measure "")
    fi
    read -r sm sw <<< "$s"
    read -r um uw <<< "$u"
    echo "$sm $sw $um $uw" >> "$RESULTS"
done

python3 - "$RESULTS" "$N" "$IMG" <<'EOF'
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
n, img = sys.argv[2], sys.argv[3]
print(f"sandbox cost, {len(rows)} pairs, {img}")
# The median's standard error, from a robust spread (IQR / 1.349): the
# ratio resolves a difference a few times larger than it.
print(f"{'figure':<10} {'sandbox':>12} {'no-sandbox':>12} {'ratio (median of pairs)':>24} {'+-se':>7} {'q1..q3':>16}")
for name, s, u in (("mount", 0, 2), ("stat walk", 1, 3)):
    ratios = sorted(r[s] / r[u] for r in rows)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    ms = lambda col: statistics.median(r[col] for r in rows) / 1e6
    se = 1.2533 * (q[2] - q[0]) / 1.349 / len(ratios) ** 0.5
    print(f"{name:<10} {ms(s):>9.2f} ms {ms(u):>9.2f} ms {statistics.median(ratios):>24.4f} {se:>7.4f} {q[0]:>7.4f}..{q[2]:.4f}")
EOF
