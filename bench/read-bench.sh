#!/bin/bash
# Read benchmark for compressed images (issue 3): read every file of an image
# of a real Debian root tree, per compression algorithm, with the kernel's
# EROFS driver and with immount (offline reader and FUSE mount), and print
# seconds, MB/s and the ratio to the kernel measured in the same run. Then
# the manifest time of fragments-heavy images: `immount manifest` against
# the kernel's mount + manifest.py walk (the issue's target: at most 3x).
#
# A benchmark, not a test: figures swing on shared machines, so it only
# reports; nothing here passes or fails on speed.
#
# usage (root: mounts and drops the page cache): bench/read-bench.sh
#   RUNS=5           runs per figure (median printed); drivers interleaved
#   ALGS="lz4hc zstd lzma lz4 deflate plain"   images to read (see img_opts)
#   DRIVERS="kernel kreadall kreadallN fsck readall readallN fuse erofsfuse"
#                    (those whose binary is missing are skipped)
#   MANIFEST_IMAGES="frag-lz4hc allfrag-lzma CORPUS/fragments.erofs CORPUS/allfrag.erofs"
#                    (a name is an image built here, a path is used as is;
#                    MANIFEST_IMAGES= skips that part, ALGS= skips the reads)
#   THREADS=N        workers of the threaded reader (default: nproc)
#   ROOTFS=DIR       the tree (default /work/bench/rootfs, made with
#                    shared/bench/make-rootfs.sh when missing)
#   IMAGES=DIR       where images are found or built (default /work/bench/images)
#   MKFS=PATH        mkfs.erofs 1.9.3 (default /work/bench/bin/mkfs.erofs, else PATH)
#   EROFSFUSE=PATH   erofsfuse 1.9.3 (default /work/bench/bin/erofsfuse, else PATH)
#   IMMOUNT=PATH     immount (default $CARGO_TARGET_DIR or target/, release)
#   READ_ALL=PATH    the read_all example of the erofs crate (same default;
#                    `cargo build --release -p erofs --example read_all`)
#   WORK=DIR         scratch: mount point, raw results (default /tmp/immount-read-bench)
#
# Drivers, each timed over the whole tree (walk + every byte of every file),
# and the kernel figure each is compared with (same method, same run):
#   kernel     mount -t erofs -o ro,loop; tar -cf - . | cat   (tar skips the data
#              when writing to /dev/null, hence the pipe)
#   kreadall   kernel mount; read_all MOUNTPOINT 1 (std::fs, one thread, 128 KiB reads)
#   kreadallN  kernel mount; read_all MOUNTPOINT $THREADS
#   fsck       immount fsck IMAGE (offline, one thread, every byte)  vs kreadall
#   readall    read_all IMAGE 1        (offline, one thread)         vs kreadall
#   readallN   read_all IMAGE $THREADS (offline, shared Image)       vs kreadallN
#   fuse       immount mount; tar | cat; umount                      vs kernel
#   erofsfuse  erofsfuse; tar | cat; umount                          vs kernel
# Two figures each:
#   cold  page cache dropped, fresh mount / fresh process
#   hot   image file already in the page cache, fresh mount / fresh process:
#         nothing decoded is cached, so this is the decode + walk cost alone.
# and, for the hot read of the offline and kreadall drivers, the CPU seconds
# spent (user + system of the reader; for the kernel also the CPU time of all
# kworker threads meanwhile, where EROFS decompresses, so approximate when
# other jobs use the kernel too). On a loaded machine with autogroup
# scheduling the kworkers do not share the session's CPU share while a
# userspace reader does, so wall-clock ratios favour the kernel there; the
# CPU ratio does not.
set -euo pipefail

RUNS=${RUNS:-5}
ALGS=${ALGS-lz4hc zstd lzma lz4 deflate plain}
DRIVERS=${DRIVERS:-kernel kreadall kreadallN fsck readall readallN fuse erofsfuse}
THREADS=${THREADS:-$(nproc)}
WORK=${WORK:-/tmp/immount-read-bench}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared}
[ -d "$SHARED/bench" ] || SHARED=/work/shared
CORPUS=$SHARED/corpus/images
MANIFEST_IMAGES=${MANIFEST_IMAGES-frag-lz4hc allfrag-lzma $CORPUS/fragments.erofs $CORPUS/allfrag.erofs}
ROOTFS=${ROOTFS:-/work/bench/rootfs}
IMAGES=${IMAGES:-/work/bench/images}
TARGET=${CARGO_TARGET_DIR:-$HERE/target}

first_exe() { for c in "$@"; do [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }; done; }
MKFS=${MKFS:-$(first_exe /work/bench/bin/mkfs.erofs "$(command -v mkfs.erofs || true)")}
EROFSFUSE=${EROFSFUSE:-$(first_exe /work/bench/bin/erofsfuse "$(command -v erofsfuse || true)")}
IMMOUNT=${IMMOUNT:-$(first_exe "$TARGET/release/immount" "$HERE/target/release/immount")}
READ_ALL=${READ_ALL:-$(first_exe "$TARGET/release/examples/read_all" "$HERE/target/release/examples/read_all")}

[ "$(id -u)" = 0 ] || { echo "read-bench.sh: run as root (mount, drop_caches)" >&2; exit 2; }
[ -n "$IMMOUNT" ] || { echo "read-bench.sh: build immount (cargo build --release -p immount) or set IMMOUNT" >&2; exit 2; }

# mkfs.erofs options of each image name; -T0 makes the images reproducible.
img_opts() {
    case $1 in
        plain) echo "-T0" ;;
        lz4) echo "-T0 -zlz4" ;;
        lz4hc) echo "-T0 -zlz4hc -C65536" ;;
        zstd) echo "-T0 -zzstd -C65536" ;;
        lzma) echo "-T0 -zlzma -C65536" ;;
        deflate) echo "-T0 -zdeflate -C65536" ;;
        frag-lz4hc) echo "-T0 -zlz4hc -Efragments,dedupe" ;;
        allfrag-lzma) echo "-T0 -zlzma -Eall-fragments" ;;
        *) return 1 ;;
    esac
}

# The image file of a name (built from the tree when missing), or a path.
image_of() {
    local name=$1 img opts
    case $name in */*) echo "$name"; return ;; esac
    img=$IMAGES/rootfs-$name.erofs
    if [ ! -e "$img" ]; then
        opts=$(img_opts "$name") || { echo "read-bench.sh: unknown image name $name" >&2; exit 2; }
        [ -n "$MKFS" ] || { echo "read-bench.sh: $img missing and no mkfs.erofs (set MKFS)" >&2; exit 2; }
        if [ ! -e "$ROOTFS/etc/debian_version" ]; then
            "$SHARED/bench/make-rootfs.sh" "$ROOTFS" >&2
        fi
        mkdir -p "$IMAGES"
        echo "building $img ($MKFS $opts)" >&2
        # shellcheck disable=SC2086 # opts is a list of options
        "$MKFS" --quiet $opts "$img.tmp" "$ROOTFS/" >&2
        mv "$img.tmp" "$img"
    fi
    echo "$img"
}

# Keep only the drivers that can run here.
active=""
for d in $DRIVERS; do
    case $d in
        kernel | fsck | fuse) active="$active $d" ;;
        readall | readallN | kreadall | kreadallN) [ -n "$READ_ALL" ] && active="$active $d" ;;
        erofsfuse) [ -n "$EROFSFUSE" ] && active="$active $d" ;;
        *) echo "read-bench.sh: unknown driver $d" >&2; exit 2 ;;
    esac
done
for d in $DRIVERS; do
    case " $active " in *" $d "*) ;; *) echo "note: driver $d skipped (binary not found)" >&2 ;; esac
done

mkdir -p "$WORK"
MP=$WORK/mnt
mkdir -p "$MP"
RESULTS=$WORK/results.txt
: > "$RESULTS"

cleanup() {
    # A FUSE server that died leaves a dead mount: lazy unmount clears both.
    if mountpoint -q "$MP"; then umount "$MP" 2>/dev/null || umount -l "$MP" || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# Sum of user + system ticks of every kworker thread.
kworker_ticks() {
    local p c
    for p in /proc/[0-9]*; do
        c=$(cat "$p/comm" 2> /dev/null) || continue
        case $c in kworker*) awk '{ print $14 + $15 }' "$p/stat" 2> /dev/null || true ;; esac
    done | awk '{ s += $1 } END { printf "%d", s }'
}
HZ=$(getconf CLK_TCK)
CPUF=$WORK/cpu.txt
# Run a command, leaving its user + system seconds in $CPUF.
cpu_timed() { /usr/bin/time -f "%U %S" -o "$CPUF" "$@"; }
cpu_of() { awk '{ printf "%.3f", $1 + $2 }' "$CPUF"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
read_tree() { tar -C "$MP" -cf - . 2>/dev/null | cat > /dev/null; }
wait_mounted() {
    local _
    for _ in $(seq 100); do mountpoint -q "$MP" && return 0; sleep 0.05; done
    echo "read-bench.sh: $MP did not get mounted" >&2
    return 1
}
do_umount() {
    umount "$MP" 2>/dev/null || umount -l "$MP"
    # A FUSE server exits after the unmount; give it the moment it needs
    # so that the next figure does not share the CPU with it.
    sleep 0.2
}
do_mount() { # driver image
    case $1 in
        kernel | kreadall | kreadallN) mount -t erofs -o ro,loop "$2" "$MP" ;;
        fuse) "$IMMOUNT" mount "$2" "$MP" ;;
        erofsfuse) "$EROFSFUSE" "$2" "$MP" > /dev/null 2>&1 ;;
    esac
    wait_mounted
}

# Time one read of the whole tree by a driver; prints seconds and CPU
# seconds ("-" when not measured).
time_read() { # driver image
    local d=$1 img=$2 t0 t1 cpu=- k0 k1
    case $d in
        kernel | fuse | erofsfuse)
            do_mount "$d" "$img"
            t0=$(now); read_tree; t1=$(now)
            do_umount
            ;;
        kreadall | kreadallN)
            do_mount kernel "$img"
            local n=1
            [ "$d" = kreadallN ] && n=$THREADS
            k0=$(kworker_ticks)
            t0=$(now); cpu_timed "$READ_ALL" "$MP" "$n" > /dev/null; t1=$(now)
            k1=$(kworker_ticks)
            cpu=$(awk -v c="$(cpu_of)" -v k=$((k1 - k0)) -v hz="$HZ" 'BEGIN { printf "%.3f", c + k / hz }')
            do_umount
            ;;
        fsck)
            t0=$(now); cpu_timed "$IMMOUNT" fsck "$img" > /dev/null; t1=$(now); cpu=$(cpu_of) ;;
        readall)
            t0=$(now); cpu_timed "$READ_ALL" "$img" 1 > /dev/null; t1=$(now); cpu=$(cpu_of) ;;
        readallN)
            t0=$(now); cpu_timed "$READ_ALL" "$img" "$THREADS" > /dev/null; t1=$(now); cpu=$(cpu_of) ;;
    esac
    awk -v a="$t0" -v b="$t1" -v c="$cpu" 'BEGIN { printf "%.3f %s\n", b - a, c }'
}

# Time a manifest of the whole tree; the kernel's includes mount and umount.
time_manifest() { # driver image
    local d=$1 img=$2 t0 t1
    case $d in
        kernel)
            t0=$(now)
            do_mount kernel "$img"
            python3 "$SHARED/corpus/manifest.py" "$MP" > /dev/null
            umount "$MP"
            t1=$(now)
            ;;
        immount)
            t0=$(now); "$IMMOUNT" manifest "$img" > /dev/null; t1=$(now) ;;
    esac
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

# Bytes of file data in an image (each hard-linked file once), as tar reads it.
data_bytes() { # image
    mount -t erofs -o ro,loop "$1" "$MP"
    find "$MP" -type f -printf '%i %s\n' | sort -u | awk '{ s += $2 } END { printf "%d", s }'
    umount "$MP"
}

echo "read-bench: $(date -u +%FT%TZ), $(nproc) cores, RUNS=$RUNS, THREADS=$THREADS" >&2
echo "immount: $IMMOUNT; read_all: ${READ_ALL:-none}; erofsfuse: ${EROFSFUSE:-none}; mkfs: ${MKFS:-none}" >&2
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
AUTOGROUP=$(cat /proc/sys/kernel/sched_autogroup_enabled 2> /dev/null || echo "?")

declare -A IMG BYTES
for a in $ALGS; do
    IMG[$a]=$(image_of "$a")
    BYTES[$a]=$(data_bytes "${IMG[$a]}")
done
for m in $MANIFEST_IMAGES; do
    IMG[$m]=$(image_of "$m")
done

for run in $(seq "$RUNS"); do
    for a in $ALGS; do
        for d in $active; do
            drop_caches
            read -r cold _ < <(time_read "$d" "${IMG[$a]}")
            read -r hot cpu < <(time_read "$d" "${IMG[$a]}")
            echo "read $a $d $cold $hot ${BYTES[$a]} $cpu" >> "$RESULTS"
            echo "run $run $a $d: cold $cold s, hot $hot s, hot cpu $cpu s" >&2
        done
    done
    for m in $MANIFEST_IMAGES; do
        for d in kernel immount; do
            drop_caches
            cold=$(time_manifest "$d" "${IMG[$m]}")
            hot=$(time_manifest "$d" "${IMG[$m]}")
            echo "manifest $(basename "${IMG[$m]}") $d $cold $hot 0 -" >> "$RESULTS"
            echo "run $run manifest $(basename "${IMG[$m]}") $d: cold $cold s, hot $hot s" >&2
        done
    done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$RESULTS" "$RUNS" "$LOAD_START" "$LOAD_END" "$AUTOGROUP" <<'EOF'
import statistics, sys
path, runs, load0, load1, autogroup = sys.argv[1:6]
rows = {}
for line in open(path):
    kind, img, drv, cold, hot, nbytes, cpu = line.split()
    cpu = float(cpu) if cpu != "-" else None
    rows.setdefault((kind, img), {}).setdefault(drv, []).append((float(cold), float(hot), int(nbytes), cpu))

def med(v, i):
    return statistics.median(x[i] for x in v)

print(f"median of {runs} runs; load average {load0} at start, {load1} at end; sched_autogroup_enabled={autogroup}")
print("lower ratio is better; 1.00 = as fast as the kernel in the same run")
print()
reads = [(k, v) for k, v in rows.items() if k[0] == "read"]
# Each driver against the kernel figure taken the same way.
BASE = {"kernel": "kernel", "fuse": "kernel", "erofsfuse": "kernel", "kreadall": "kreadall",
        "fsck": "kreadall", "readall": "kreadall", "kreadallN": "kreadallN", "readallN": "kreadallN"}
if reads:
    print("## Read every file (cold: page cache dropped, fresh mount; hot: image file cached, fresh mount,")
    print("## nothing decoded cached). ratio = time / time of the kernel figure named in `vs`.")
    print()
    print("| image | driver | vs | cold s | cold MB/s | cold ratio | hot s | hot MB/s | hot ratio | hot CPU s | CPU ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (_, img), drivers in reads:
        for drv, v in drivers.items():
            base = BASE[drv]
            k = drivers.get(base)
            c, h, n = med(v, 0), med(v, 1), v[0][2]
            cells = [img, drv, base if base != drv else "", f"{c:.3f}", f"{n / c / 1e6:.0f}" if c else "-"]
            cells.append(f"{c / med(k, 0):.2f}" if k else "-")
            cells += [f"{h:.3f}", f"{n / h / 1e6:.0f}" if h else "-"]
            cells.append(f"{h / med(k, 1):.2f}" if k else "-")
            if v[0][3] is not None:
                cpu = med(v, 3)
                cells.append(f"{cpu:.2f}")
                cells.append(f"{cpu / med(k, 3):.2f}" if k and k[0][3] is not None and med(k, 3) else "-")
            else:
                cells += ["", ""]
            print("| " + " | ".join(cells) + " |")
    print()
    print("MB = 10^6 bytes of file data, each hard-linked file once: " +
          ", ".join(f"{img} {v[next(iter(v))][0][2] / 1e6:.1f}" for (_, img), v in reads))
    print()
mans = [(k, v) for k, v in rows.items() if k[0] == "manifest"]
if mans:
    print("## Manifest of the whole tree: `immount manifest` vs kernel mount + manifest.py + umount (target: <= 3x)")
    print()
    print("| image | driver | cold s | cold ratio | hot s | hot ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for (_, img), drivers in mans:
        k = drivers.get("kernel")
        for drv, v in drivers.items():
            c, h = med(v, 0), med(v, 1)
            print(f"| {img} | {drv} | {c:.3f} | {c / med(k, 0):.2f} | {h:.3f} | {h / med(k, 1):.2f} |")
EOF
