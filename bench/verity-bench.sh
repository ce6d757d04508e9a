#!/usr/bin/env bash
# Cold read of every file through `immount mount`, with and without dm-verity
# checking every block, in one run.
# usage: sudo bench/verity-bench.sh [IMAGE]   (root: drop_caches, mounts)
# env: IMMOUNT (default target/release/immount; target/release/immount-fuse
#      also works, with veritysetup making the tree), RUNS (default 5),
#      NICE (default -20: the server and tar run at this niceness, so that
#      other jobs on a shared machine take little of their CPU; 0 to not)
#
# Each run measures both back to back, their order alternating from run to
# run, and the cost of verity is the median of the per-run ratios: on a
# shared machine the load changes from second to second, and two
# measurements taken back to back share most of it, so their ratio is
# steadier than the ratio of two medians (also printed). Every run's pair is
# printed too, with the load average.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
IMMOUNT=${IMMOUNT:-$here/target/release/immount}
RUNS=${RUNS:-5}
NICE=${NICE:--20}
IMG=${1:-/work/bench/images/rootfs-lz4hc.erofs}
work=$(mktemp -d)
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() { umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cp "$IMG" "$work/image.erofs"
# The tree: by immount itself, or by veritysetup when IMMOUNT is the FUSE
# server's own binary (immount-fuse has no `verity format`).
if "$IMMOUNT" verity --help >/dev/null 2>&1; then
  root=$("$IMMOUNT" verity format "$work/image.erofs" --hash-file "$work/image.tree" | awk '/Root hash/ {print $3}')
else
  root=$(veritysetup format "$work/image.erofs" "$work/image.tree" | awk '/Root hash/ {print $3}')
fi
cold_read() { # args: extra mount options
  sync; echo 3 > /proc/sys/vm/drop_caches
  # The server inherits the niceness of the mount command that starts it.
  nice -n "$NICE" "$IMMOUNT" mount "$@" "$work/image.erofs" "$mnt"
  local s e
  s=$(date +%s.%N)
  nice -n "$NICE" tar -C "$mnt" -cf - . | nice -n "$NICE" cat > /dev/null
  e=$(date +%s.%N)
  "$IMMOUNT" umount "$mnt"
  echo "$e - $s" | bc
}
verified_read() { cold_read --root-hash "$root" --verity-data "$work/image.tree"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=(); verified=(); ratios=()
echo "image: $IMG ($(du -h "$IMG" | cut -f1)), runs: $RUNS, niceness: $NICE"
for i in $(seq "$RUNS"); do
  if (( i % 2 )); then
    p=$(cold_read); v=$(verified_read)
  else
    v=$(verified_read); p=$(cold_read)
  fi
  plain+=("$p"); verified+=("$v")
  r=$(echo "$v / $p" | bc -l)
  ratios+=("$r")
  printf 'run %2d: no verity %.3f s, verity %.3f s, ratio %.2f  (load %s)\n' \
    "$i" "$p" "$v" "$r" "$(cut -d' ' -f1 /proc/loadavg)"
done
p=$(printf '%s\n' "${plain[@]}" | median)
v=$(printf '%s\n' "${verified[@]}" | median)
r=$(printf '%s\n' "${ratios[@]}" | median)
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %8.3f s\n' "cold read, no verity" "$p"
printf '%-28s %8.3f s  (ratio of medians %.2fx)\n' "cold read, verity" "$v" "$(echo "$v / $p" | bc -l)"
printf '%-28s %8.2fx\n' "verity cost, paired median" "$r"
