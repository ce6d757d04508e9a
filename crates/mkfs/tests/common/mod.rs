//! Shared helpers: the corpus tree, kernel mounts with an unmount guard,
//! manifests, fsck, and a comparison of immount's reader with the mount.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

pub const CORPUS: &str = "/work/shared/corpus";

/// True when running as root (mounting needs it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True, after saying so, when a test that mounts must be skipped (not
/// root).
pub fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root to mount");
        return true;
    }
    false
}

/// Generate the corpus tree into `dest` (must not exist).
pub fn gen_tree(dest: &Path) {
    let st = Command::new(format!("{CORPUS}/gen_tree.py"))
        .arg(dest)
        .status()
        .expect("run gen_tree.py");
    assert!(st.success(), "gen_tree.py failed");
}

/// manifest.py over `root`.
pub fn manifest(root: &Path) -> String {
    let out = Command::new("python3")
        .arg(format!("{CORPUS}/manifest.py"))
        .arg(root)
        .output()
        .expect("run manifest.py");
    assert!(
        out.status.success(),
        "manifest.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A kernel mount that is always unmounted, even when the test panics.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(image: &Path, dir: &Path) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "kernel refused the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// fsck.erofs must accept the image: Debian's (erofs-utils 1.5) when the
/// image uses only what 1.5 knows (4 KiB blocks, LZ4 or LZMA, no fragments),
/// and erofs-utils 1.9.3 from the benchmark directory when it is there.
pub fn fsck(image: &Path, debian_knows_it: bool) {
    let mut tools = Vec::new();
    if debian_knows_it {
        tools.push(PathBuf::from("fsck.erofs"));
    }
    let newer = PathBuf::from("/work/bench/bin/fsck.erofs");
    if newer.exists() {
        tools.push(newer);
    }
    for tool in tools {
        let out = Command::new(&tool)
            .arg(image)
            .output()
            .expect("run fsck.erofs (apt-get install erofs-utils)");
        assert!(
            out.status.success(),
            "{} rejected {}: {}{}",
            tool.display(),
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Compare immount's reader with the kernel's mount, file by file: type,
/// mode, ids, size, times, link counts, nids of hard links, contents,
/// symlink targets, device numbers and xattrs.
pub fn reader_agrees(image: &Path, mnt: &Path) {
    let file = fs::File::open(image).unwrap();
    let img = erofs::Image::open(Arc::new(file)).expect("reader opens the image");
    let mut count = 0usize;
    let mut ino_of_nid: BTreeMap<u64, u64> = BTreeMap::new();
    img.walk(&mut |path, inode| {
        count += 1;
        let rel = std::str::from_utf8(path).unwrap().trim_start_matches('/');
        let p = mnt.join(rel);
        let st = fs::symlink_metadata(&p).unwrap();
        assert_eq!(inode.mode, st.mode(), "{rel}: mode");
        assert_eq!(inode.uid, st.uid(), "{rel}: uid");
        assert_eq!(inode.gid, st.gid(), "{rel}: gid");
        assert_eq!(u64::from(inode.nlink), st.nlink(), "{rel}: nlink");
        assert_eq!(inode.mtime, st.mtime(), "{rel}: mtime");
        assert_eq!(i64::from(inode.mtime_nsec), st.mtime_nsec(), "{rel}: nsec");
        let prev = ino_of_nid.insert(inode.nid, st.ino());
        assert!(prev.is_none() || prev == Some(st.ino()), "{rel}: hard link");
        match inode.file_type() {
            erofs::FileType::Regular => {
                assert_eq!(inode.size, st.len(), "{rel}: size");
                let want = fs::read(&p).unwrap();
                let mut got = vec![0u8; want.len()];
                let mut off = 0;
                while off < got.len() {
                    let n = img.read(inode, off as u64, &mut got[off..]).unwrap();
                    assert!(n > 0, "{rel}: short read at {off}");
                    off += n;
                }
                assert!(got == want, "{rel}: contents differ");
            }
            erofs::FileType::Symlink => {
                let want = fs::read_link(&p).unwrap();
                let got = img.read_link(inode).unwrap();
                assert_eq!(got, want.as_os_str().as_encoded_bytes(), "{rel}: target");
            }
            erofs::FileType::CharDevice | erofs::FileType::BlockDevice => {
                assert_eq!(
                    (inode.rdev_major(), inode.rdev_minor()),
                    (rustix::fs::major(st.rdev()), rustix::fs::minor(st.rdev())),
                    "{rel}: rdev"
                );
            }
            _ => {}
        }
        let mut got: Vec<(Vec<u8>, Vec<u8>)> = img
            .list_xattrs(inode)
            .unwrap()
            .into_iter()
            .map(|x| (x.name, x.value))
            .collect();
        got.sort();
        let mut want = Vec::new();
        for name in xattr::list(&p) {
            let v = xattr::get(&p, &name);
            want.push((name, v));
        }
        want.sort();
        assert_eq!(got, want, "{rel}: xattrs");
        Ok(())
    })
    .expect("reader walks the image");
    assert!(count > 1, "the reader saw only {count} inodes");
}

/// xattrs through rustix, without following symlinks.
pub mod xattr {
    use std::path::Path;

    pub fn list(p: &Path) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 16];
        let n = rustix::fs::llistxattr(p, &mut buf).unwrap();
        buf[..n]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| n.to_vec())
            .collect()
    }

    pub fn get(p: &Path, name: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        let name = std::ffi::OsStr::new(std::str::from_utf8(name).unwrap());
        let n = rustix::fs::lgetxattr(p, name, &mut buf).unwrap();
        buf[..n].to_vec()
    }
}

/// The corpus tree, generated once per test binary into a shared tempdir.
pub fn corpus_tree() -> &'static Path {
    use std::sync::OnceLock;
    static TREE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = TREE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tree");
        gen_tree(&p);
        (dir, p)
    });
    p
}

/// Build `src` with `opts`, check kernel + fsck + reader, and return the
/// image bytes. `expect_manifest` is the source's manifest.
pub fn build_and_check(src: &Path, opts: &mkfs::Options, work: &Path) -> Vec<u8> {
    let tree = mkfs::scan_dir(src).unwrap();
    let image = work.join("img.erofs");
    mkfs::build_image(&tree, &image, opts).unwrap();
    let debian = opts.block_size == 4096
        && opts.compress.as_ref().is_none_or(|c| {
            matches!(
                c.algorithm,
                mkfs::Algorithm::Lz4 | mkfs::Algorithm::Lz4hc | mkfs::Algorithm::Lzma
            ) && !c.fragments
        });
    check_image(&image, &manifest(src), work, debian);
    fs::read(&image).unwrap()
}

/// Kernel mount equals `want` (a manifest), fsck accepts, reader agrees.
pub fn check_image(image: &Path, want: &str, work: &Path, debian_fsck: bool) {
    // MKFS_KEEP=DIR keeps a copy of every checked image for debugging.
    if let Some(dir) = std::env::var_os("MKFS_KEEP") {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let _ = fs::copy(image, Path::new(&dir).join(format!("{n}.erofs")));
    }
    fsck(image, debian_fsck);
    let mnt = Mount::new(image, &work.join("mnt"));
    let got = manifest(&mnt.dir);
    if got != want {
        let g: Vec<&str> = got.lines().collect();
        let w: Vec<&str> = want.lines().collect();
        let diffs: Vec<String> = w
            .iter()
            .zip(g.iter())
            .filter(|(a, b)| a != b)
            .take(5)
            .map(|(a, b)| format!("want {a}\n got {b}"))
            .collect();
        panic!(
            "kernel manifest differs ({} vs {} lines):\n{}",
            w.len(),
            g.len(),
            diffs.join("\n")
        );
    }
    reader_agrees(image, &mnt.dir);
}
