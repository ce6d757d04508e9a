#!/usr/bin/env bash
# Install the system packages that immount's tests and benchmarks use.
# Debian/Ubuntu, as root. The Rust toolchain itself is expected on PATH.
set -euo pipefail
packages=(
  fuse3          # fusermount3: mounting as a plain user
  python3        # ../shared/corpus/manifest.py, the oracle's walker
  cryptsetup-bin # veritysetup: dm-verity interoperability tests
  openssl        # certificates and signatures in the verity tests
  erofs-utils    # mkfs.erofs / fsck.erofs for the builder and benchmarks
  squashfs-tools # mksquashfs, for the squashfuse peer in benchmarks
  squashfuse     # squashfuse_ll, a peer in benchmarks
  passwd         # useradd: tests of unprivileged behaviour
  util-linux     # unshare, mount, losetup
  kmod           # modprobe fuse/erofs/loop where needed
  time           # /usr/bin/time: peak memory of crafted-image tests
  gcc            # the linker, and the C of the builder's liblz4 and libzstd
  libc6-dev
  debootstrap    # ../shared/bench/make-rootfs.sh: the Debian-tree test
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Python's varlink package: a real varlink client in the daemon's tests.
if ! python3 -c 'import varlink' 2>/dev/null; then
  python3 -m pip install --quiet varlink 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages varlink
fi
# /dev/fuse must exist for the mount tests.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
echo "system packages ready"
