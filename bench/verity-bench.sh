#!/usr/bin/env bash
# Cold read of every file through `immount mount`, with and without dm-verity
# checking every block, in one run (drivers interleaved, median of RUNS).
# usage: sudo bench/verity-bench.sh [IMAGE]   (root: drop_caches, mounts)
# env: IMMOUNT (default target/release/immount; target/release/immount-fuse
#      also works, with veritysetup making the tree), RUNS (default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
IMMOUNT=${IMMOUNT:-$here/target/release/immount}
RUNS=${RUNS:-5}
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
  "$IMMOUNT" mount "$@" "$work/image.erofs" "$mnt"
  local s e
  s=$(date +%s.%N); tar -C "$mnt" -cf - . | cat > /dev/null; e=$(date +%s.%N)
  "$IMMOUNT" umount "$mnt"
  echo "$e - $s" | bc
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=(); verified=()
for _ in $(seq "$RUNS"); do
  plain+=("$(cold_read)")
  verified+=("$(cold_read --root-hash "$root" --verity-data "$work/image.tree")")
done
p=$(printf '%s\n' "${plain[@]}" | median)
v=$(printf '%s\n' "${verified[@]}" | median)
echo "image: $IMG ($(du -h "$IMG" | cut -f1)), runs: $RUNS, load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %8s s\n' "cold read, no verity" "$p"
printf '%-28s %8s s  (%.2fx)\n' "cold read, verity" "$v" "$(echo "$v / $p" | bc -l)"
