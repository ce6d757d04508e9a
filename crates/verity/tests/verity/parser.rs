//! The EROFS parser behind a verified reader: the same tree and contents as
//! the plain file, and after tampering, errors instead of different bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use erofs::{FileType, Image, ReadAt};
use verity::{format_image, open_image, FormatOptions, VerityOptions};

use crate::common::copy_image;

/// Every path of the image with its file contents (or the error text).
type Contents = BTreeMap<Vec<u8>, Result<Vec<u8>, String>>;

/// The [`Contents`] of an image, or the error that stopped the walk.
fn contents(reader: Arc<dyn ReadAt>) -> Result<Contents, String> {
    let image = Image::open(reader).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    image
        .walk(&mut |path, inode| {
            let value = match inode.file_type() {
                FileType::Regular | FileType::Symlink => {
                    let mut buf = vec![0u8; usize::try_from(inode.size).unwrap_or(0).min(1 << 26)];
                    image
                        .read(inode, 0, &mut buf)
                        .map(|n| {
                            buf.truncate(n);
                            buf
                        })
                        .map_err(|e| e.to_string())
                }
                _ => Ok(Vec::new()),
            };
            out.insert(path.to_vec(), value);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn parser_sees_only_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("lz4.erofs", dir.path());
    let tree = dir.path().join("lz4.erofs.verity");
    let report = format_image(&img, Some(&tree), None, &FormatOptions::default()).unwrap();
    std::fs::write(
        dir.path().join("lz4.erofs.roothash"),
        report.root_hash.to_hex(),
    )
    .unwrap();

    let plain = contents(Arc::new(std::fs::File::open(&img).unwrap())).unwrap();
    let opened = open_image(&img, &VerityOptions::default()).unwrap();
    assert!(opened.verity.is_some());
    let verified = contents(Arc::clone(&opened.reader)).unwrap();
    assert!(
        plain == verified,
        "verified walk differs from the plain one"
    );
    assert!(plain.values().all(Result::is_ok));

    // Change one byte at a time across the image: through verity every file
    // reads back as before or fails; never different contents.
    let pristine = std::fs::read(&img).unwrap();
    let mut failures = 0;
    let mut silent_changes = 0;
    for step in 0..24u64 {
        let at = (step * 160_001 + 1_029) as usize % pristine.len();
        let mut bytes = pristine.clone();
        bytes[at] ^= 0x5a;
        std::fs::write(&img, &bytes).unwrap();
        let unverified = contents(Arc::new(std::fs::File::open(&img).unwrap()));
        if unverified
            .as_ref()
            .is_ok_and(|u| u.iter().any(|(k, v)| v.is_ok() && plain.get(k) != Some(v)))
        {
            silent_changes += 1;
        }
        let reader = open_image(&img, &VerityOptions::default()).unwrap().reader;
        match contents(reader) {
            Err(_) => failures += 1,
            Ok(seen) => {
                for (path, value) in &seen {
                    match value {
                        Ok(data) => assert_eq!(
                            plain.get(path).and_then(|v| v.as_ref().ok()),
                            Some(data),
                            "byte {at}: {} changed through verity",
                            String::from_utf8_lossy(path)
                        ),
                        Err(_) => failures += 1,
                    }
                }
                // Nothing appears that was not there.
                assert!(
                    seen.keys().all(|k| plain.contains_key(k)),
                    "byte {at}: new paths"
                );
            }
        }
    }
    assert!(failures > 0, "no tampering was detected at all");
    // Without verity, some of these changes go unnoticed: that is the point.
    assert!(silent_changes > 0, "the positions never hit file data");
}
