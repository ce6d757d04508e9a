#!/usr/bin/env bash
# The Debian-tree build test: `immount build`'s writer on the minimal Debian 12
# tree of ../shared/bench/make-rootfs.sh, uncompressed and with each algorithm,
# tail packing and fragments, checked against the kernel's mount, fsck.erofs and
# immount's reader (debian_tree in crates/mkfs/tests/dir.rs, #[ignore]d in the
# ordinary test run because it needs the tree and minutes).
#
# usage: scripts/debian-tree-test.sh   (root: debootstrap and mount need it)
#
# The tree is made once (debootstrap, from Debian's mirror) and kept in
# $IMMOUNT_BENCH_ROOTFS, default /var/cache/immount-rootfs. MAKE_ROOTFS names
# make-rootfs.sh when it is not at ../shared/bench beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
rootfs=${IMMOUNT_BENCH_ROOTFS:-/var/cache/immount-rootfs}
make_rootfs=${MAKE_ROOTFS:-../shared/bench/make-rootfs.sh}

if [ ! -e "$rootfs/etc/debian_version" ]; then
  if [ -e "$rootfs" ]; then
    # Not ours to delete: it may be anything the caller pointed at.
    echo "$rootfs exists but is not a Debian tree; remove it or set IMMOUNT_BENCH_ROOTFS" >&2
    exit 2
  fi
  if [ ! -f "$make_rootfs" ]; then
    echo "no make-rootfs.sh at $make_rootfs; set MAKE_ROOTFS" >&2
    exit 2
  fi
  mkdir -p "$(dirname "$rootfs")"
  # Build beside the cache and rename when complete, so that an interrupted
  # debootstrap never leaves a half tree that looks finished next time.
  partial="$rootfs.partial"
  rm -rf -- "$partial"
  echo "making the Debian tree in $rootfs (debootstrap, a few minutes)" >&2
  bash "$make_rootfs" "$partial"
  mv -- "$partial" "$rootfs"
fi

export IMMOUNT_BENCH_ROOTFS=$rootfs
start=$(date +%s)
cargo test -j2 -p immount-mkfs --test dir -- --ignored --exact debian_tree --nocapture
echo "debian_tree: $(( $(date +%s) - start ))s (build included)" >&2
