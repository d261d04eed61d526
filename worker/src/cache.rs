//! The slice cache: the bytes of the slices this worker received, kept on disk by the
//! model's content digest, so that a later load of any slice whose bytes are here sends
//! nothing over the network (a worker back from a blip, a restarted coordinator, a plan
//! that moves layers back and forth).
//!
//! Layout: `<root>/<digest>/<path inside the model>`, each file sparse at its original
//! length with only the received ranges written, beside `<file>.ranges`, the ranges
//! present (rewritten atomically after each load). Only the model being served is kept:
//! storing a slice of another digest removes the others. A draft model for speculative
//! decoding (`LoadHeader.draft`) is kept the same way beside it, under
//! `<root>/draft-models/<digest>`: receiving one removes other drafts only. The directory
//! is 0700.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use strata_proto::v1::{ByteRange, LoadHeader, SliceFile};

/// The directory of draft models, beside the served models' digests (a name no digest
/// has: it is not alphanumeric).
const DRAFTS: &str = "draft-models";

/// A byte range `(offset, length)`.
type Range = (u64, u64);

/// Errors of the cache: what was wrong with a request, or the file system.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The header names something outside the cache, or is inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache of one worker.
#[derive(Debug, Clone)]
pub struct SliceCache {
    root: PathBuf,
}

/// A relative path that stays inside its directory.
fn inside(path: &str) -> Result<PathBuf, CacheError> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(CacheError::Invalid(format!(
            "slice file path `{path}` must be relative and stay inside the model"
        )));
    }
    Ok(p.to_path_buf())
}

/// Merges overlapping and touching ranges, sorted.
fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(o + l);
                last.1 = end - last.0;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// The parts of `want` not covered by `have` (merged).
fn subtract(want: &[Range], have: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    for &(o, l) in want {
        let (mut at, end) = (o, o + l);
        for &(ho, hl) in have {
            let hend = ho + hl;
            if hend <= at || ho >= end {
                continue;
            }
            if ho > at {
                out.push((at, ho - at));
            }
            at = at.max(hend);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

fn ranges_of(f: &SliceFile) -> Vec<Range> {
    f.ranges.iter().map(|r| (r.offset, r.length)).collect()
}

impl SliceCache {
    /// A cache at `root` (created, owner-only).
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        fs::create_dir_all(root).map_err(io(root))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io(root))?;
        }
        Ok(SliceCache {
            root: root.to_path_buf(),
        })
    }

    /// Where a load's model lives: by digest, under [`DRAFTS`] for a draft model.
    fn model_dir(&self, header: &LoadHeader) -> Result<PathBuf, CacheError> {
        let digest = &header.model_digest;
        if digest.is_empty()
            || digest.len() > 128
            || !digest.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(CacheError::Invalid(format!(
                "model digest `{digest}` is not a hex digest"
            )));
        }
        Ok(self.kind_dir(header).join(digest))
    }

    /// The directory of the models of a load's kind: served models, or drafts.
    fn kind_dir(&self, header: &LoadHeader) -> PathBuf {
        if header.draft {
            self.root.join(DRAFTS)
        } else {
            self.root.clone()
        }
    }

    /// Where the slice's model opens from (the file or directory the header names).
    pub fn model_root(&self, header: &LoadHeader) -> Result<PathBuf, CacheError> {
        Ok(self.model_dir(header)?.join(inside(&header.model_name)?))
    }

    fn file_path(&self, header: &LoadHeader, f: &SliceFile) -> Result<PathBuf, CacheError> {
        Ok(self.model_dir(header)?.join(inside(&f.path)?))
    }

    fn present(&self, path: &Path, length: u64) -> Vec<Range> {
        let Ok(meta) = fs::metadata(path) else {
            return Vec::new();
        };
        if meta.len() != length {
            return Vec::new();
        }
        let sidecar = sidecar(path);
        fs::read_to_string(sidecar)
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<Range>>(&t).ok())
            .map(merge)
            .unwrap_or_default()
    }

    /// Per file of the header, the ranges not in the cache.
    pub fn missing(&self, header: &LoadHeader) -> Result<Vec<SliceFile>, CacheError> {
        header
            .files
            .iter()
            .map(|f| {
                let have = self.present(&self.file_path(header, f)?, f.length);
                let need = subtract(&merge(ranges_of(f)), &have);
                Ok(SliceFile {
                    path: f.path.clone(),
                    length: f.length,
                    ranges: need
                        .into_iter()
                        .map(|(offset, length)| ByteRange { offset, length })
                        .collect(),
                })
            })
            .collect()
    }

    /// Opens the header's files for writing what is missing; removes other models' (of
    /// the same kind: a draft model's load keeps the served model, and the other way).
    pub fn receive(&self, header: &LoadHeader) -> Result<Receiving, CacheError> {
        let dir = self.model_dir(header)?;
        self.evict_all_but(&self.kind_dir(header), &[&dir, &self.root.join(DRAFTS)]);
        let missing = self.missing(header)?;
        let mut files = Vec::new();
        for (f, need) in header.files.iter().zip(missing) {
            let path = self.file_path(header, f)?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            // A sparse file of the original length: only the slice's ranges get bytes.
            if file.metadata().map_err(io(&path))?.len() != f.length {
                file.set_len(f.length).map_err(io(&path))?;
                let _ = fs::remove_file(sidecar(&path));
            }
            files.push(Incoming {
                have: self.present(&path, f.length),
                path,
                file,
                allowed: merge(ranges_of(f)),
                need: ranges_of(&need),
                written: Vec::new(),
            });
        }
        Ok(Receiving { files })
    }

    /// Removes the directories in `dir` but those in `keep`.
    fn evict_all_but(&self, dir: &Path, keep: &[&Path]) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !keep.contains(&p.as_path()) && p.is_dir() {
                let _ = fs::remove_dir_all(&p);
            }
        }
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".ranges");
    PathBuf::from(name)
}

struct Incoming {
    path: PathBuf,
    file: File,
    /// What the header allows to be written.
    allowed: Vec<Range>,
    /// What was missing when the load began.
    need: Vec<Range>,
    /// Present before this load.
    have: Vec<Range>,
    /// Written by this load.
    written: Vec<Range>,
}

/// A load in progress: data lands in the cache's files.
pub struct Receiving {
    files: Vec<Incoming>,
}

impl Receiving {
    /// Bytes this load must receive.
    pub fn expected(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.need.iter().map(|r| r.1))
            .sum()
    }

    /// Writes `data` at `offset` of file `file` (its index in the header).
    pub fn write(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        let f = self.files.get_mut(file as usize).ok_or_else(|| {
            CacheError::Invalid(format!(
                "data for file {file}, which the header did not list"
            ))
        })?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| CacheError::Invalid("data offset overflows".into()))?;
        if !f.allowed.iter().any(|&(o, l)| offset >= o && end <= o + l) {
            return Err(CacheError::Invalid(format!(
                "data {offset}..{end} of file {file} lies outside the ranges the header listed"
            )));
        }
        std::os::unix::fs::FileExt::write_all_at(&f.file, data, offset).map_err(io(&f.path))?;
        f.written.push((offset, data.len() as u64));
        Ok(())
    }

    /// Checks that every range the header listed is now present, and records them.
    pub fn complete(self) -> Result<(), CacheError> {
        self.finish()?.persist()
    }

    /// Checks that every range the header listed is now present. What arrived is usable
    /// at once (it is in the page cache); recording it for later starts is [`Durable`]'s,
    /// which a worker runs off the load's critical path.
    pub fn finish(self) -> Result<Durable, CacheError> {
        let mut files = Vec::new();
        for (i, f) in self.files.into_iter().enumerate() {
            let now = merge([f.have.clone(), f.written.clone()].concat());
            let gap: u64 = subtract(&f.allowed, &now).iter().map(|r| r.1).sum();
            if gap > 0 {
                return Err(CacheError::Invalid(format!(
                    "file {i}: {gap} bytes of the slice never arrived; the coordinator will retry"
                )));
            }
            files.push((f.path, f.file, now));
        }
        Ok(Durable { files })
    }
}

/// A completed load's record, to be made durable: each file synced to disk, then the
/// ranges it holds written beside it (so a crash before the sync leaves no record that
/// claims bytes the disk may not have, and a later load merely sends them again).
pub struct Durable {
    files: Vec<(PathBuf, File, Vec<Range>)>,
}

impl Durable {
    /// Syncs the files and records their ranges.
    pub fn persist(self) -> Result<(), CacheError> {
        for (path, file, now) in self.files {
            file.sync_data().map_err(io(&path))?;
            let side = sidecar(&path);
            let tmp = side.with_extension("ranges.tmp");
            let text = serde_json::to_string(&now).unwrap_or_else(|_| "[]".into());
            let mut w = File::create(&tmp).map_err(io(&tmp))?;
            w.write_all(text.as_bytes()).map_err(io(&tmp))?;
            w.sync_data().map_err(io(&tmp))?;
            fs::rename(&tmp, &side).map_err(io(&side))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(digest: &str, ranges: &[(u64, u64)]) -> LoadHeader {
        LoadHeader {
            model_name: "m.gguf".into(),
            model_digest: digest.into(),
            files: vec![SliceFile {
                path: "m.gguf".into(),
                length: 1000,
                ranges: ranges
                    .iter()
                    .map(|&(offset, length)| ByteRange { offset, length })
                    .collect(),
            }],
            ..Default::default()
        }
    }

    fn missing(c: &SliceCache, h: &LoadHeader) -> Vec<(u64, u64)> {
        ranges_of(&c.missing(h).unwrap()[0])
    }

    #[test]
    fn ranges_merge_and_subtract() {
        assert_eq!(
            merge(vec![(10, 5), (0, 10), (30, 1), (31, 4)]),
            vec![(0, 15), (30, 5)]
        );
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 10), (50, 60)]),
            vec![(0, 10), (20, 30)]
        );
        assert_eq!(subtract(&[(5, 5)], &[(0, 100)]), Vec::<(u64, u64)>::new());
    }

    #[test]
    fn what_arrived_once_is_not_asked_for_again_and_other_models_are_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SliceCache::open(dir.path()).unwrap();
        let first = header("aa11", &[(0, 100), (500, 100)]);
        assert_eq!(missing(&cache, &first), vec![(0, 100), (500, 100)]);
        let mut r = cache.receive(&first).unwrap();
        assert_eq!(r.expected(), 200);
        r.write(0, 0, &[1; 100]).unwrap();
        r.write(0, 500, &[2; 100]).unwrap();
        assert!(
            r.write(0, 900, &[3; 10]).is_err(),
            "outside the header's ranges"
        );
        r.complete().unwrap();
        // A slice that overlaps: only its new part is missing.
        let second = header("aa11", &[(500, 100), (600, 200)]);
        assert_eq!(missing(&cache, &second), vec![(600, 200)]);
        // An incomplete load is refused and records nothing new.
        let r = cache.receive(&second).unwrap();
        assert!(r.complete().unwrap_err().to_string().contains("200 bytes"));
        // Another model evicts this one.
        let other = header("bb22", &[(0, 10)]);
        let mut r = cache.receive(&other).unwrap();
        r.write(0, 0, &[9; 10]).unwrap();
        r.complete().unwrap();
        assert_eq!(missing(&cache, &first), vec![(0, 100), (500, 100)]);
        assert!(cache.receive(&header("../x", &[(0, 1)])).is_err());
    }

    #[test]
    fn a_draft_model_is_kept_beside_the_served_model_and_evicts_only_other_drafts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SliceCache::open(dir.path()).unwrap();
        let store = |h: &LoadHeader| {
            let mut r = cache.receive(h).unwrap();
            for f in &h.files {
                for range in &f.ranges {
                    r.write(0, range.offset, &vec![7; range.length as usize])
                        .unwrap();
                }
            }
            r.complete().unwrap();
        };
        let served = header("aa11", &[(0, 100)]);
        let draft = |digest: &str| LoadHeader {
            draft: true,
            ..header(digest, &[(0, 1000)])
        };
        store(&served);
        store(&draft("cc33"));
        assert_eq!(
            missing(&cache, &served),
            vec![],
            "a draft evicted the model"
        );
        assert_eq!(missing(&cache, &draft("cc33")), vec![]);
        // The same digest as a draft and as a served model are two things.
        assert_eq!(missing(&cache, &draft("aa11")), vec![(0, 1000)]);
        store(&served);
        assert_eq!(
            missing(&cache, &draft("cc33")),
            vec![],
            "the model evicted its draft"
        );
        store(&draft("dd44"));
        assert_eq!(missing(&cache, &draft("cc33")), vec![(0, 1000)]);
        assert_eq!(missing(&cache, &served), vec![]);
        assert!(cache
            .model_root(&draft("cc33"))
            .unwrap()
            .starts_with(dir.path().join(DRAFTS)));
    }
}
