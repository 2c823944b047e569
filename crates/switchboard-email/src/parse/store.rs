//! The attachment store: bytes kept once, under the SHA-256 of their content.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use switchboard_core::Retryable;

/// Why bytes could not be stored. Always worth a retry: the disk may have
/// room again later, and the mail stays unacknowledged until then.
#[derive(Debug, thiserror::Error)]
#[error("attachment store {path}: {source}")]
pub struct StoreError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What the file system said.
    #[source]
    pub source: std::io::Error,
}

impl Retryable for StoreError {
    fn retryable(&self) -> bool {
        true
    }
}

/// Where bytes were stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// The reference to put in an envelope: `sha256/<first two hex>/<hex>`,
    /// relative to the store's directory.
    pub storage_ref: String,
}

/// A directory of files named by the SHA-256 of their content, with a size
/// limit for attachments. Writing the same bytes twice writes one file.
#[derive(Debug)]
pub struct AttachmentStore {
    dir: PathBuf,
    max_size: u64,
    durable: bool,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl AttachmentStore {
    /// A store under `dir` (created on first write) that keeps attachments
    /// of at most `max_size` bytes. Files, and the directory entries naming
    /// them, are flushed to disk before `put` returns.
    pub fn new(dir: impl Into<PathBuf>, max_size: u64) -> Self {
        AttachmentStore {
            dir: dir.into(),
            max_size,
            durable: true,
        }
    }

    /// Skips the flush to disk (`fsync`) after each write: for tests and
    /// benchmarks only, since an acknowledged mail could then lose its
    /// attachments in a power cut.
    pub fn without_fsync(mut self) -> Self {
        self.durable = false;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The largest attachment kept, in bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// SHA-256 of `bytes` and the reference they are (or would be) stored
    /// under, without writing anything.
    pub fn address(bytes: &[u8]) -> Stored {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let storage_ref = format!("sha256/{}/{}", &sha256[..2], sha256);
        Stored {
            sha256,
            storage_ref,
        }
    }

    /// The file a reference names, if it is one this store writes.
    pub fn path_of(&self, storage_ref: &str) -> Option<PathBuf> {
        let rest = storage_ref.strip_prefix("sha256/")?;
        let (shard, name) = rest.split_once('/')?;
        let hex_ok = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        (hex_ok && name.starts_with(shard) && shard.len() == 2)
            .then(|| self.dir.join("sha256").join(shard).join(name))
    }

    /// Stores `bytes` under their hash, whatever their size (the caller
    /// applies the limit). Idempotent: a file already present with the same
    /// length is left alone. Written to a temporary name and renamed, so a
    /// crash never leaves a partial file under the final name.
    pub fn put(&self, bytes: &[u8]) -> Result<Stored, StoreError> {
        let stored = Self::address(bytes);
        let shard = self.dir.join("sha256").join(&stored.sha256[..2]);
        let path = shard.join(&stored.sha256);
        if fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(stored);
        }
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError { path, source }
        };
        fs::create_dir_all(&shard).map_err(err(&shard))?;
        let tmp = shard.join(format!(
            ".{}.{}.{}.tmp",
            stored.sha256,
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            if self.durable {
                file.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            if self.durable {
                // The rename itself must survive a crash too.
                fs::File::open(&shard)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(source) = written {
            // Best effort: a leftover temporary file is harmless.
            fs::remove_file(&tmp).ok();
            return Err(StoreError { path, source });
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_once_under_the_content_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = AttachmentStore::new(dir.path(), 1024);
        let a = store.put(b"hello").unwrap();
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(a.storage_ref, format!("sha256/2c/{}", a.sha256));
        let path = store.path_of(&a.storage_ref).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        let b = store.put(b"hello").unwrap();
        assert_eq!(a, b);
        let files: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporary files left behind");
        assert_eq!(store.path_of("sha256/zz/../../etc/passwd"), None);
    }

    #[test]
    fn reports_an_unwritable_directory_as_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"x").unwrap();
        let store = AttachmentStore::new(&blocker, 1024);
        let err = store.put(b"hello").unwrap_err();
        assert!(err.retryable());
        assert!(err.to_string().starts_with("attachment store "), "{err}");
    }
}
