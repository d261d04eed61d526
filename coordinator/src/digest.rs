//! The served model's content digest: SHA-256 over its bytes (a GGUF file, or every file
//! of a safetensors directory with its name), so a worker's slice cache is keyed by what
//! the bytes are, not by where they lie. Reading a 40 GB model takes a while, so a digest
//! is remembered in the state directory under the file's path, length and modification
//! time, and a restart reads nothing.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::info;

use crate::error::{Error, Result};

/// Where digests are remembered, inside the state directory.
const REMEMBERED: &str = "model-digests.json";

/// The files whose bytes make up the model, in a fixed order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// What identifies one version of the model's files without reading them.
fn stamp(files: &[PathBuf]) -> Result<String> {
    let mut parts = Vec::new();
    for f in files {
        let m = fs::metadata(f)?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let path = fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        parts.push(format!("{}|{}|{mtime}", path.display(), m.len()));
    }
    Ok(parts.join(";"))
}

fn hash(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        if let Some(name) = f.file_name() {
            h.update(name.to_string_lossy().as_bytes());
            h.update([0]);
        }
        let mut r = File::open(f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn remembered(state_dir: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(state_dir.join(REMEMBERED))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Writes the remembered digests atomically, owner-only.
fn remember(state_dir: &Path, map: &BTreeMap<String, String>) -> Result<()> {
    fs::create_dir_all(state_dir)?;
    let path = state_dir.join(REMEMBERED);
    let tmp = state_dir.join(format!("{REMEMBERED}.tmp"));
    let text = serde_json::to_string_pretty(map)
        .map_err(|e| Error::Unavailable(format!("writing {}: {e}", path.display())))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_owner_only()
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

/// Opening a file readable by its owner only (where the system has modes).
trait OwnerOnly {
    fn mode_owner_only(&mut self) -> &mut Self;
}

impl OwnerOnly for fs::OpenOptions {
    #[cfg(unix)]
    fn mode_owner_only(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
    #[cfg(not(unix))]
    fn mode_owner_only(&mut self) -> &mut Self {
        self
    }
}

/// The model's content digest (hex SHA-256), remembered in `state_dir`.
pub fn of_model(path: &Path, state_dir: &Path) -> Result<String> {
    let files = files_of(path)?;
    let stamp = stamp(&files)?;
    let mut known = remembered(state_dir);
    if let Some(d) = known.get(&stamp) {
        return Ok(d.clone());
    }
    let started = Instant::now();
    let digest = hash(&files)?;
    info!(
        model = %path.display(),
        ms = started.elapsed().as_millis() as u64,
        "computed the model's content digest (remembered for later starts)"
    );
    // Only the versions of models still on disk are worth remembering.
    known.retain(|k, _| {
        k.split(';').all(|part| {
            part.split('|')
                .next()
                .is_some_and(|p| Path::new(p).exists())
        })
    });
    known.insert(stamp, digest.clone());
    remember(state_dir, &known)?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_digest_follows_the_bytes_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (model, state) = (dir.path().join("m.gguf"), dir.path().join("state"));
        fs::write(&model, b"weights, version one").unwrap();
        let first = of_model(&model, &state).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(of_model(&model, &state).unwrap(), first);
        let text = fs::read_to_string(state.join(REMEMBERED)).unwrap();
        assert!(text.contains(&first));
        // The same bytes under another name are another model file (the cache keeps files
        // under their names).
        let copy = dir.path().join("copy.gguf");
        fs::write(&copy, b"weights, version one").unwrap();
        let renamed = of_model(&copy, &state).unwrap();
        assert_ne!(renamed, first, "the file name is part of what is hashed");
        fs::write(&model, b"weights, version two!").unwrap();
        assert_ne!(of_model(&model, &state).unwrap(), first);
    }
}
