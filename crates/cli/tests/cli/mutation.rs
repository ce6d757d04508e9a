//! A deterministic mutation test: thousands of damaged variants of corpus
//! images, read in full by the library and through `immount fsck` and
//! `immount manifest`. Every variant must end in success or a clean error:
//! no panic, no hang, no runaway memory.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use erofs::{FileType, Image};

/// How long one variant may take, in the library or through the binary.
const VARIANT_TIMEOUT: Duration = Duration::from_secs(10);

/// SplitMix64: a tiny deterministic generator, so every run tests the same
/// variants and a failure names a reproducible seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Offsets worth damaging: the superblock, every inode with its xattrs and
/// inline data, and the first bytes of every directory block.
fn metadata_offsets(image: &Image, bs: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(1024u64, 1024 + 256)];
    let _ = image.walk(&mut |_, inode| {
        let (in_mbox, iloc) = inode.location();
        if !in_mbox {
            out.push((iloc, iloc + 64 + inode.xattr_body_size() + 64));
        }
        Ok(())
    });
    out.push((0, bs * 4));
    out
}

/// Read everything an fsck or a manifest would: every inode, directory,
/// xattr, symlink and data byte. Errors are fine; the point is the rest.
fn read_everything(data: Vec<u8>, extra: Vec<Arc<dyn erofs::ReadAt>>) -> Result<u64, String> {
    let image = Image::open_with_devices(Arc::new(data), extra).map_err(|e| e.to_string())?;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    image
        .walk(&mut |_, inode| {
            image.list_xattrs(inode)?;
            let _ = image.get_xattr(inode, b"user.common")?;
            match inode.file_type() {
                FileType::Regular => {
                    let mut off = 0;
                    while off < inode.size {
                        let n = image.read(inode, off, &mut buf)?;
                        if n == 0 {
                            break;
                        }
                        off += n as u64;
                        bytes += n as u64;
                    }
                }
                FileType::Symlink => {
                    image.read_link(inode)?;
                }
                FileType::Directory => {
                    // Lookups of a few names exercise the binary search.
                    for name in [&b"a"[..], b"zzz", b".", b"e01500"] {
                        image.lookup(inode, name)?;
                    }
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, targets: &[(u64, u64)]) -> String {
    let (lo, hi) = targets[rng.below(targets.len() as u64) as usize];
    let hi = hi.min(data.len() as u64);
    let lo = lo.min(hi.saturating_sub(1));
    let at = (lo + rng.below(hi - lo)) as usize;
    match rng.below(10) {
        0..=3 => {
            let bit = rng.below(8);
            data[at] ^= 1 << bit;
            format!("flip bit {bit} at {at}")
        }
        4..=6 => {
            let v = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                _ => rng.below(256) as u8,
            };
            data[at] = v;
            format!("store 0x{v:02x} at {at}")
        }
        7..=8 => {
            let v: u32 = match rng.below(4) {
                0 => 0,
                1 => u32::MAX,
                2 => 0x8000_0000,
                _ => rng.next() as u32,
            };
            let end = (at + 4).min(data.len());
            let bytes = v.to_le_bytes();
            data[at..end].copy_from_slice(&bytes[..end - at]);
            format!("store u32 0x{v:08x} at {at}")
        }
        _ => {
            data.truncate(at);
            format!("truncate to {at}")
        }
    }
}

fn run_variant(data: Vec<u8>, extra: Vec<Arc<dyn erofs::ReadAt>>) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| read_everything(data, extra)));
            let _ = tx.send(r.map(|_| ()).map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        })
        .expect("spawn");
    match rx.recv_timeout(VARIANT_TIMEOUT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(panic)) => Err(format!("panicked: {panic}")),
        Err(_) => Err(format!("took more than {VARIANT_TIMEOUT:?}")),
    }
}

/// Run the binary on a mutated image, with a time limit.
fn run_binary(
    sub: &str,
    path: &std::path::Path,
    devices: &[std::path::PathBuf],
) -> Result<i32, String> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_immount"));
    cmd.arg(sub)
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for d in devices {
        cmd.arg("--device").arg(d);
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            let code = st
                .code()
                .ok_or_else(|| format!("killed by a signal: {err}"))?;
            if code != 0 && code != 1 {
                return Err(format!("{sub} exited {code}: {err}"));
            }
            if code == 1 && err.lines().count() != 1 {
                return Err(format!("{sub}: expected one error line, got: {err}"));
            }
            return Ok(code);
        }
        if start.elapsed() > VARIANT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{sub} took more than {VARIANT_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The images mutated, with how many variants of each.
const IMAGES: &[(&str, u64)] = &[
    ("plain", 300),
    ("compact", 250),
    ("extended", 200),
    ("bs512", 250),
    ("chunkidx", 200),
    ("48bit", 200),
    ("xprefix", 200),
    ("dotomit", 200),
    ("blobdev", 200),
    ("tar-index", 150),
    ("lz4", 120),
    ("lz4hc-big", 100),
    ("lzma", 80),
    ("deflate", 100),
    ("zstd", 100),
    ("ztail", 100),
    ("fragments", 100),
    ("allfrag", 60),
    ("dedupe", 100),
    ("legacy", 100),
    ("multialg", 80),
    ("48bit-lz4hc", 100),
    ("metabox", 100),
    ("zdir", 100),
];

#[test]
fn mutated_images_never_panic_or_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let mut total = 0u64;
    let mut failures = Vec::new();
    let mut outcomes = [0u64; 2];
    for (name, count) in IMAGES {
        let original = std::fs::read(corpus().join(format!("{name}.erofs"))).unwrap();
        let devices = devices_of(name);
        let extra_of = || -> Vec<Arc<dyn erofs::ReadAt>> {
            devices
                .iter()
                .map(|d| Arc::new(std::fs::File::open(d).unwrap()) as Arc<dyn erofs::ReadAt>)
                .collect()
        };
        let clean = Image::open_with_devices(Arc::new(original.clone()), extra_of()).unwrap();
        let targets = metadata_offsets(&clean, clean.block_size());
        let mut rng = Rng(0x1e_0f5 ^ (name.len() as u64) << 32 ^ u64::from(name.as_bytes()[0]));
        for i in 0..*count {
            let mut data = original.clone();
            let mut what = Vec::new();
            for _ in 0..=rng.below(3) {
                if data.len() < 2048 {
                    break;
                }
                what.push(mutate(&mut rng, &mut data, &targets));
            }
            let label = format!("{name} variant {i} ({})", what.join(", "));
            total += 1;
            // Every 10th variant also goes through the binary, both commands.
            if i % 10 == 0 {
                let path = tmp.path().join(format!("{name}-{i}.erofs"));
                std::fs::write(&path, &data).unwrap();
                for sub in ["fsck", "manifest"] {
                    match run_binary(sub, &path, &devices) {
                        Ok(code) => outcomes[code as usize] += 1,
                        Err(e) => failures.push(format!("{label}: {e}")),
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
            if let Err(e) = run_variant(data, extra_of()) {
                failures.push(format!("{label}: {e}"));
            }
        }
    }
    assert!(total >= 2000, "only {total} variants");
    assert!(
        failures.is_empty(),
        "{} of {total} variants failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The mutations must actually hit something: some variants are corrupt.
    assert!(
        outcomes[1] > 20,
        "too few variants were found corrupt: {outcomes:?}"
    );
    eprintln!("{total} variants; binary outcomes (clean, corrupt): {outcomes:?}");
}
