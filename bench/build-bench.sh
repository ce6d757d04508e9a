#!/bin/bash
# Benchmark `immount build` against mkfs.erofs on the same tree with the same
# options, in the same run: image size and wall-clock build time, and their
# ratios (immount / mkfs.erofs; lower is better).
#
# usage: bench/build-bench.sh [TREE] [RUNS]
#   TREE  defaults to /work/bench/rootfs (the Debian tree of
#         ../shared/bench/make-rootfs.sh); RUNS (default 3) per tool and
#         option set, the best time counts.
# env:   IMMOUNT  the immount binary (default: target/release/immount)
#        MKFS     mkfs.erofs (default: /work/bench/bin/mkfs.erofs, 1.9.3)
#        SETS     option sets separated by ';' (default: see below)
#        KEEP=1   keep the images in the work directory
# Every image is also mounted by the kernel (when run as root) and compared
# with the source by manifest.py (times aside: -T fixes them), so a fast but
# wrong build cannot win.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tree=${1:-/work/bench/rootfs}
runs=${2:-3}
immount=${IMMOUNT:-$here/target/release/immount}
mkfs=${MKFS:-/work/bench/bin/mkfs.erofs}
manifest=${MANIFEST:-$here/../shared/corpus/manifest.py}
[ -f "$manifest" ] || manifest=/work/shared/corpus/manifest.py
sets=${SETS:-"-T0;-T0 -zlz4;-T0 -zlz4hc -C65536;-T0 -zlz4hc -C65536 -Eztailpacking;-T0 -zlz4hc -C65536 -Efragments,dedupe;-T0 -zlz4hc -C65536 -Ededupe;-T0 -zzstd -C65536;-T0 -zdeflate -C65536;-T0 -zlzma -C65536"}

for t in "$immount" "$mkfs"; do
    [ -x "$t" ] || { echo "missing $t" >&2; exit 2; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/build-bench.XXXXXX")
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
    mountpoint -q "$mnt" && umount "$mnt"
    [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

# Warm the page cache so that neither tool pays for the first read.
find "$tree" -type f -print0 | xargs -0 cat >/dev/null 2>&1 || true
if [ "$(id -u)" = 0 ]; then
    # -T fixes every mtime, so times are left out of the comparison.
    python3 "$manifest" "$tree" | sed -E 's/"mtime_ns": -?[0-9]+, //' >"$work/source.jsonl"
fi

now() { date +%s.%N; }
best_time() { # best_time IMAGE CMD... -> prints "best-wall best-cpu" seconds
    local img=$1 best="" cpu=""
    shift
    for _ in $(seq "$runs"); do
        rm -f "$img"
        local t0 t1 c
        t0=$(now)
        /usr/bin/time -o "$work/time" -f "%U %S" "$@" >/dev/null 2>&1
        c=$(tail -1 "$work/time" | awk '{print $1+$2}')
        t1=$(now)
        best=$(echo "$t0 $t1 ${best:-999999}" | awk '{d=$2-$1; print (d<$3)?d:$3}')
        cpu=$(echo "$c ${cpu:-999999}" | awk '{print ($1<$2)?$1:$2}')
    done
    echo "$best $cpu"
}
check() { # check IMAGE -> "ok" or "DIFF"
    [ -f "$work/source.jsonl" ] || { echo "-"; return; }
    mount -t erofs -o ro,loop "$1" "$mnt"
    python3 "$manifest" "$mnt" | sed -E 's/"mtime_ns": -?[0-9]+, //' >"$work/image.jsonl"
    if cmp -s "$work/image.jsonl" "$work/source.jsonl"; then r=ok; else r=DIFF; fi
    umount "$mnt"
    echo $r
}

printf "tree: %s (%s)\nimmount: %s\nmkfs.erofs: %s\n\n" "$tree" "$(du -sh "$tree" | cut -f1)" \
    "$immount" "$("$mkfs" --version 2>&1 | head -1)"
# The machine may be shared: CPU time (user+sys) is the steadier figure.
printf "| options | mkfs.erofs size | immount size | size ratio | mkfs.erofs wall | immount wall | wall ratio | mkfs.erofs cpu | immount cpu | cpu ratio | kernel view |\n"
printf "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
IFS=';' read -ra opts <<<"$sets"
for o in "${opts[@]}"; do
    # shellcheck disable=SC2086
    tm=$(best_time "$work/m.erofs" "$mkfs" --quiet $o "$work/m.erofs" "$tree")
    # shellcheck disable=SC2086
    ti=$(best_time "$work/i.erofs" "$immount" build -q $o "$tree" "$work/i.erofs")
    sm=$(stat -c %s "$work/m.erofs")
    si=$(stat -c %s "$work/i.erofs")
    ok=$(check "$work/i.erofs")
    awk -v o="$o" -v sm="$sm" -v si="$si" -v tm="$tm" -v ti="$ti" -v ok="$ok" 'BEGIN {
        split(tm, m, " "); split(ti, i, " ")
        printf "| `%s` | %.1f MB | %.1f MB | %.3f | %.2f s | %.2f s | %.2f | %.2f s | %.2f s | %.2f | %s |\n",
            o, sm/1e6, si/1e6, si/sm, m[1], i[1], i[1]/m[1], m[2], i[2], i[2]/m[2], ok }'
done
