//! Content hashes (BLAKE3, streamed) of files and folders, with a cache keyed by path, size and
//! modification time so an unchanged multi-gigabyte checkpoint is not re-read on every plan.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: u128,
    pub hash: String,
}

/// path → stamp of the last hash computed for it.
pub type HashCache = BTreeMap<String, Stamp>;

fn stamp_of(path: &Path) -> std::io::Result<(u64, u128)> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((meta.len(), mtime))
}

pub fn hash_file(path: &Path, cache: &mut HashCache) -> std::io::Result<String> {
    let key = path.to_string_lossy().into_owned();
    let (size, mtime_ns) = stamp_of(path)?;
    if let Some(s) = cache.get(&key) {
        if s.size == size && s.mtime_ns == mtime_ns {
            return Ok(s.hash.clone());
        }
    }
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let hash = h.finalize().to_hex().to_string();
    cache.insert(
        key,
        Stamp {
            size,
            mtime_ns,
            hash: hash.clone(),
        },
    );
    Ok(hash)
}

/// Relative path → hash of every file under `dir`, skipping entries `skip` rejects.
pub fn hash_tree(
    dir: &Path,
    skip: &dyn Fn(&str) -> bool,
    cache: &mut HashCache,
) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if skip(&rel) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(rel, hash_file(&path, cache)?);
            }
        }
    }
    Ok(out)
}

/// One hash for a file or a folder's whole content.
pub fn hash_path(path: &Path, cache: &mut HashCache) -> std::io::Result<String> {
    if path.is_dir() {
        let files = hash_tree(path, &|_| false, cache)?;
        Ok(blake3::hash(
            serde_json::to_string(&files)
                .expect("map serialises")
                .as_bytes(),
        )
        .to_hex()
        .to_string())
    } else {
        hash_file(path, cache)
    }
}
