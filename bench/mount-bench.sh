#!/bin/bash
# Mount benchmark: the kernel's EROFS driver against immount (and erofsfuse,
# squashfuse_ll when installed), on one image of a real Debian root tree.
#
# usage (root): bench/mount-bench.sh [none|lz4hc]
#   env RUNS=5          runs per driver (median reported), drivers interleaved
#   env IMMOUNT=PATH    the immount binary (default: target/release/immount,
#                       else target/release/immount-fuse, which is the same code)
#   env WORK=DIR        scratch directory (default /tmp/immount-bench)
#   env IMG=PATH        an EROFS image made already (skips making the tree)
#   env SQ=PATH         a squashfs image of the same tree for squashfuse_ll
#   env ROOTFS=DIR      the tree (for its size in the table)
#   env EROFSFUSE=PATH  erofsfuse to compare with (default: from PATH)
#   env IMMOUNT_OPTS=.. -o options for immount (e.g. lowmem)
#   env IMMOUNT_FLAGS=.. more immount mount flags (e.g. --no-sandbox)
#   env COMPARE_UNCONFINED=1  also measure immount --no-sandbox (the
#                       sandbox's cost) in the same runs: the two are
#                       measured back to back, their order alternating from
#                       run to run, and the cost is the median over runs of
#                       the paired ratio sandbox / no-sandbox (a table of its
#                       own, with the sandbox's own setup time per mount)
#   env WARM_K=5        each warm figure is the best of WARM_K repeats,
#                       taken with all drivers mounted side by side and
#                       timed in turns
#   env MOUNT_K=5       the mount figure is the median of MOUNT_K cold
#                       mounts (each after a drop of the page cache): one
#                       cold mount scatters by 20% from the disk alone. The
#                       drivers' cold mounts are taken in turns (the order
#                       reversed every other turn), like the warm figures,
#                       so that a slow spell of the disk falls on all alike
#
# For each driver it prints: time to mount, cold and warm stat walk of the
# whole tree, cold and warm read of every file (tar to a pipe), peak RSS of
# the server process, the page cache grown by one cold read of everything
# (all of the machine's "Cached": noisy when others are busy) and how much
# of the image file itself stays cached after it (fincore), and the CPU time
# the server's processes used from the mount to the end of the cold stat
# walk and of the cold read (all their threads, from
# /proc/PID/task/*/schedstat);
# then each figure's ratio to the kernel's in the same run.
# Cold means: page cache dropped and a fresh mount.
#
# Why paired ratios: on a shared machine the noise from run to run is
# 10-50% per figure, far above a 3% cost; two measurements taken back to
# back share most of it, so their ratio is steadier than a ratio of two
# medians taken minutes apart. Alternating the order cancels a drift within
# the pair (for example the page cache still settling).
#
# Needs: erofs-utils (mkfs.erofs), squashfs-tools + squashfuse (optional),
# debootstrap (through shared/bench/make-rootfs.sh), python3.
set -euo pipefail

COMP=${1:-lz4hc}
RUNS=${RUNS:-5}
WORK=${WORK:-/tmp/immount-bench}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared}
[ -d "$SHARED/bench" ] || SHARED=/work/shared

if [ -z "${IMMOUNT:-}" ]; then
    for cand in "$HERE/target/release/immount" "${CARGO_TARGET_DIR:-$HERE/target}/release/immount" \
                "${CARGO_TARGET_DIR:-$HERE/target}/release/immount-fuse"; do
        if [ -x "$cand" ] && "$cand" mount --help >/dev/null 2>&1; then IMMOUNT=$cand; break; fi
    done
fi
[ -n "${IMMOUNT:-}" ] || { echo "build immount first (cargo build --release) or set IMMOUNT" >&2; exit 2; }

mkdir -p "$WORK"
EROFSFUSE=${EROFSFUSE:-$(command -v erofsfuse || true)}
if [ -z "${IMG:-}" ]; then
    ROOTFS=${ROOTFS:-$WORK/rootfs}
    "$SHARED/bench/make-rootfs.sh" "$ROOTFS"
    IMG=$WORK/rootfs-$COMP.erofs
    if [ ! -e "$IMG" ]; then
        case $COMP in
            none) mkfs.erofs --quiet "$IMG" "$ROOTFS/" ;;
            lz4hc) mkfs.erofs --quiet -zlz4hc -C65536 "$IMG" "$ROOTFS/" ;;
            *) echo "compression must be none or lz4hc" >&2; exit 2 ;;
        esac
    fi
fi
if [ -z "${SQ:-}" ]; then
    SQ=$WORK/rootfs-$COMP.squashfs
    if command -v squashfuse_ll >/dev/null && command -v mksquashfs >/dev/null && [ ! -e "$SQ" ] \
        && [ -d "${ROOTFS:-}" ]; then
        if [ "$COMP" = none ]; then
            mksquashfs "$ROOTFS/" "$SQ" -noI -noD -noF -noX -quiet -no-progress >/dev/null
        else
            mksquashfs "$ROOTFS/" "$SQ" -comp lz4 -Xhc -b 65536 -quiet -no-progress >/dev/null
        fi
    fi
fi

DRIVERS="kernel immount"
# The sandbox's cost: immount again, unconfined, in the same runs.
[ -n "${COMPARE_UNCONFINED:-}" ] && DRIVERS="$DRIVERS immount-nosandbox"
[ -n "$EROFSFUSE" ] && [ -x "$EROFSFUSE" ] && DRIVERS="$DRIVERS erofsfuse"
command -v squashfuse_ll >/dev/null && [ -e "$SQ" ] && DRIVERS="$DRIVERS squashfuse_ll"

MP=$WORK/mnt
mkdir -p "$MP"
for d in $DRIVERS; do mkdir -p "$WORK/mnt-$d"; done
RESULTS=$WORK/results-$COMP.txt
: > "$RESULTS"
# Every timed cold mount: run, turn, driver, seconds.
MOUNTS=$WORK/mounts-$COMP.txt
: > "$MOUNTS"

now() { date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cached_kib() { awk '/^Cached:/ {print $2}' /proc/meminfo; }

# Word splitting of the flag variables is meant.
# shellcheck disable=SC2086
# do_mount DRIVER [report]: with "report" (an untimed mount) and
# COMPARE_UNCONFINED, the sandboxed immount also says its setup time, into
# $SETUP_LOG. A timed mount pays for neither: the report costs its
# formatting and printing, and opening a file for stderr costs a cold
# mount 0.45 ms (the file's directory and inode read back from disk after
# the page cache was dropped), which the unconfined one, on /dev/null, did
# not pay.
do_mount() {
    local report='' log=/dev/null
    if [ "${2:-}" = report ]; then
        report=${COMPARE_UNCONFINED:+--sandbox-report}
        log=$SETUP_LOG
    fi
    case $1 in
        kernel) mount -t erofs -o ro,loop "$IMG" "$MP" ;;
        immount) "$IMMOUNT" mount ${IMMOUNT_FLAGS:-} $report \
            ${IMMOUNT_OPTS:+-o "$IMMOUNT_OPTS"} "$IMG" "$MP" 2>"$log" ;;
        immount-nosandbox) "$IMMOUNT" mount --no-sandbox ${IMMOUNT_OPTS:+-o "$IMMOUNT_OPTS"} "$IMG" "$MP" 2>/dev/null ;;
        erofsfuse) "$EROFSFUSE" "$IMG" "$MP" >/dev/null 2>&1 ;;
        squashfuse_ll) squashfuse_ll "$SQ" "$MP" ;;
    esac
}
# A mount gone before its umount means the server died: say so, go on.
do_umount() {
    if ! mountpoint -q "$MP"; then
        echo "warning: $1: the mount was gone before umount (server died?)" >&2
        return 0
    fi
    umount "$MP" 2>/dev/null || umount -l "$MP"
    sleep 0.2
}
must_be_mounted() { mountpoint -q "$MP" || { echo "$1: mount failed" >&2; exit 1; }; }
server_pid() { pgrep -n -f -- " $MP\$" || true; }
# CPU time (s) so far of every thread of every process serving the mount
# (the confined server and its supervisor, which did the setup before it
# forked; or the one unconfined process), from schedstat (ns): unlike
# wall-clock time it hardly moves with the load of others, and it is where
# a per-request cost of the sandbox (seccomp on each syscall) shows.
cpu_s() {
    local p files=()
    for p in $(pgrep -f -- " $MP\$" || true); do files+=(/proc/"$p"/task/*/schedstat); done
    [ ${#files[@]} -gt 0 ] || { echo 0; return; }
    cat "${files[@]}" 2>/dev/null | awk '{ ns += $1 } END { printf "%.4f", ns / 1e9 }'
}
stat_walk() { find "$MP" -printf '%s %m\n' >/dev/null; }
read_all() { tar -C "$MP" -cf - . 2>/dev/null | cat >/dev/null; }
# To 0.1 ms: a warm stat walk takes 15-25 ms, where 1 ms steps would be 5%.
timed() { local t0 t1; t0=$(now); "$@"; t1=$(now); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }'; }

# Warm figures are a steady state (the server sees no request: the kernel
# answers from its caches): the best of WARM_K, so that a burst of load from
# elsewhere on a shared machine does not pass for the driver's.
WARM_K=${WARM_K:-5}
# The smallest of a list of times (split on purpose).
# shellcheck disable=SC2086
best() { printf '%s\n' $1 | sort -n | head -n1; }
# The median of a list of times (split on purpose).
# shellcheck disable=SC2086
median() { printf '%s\n' $1 | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
MOUNT_K=${MOUNT_K:-5}

# The drivers of run $1, immount and immount-nosandbox back to back in an
# order that alternates from run to run.
drivers_of_run() {
    local d out=""
    for d in $DRIVERS; do
        case $d in
            immount-nosandbox) ;;
            immount)
                if [ -z "${COMPARE_UNCONFINED:-}" ]; then out="$out immount"
                elif [ $(($1 % 2)) -eq 1 ]; then out="$out immount immount-nosandbox"
                else out="$out immount-nosandbox immount"; fi ;;
            *) out="$out $d" ;;
        esac
    done
    echo "$out"
}

# The sandbox's own setup time (µs) as `--sandbox-report` last said it.
SETUP_LOG=$WORK/sandbox-report.txt
setup_us() { { sed -n 's/.*setup time: *\([0-9]*\) µs.*/\1/p' "$SETUP_LOG" 2>/dev/null || true; } | tail -n1; }

# Whatever is still mounted when the script ends, however it ends.
cleanup() { local m; for m in "$WORK"/mnt "$WORK"/mnt-*; do mountpoint -q "$m" && umount -l "$m"; done; return 0; }
trap cleanup EXIT

for run in $(seq "$RUNS"); do
    declare -A T_MOUNT T_COLD_STAT T_COLD_READ GROWTH IMG_CACHED SETUP CPU_STAT CPU_READ RSS
    DRV=$(drivers_of_run "$run")
    # shellcheck disable=SC2086
    REV=$(printf '%s\n' $DRV | tac | tr '\n' ' ')
    # The cold figures, with nothing else mounted (a server still running
    # would keep its program's pages cached). First the mount figure: the
    # median of MOUNT_K cold mounts per driver, taken in turns.
    MP=$WORK/mnt
    declare -A T_MOUNTS
    for d in $DRV; do T_MOUNTS[$d]=; done
    for k in $(seq "$MOUNT_K"); do
        order=$DRV; [ $((k % 2)) -eq 0 ] && order=$REV
        for d in $order; do
            drop_caches
            t=$(timed do_mount "$d")
            T_MOUNTS[$d]="${T_MOUNTS[$d]} $t"
            echo "$run $k $d $t" >> "$MOUNTS"
            must_be_mounted "$d"
            do_umount "$d"
        done
    done
    for d in $DRV; do T_MOUNT[$d]=$(median "${T_MOUNTS[$d]}"); done
    # Then the other cold figures, one driver at a time.
    for d in $DRV; do
        # A stat walk on a fresh mount and cold cache.
        drop_caches
        do_mount "$d"
        must_be_mounted "$d"
        T_COLD_STAT[$d]=$(timed stat_walk)
        CPU_STAT[$d]=0; [ "$d" = kernel ] || CPU_STAT[$d]=$(cpu_s)
        do_umount "$d"
        # Read on a fresh mount and cold cache (this mount, not timed, says
        # the sandbox's setup time).
        drop_caches
        do_mount "$d" report
        must_be_mounted "$d"
        SETUP[$d]=0; [ "$d" = immount ] && SETUP[$d]=$(setup_us); SETUP[$d]=${SETUP[$d]:-0}
        before=$(cached_kib)
        T_COLD_READ[$d]=$(timed read_all)
        after=$(cached_kib)
        src=$IMG; [ "$d" = squashfuse_ll ] && src=$SQ
        IMG_CACHED[$d]=$(( $(fincore -n -b -o RES "$src" 2>/dev/null || echo 0) / 1048576 ))
        GROWTH[$d]=$(( (after - before) / 1024 ))
        pid=$(server_pid)
        CPU_READ[$d]=0; [ "$d" = kernel ] || CPU_READ[$d]=$(cpu_s)
        RSS[$d]=0
        if [ "$d" != kernel ] && [ -n "$pid" ]; then
            RSS[$d]=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        fi
        do_umount "$d"
    done
    # The warm figures: every driver mounted side by side and warmed by one
    # read and one stat walk, then timed in turns, so that a slow spell of
    # the machine, which lasts seconds, falls on all drivers alike instead
    # of on whichever was measured then.
    declare -A W_STAT W_READ
    for d in $DRV; do
        MP=$WORK/mnt-$d
        do_mount "$d"
        must_be_mounted "$d"
        read_all; stat_walk
        W_STAT[$d]=; W_READ[$d]=
    done
    for _ in $(seq "$WARM_K"); do
        for d in $DRV; do
            MP=$WORK/mnt-$d
            W_STAT[$d]="${W_STAT[$d]} $(timed stat_walk)"
            W_READ[$d]="${W_READ[$d]} $(timed read_all)"
        done
    done
    for d in $DRV; do
        MP=$WORK/mnt-$d
        do_umount "$d"
        t_warm_stat=$(best "${W_STAT[$d]}")
        t_warm_read=$(best "${W_READ[$d]}")
        echo "$run $d ${T_MOUNT[$d]} ${T_COLD_STAT[$d]} $t_warm_stat ${T_COLD_READ[$d]} $t_warm_read $((RSS[$d] / 1024)) ${GROWTH[$d]} ${IMG_CACHED[$d]} ${SETUP[$d]} ${CPU_STAT[$d]} ${CPU_READ[$d]}" >> "$RESULTS"
        echo "run $run $d: mount ${T_MOUNT[$d]} s, stat cold ${T_COLD_STAT[$d]} warm $t_warm_stat, read cold ${T_COLD_READ[$d]} warm $t_warm_read, rss ${RSS[$d]} KiB, cache +${GROWTH[$d]} MiB, image cached ${IMG_CACHED[$d]} MiB, server CPU stat ${CPU_STAT[$d]} s read ${CPU_READ[$d]} s, load $(cut -d' ' -f1 /proc/loadavg)" >&2
    done
done

echo "image: $IMG; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RESULTS" "$COMP" "$MOUNTS" "$(du -sbL "${ROOTFS:-/nonexistent}/" 2>/dev/null | tail -n1 | cut -f1)" <<'EOF'
import statistics, sys
rows, by_run = {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    values = [float(x) for x in f[2:]]
    rows.setdefault(f[1], []).append(values[:8] + values[9:11])
    by_run.setdefault(int(f[0]), {})[f[1]] = values[:8] + values[9:11] + values[8:9]
names = ["mount s", "stat cold s", "stat warm s", "read cold s", "read warm s", "server RSS MiB", "cache growth MiB", "image cached MiB", "server CPU stat s", "server CPU read s"]
med = {d: [statistics.median(c) for c in zip(*v)] for d, v in rows.items()}
k = med["kernel"]
tree = f", tree {int(sys.argv[4]) / 1e6:.0f} MB" if sys.argv[4] else ""
print(f"image: {sys.argv[2]}{tree}, median of {len(rows['kernel'])} runs")
print("| driver | " + " | ".join(names) + " |")
print("|---" * (len(names) + 1) + "|")
for d, m in med.items():
    cells = []
    for i, v in enumerate(m):
        ratio = "" if d == "kernel" or k[i] == 0 else f" ({v / k[i]:.2f}x)"
        if i < 5:
            cells.append(f"{v:.3f}{ratio}")
        elif i < 8:
            cells.append(f"{v:.0f}{ratio if i >= 6 else ''}")
        else:
            cells.append(f"{v:.3f}")
    print(f"| {d} | " + " | ".join(cells) + " |")

# The same ratios to the kernel taken run by run: the median over the runs
# of each run's ratio, and its spread. The warm figures of one run are
# taken side by side in turns, so their ratio within a run does not move
# with the machine's slow spells, which the ratio of two medians above,
# each over its own runs, can catch on one side only.
print()
print(f"ratios to the kernel, run by run: median of {len(by_run)} per-run ratios (min..max)")
print("| driver | " + " | ".join(names[:5]) + " |")
print("|---" * 6 + "|")
for d in med:
    if d == "kernel":
        continue
    cells = []
    for i in range(5):
        ratios = [r[d][i] / r["kernel"][i] for r in by_run.values() if d in r and "kernel" in r and r["kernel"][i] > 0]
        cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})" if ratios else "")
    print(f"| {d} | " + " | ".join(cells) + " |")

# The sandbox's cost: per run, the ratio of the two measurements taken back
# to back; its median over the runs, and the spread (min..max).
pairs = [r for r in by_run.values() if "immount" in r and "immount-nosandbox" in r]
if pairs:
    print()
    print(f"sandbox cost: median of {len(pairs)} paired ratios sandbox / no-sandbox (measured back to back, order alternating)")
    print("| figure | median ratio | min..max | cost |")
    print("|---|---|---|---|")
    for i, name in enumerate(names):
        if name == "image cached MiB":
            continue
        ratios = [r["immount"][i] / r["immount-nosandbox"][i] for r in pairs if r["immount-nosandbox"][i] > 0]
        if not ratios:
            continue
        m = statistics.median(ratios)
        print(f"| {name} | {m:.3f} | {min(ratios):.3f}..{max(ratios):.3f} | {100 * (m - 1):+.1f}% |")
    # The cold mount once more, from every turn rather than every run: in a
    # turn the two mounts follow each other, so each turn is a pair; the
    # interval is a bootstrap of their median (seeded: the same data always
    # gives the same interval).
    turns = {}
    for line in open(sys.argv[3]):
        run, k, d, t = line.split()
        turns.setdefault((run, k), {})[d] = float(t)
    q = [t["immount"] / t["immount-nosandbox"] for t in turns.values()
         if "immount" in t and t.get("immount-nosandbox", 0) > 0]
    if q:
        import random
        rng = random.Random(1)
        boot = sorted(statistics.median(rng.choices(q, k=len(q))) for _ in range(2000))
        m = statistics.median(q)
        print(f"mount, every turn a pair: median of {len(q)} paired ratios {m:.3f} ({100 * (m - 1):+.1f}%), "
              f"95% bootstrap interval {boot[49]:.3f}..{boot[1949]:.3f}")
    setups = [r["immount"][10] for r in pairs if r["immount"][10] > 0]
    if setups:
        print(f"sandbox::apply setup time per mount: median {statistics.median(setups):.0f} µs ({min(setups):.0f}..{max(setups):.0f})")
EOF
