//! The attachment store (files named by the SHA-256 of their content) and
//! the download of MMS media into it, within a size limit.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use switchboard_core::Secret;

/// A directory of content-addressed files: `<dir>/<sha256 hex>`.
#[derive(Debug, Clone)]
pub struct AttachmentStore {
    dir: PathBuf,
}

/// What the store holds for one put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The reference carried on the envelope: `sha256:<hex>`.
    pub storage_ref: String,
}

impl AttachmentStore {
    /// A store in `dir`, created if need be.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(AttachmentStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the file of `sha256` is.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Writes `bytes` durably (temporary file, fsync, rename, fsync of the
    /// directory); a second put of the same bytes writes nothing.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<Stored> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let path = self.path_of(&sha256);
        if !path.is_file() {
            let tmp = self
                .dir
                .join(format!(".{sha256}.{}.tmp", uuid::Uuid::now_v7()));
            {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(Stored {
            storage_ref: format!("sha256:{sha256}"),
            sha256,
            size: bytes.len() as u64,
        })
    }
}

/// Why media was not stored.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// Larger than the limit.
    #[error("media is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The download failed.
    #[error("media download failed: {0}")]
    Fetch(String),
    /// The provider answered with an error status.
    #[error("media download answered {0}")]
    Status(u16),
    /// The store could not write it.
    #[error("cannot store media: {0}")]
    Store(#[from] std::io::Error),
}

/// Downloads `url` (following redirects) and stores it. Credentials are
/// sent only when `url` is on the provider's API origin `api_base`, so a
/// media URL elsewhere never receives them.
pub async fn fetch(
    client: &reqwest::Client,
    store: &AttachmentStore,
    url: &str,
    api_base: &str,
    credentials: Option<(&str, &Secret)>,
    limit: u64,
    timeout: Duration,
) -> Result<(Stored, Option<String>), MediaError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| MediaError::Fetch(e.to_string()))?;
    if parsed.scheme() != "https" && parsed.scheme() != "http" {
        return Err(MediaError::Fetch(format!(
            "{} is not an http url",
            parsed.scheme()
        )));
    }
    let same_origin = reqwest::Url::parse(api_base).is_ok_and(|b| b.origin() == parsed.origin());
    let mut req = client.get(parsed).timeout(timeout);
    if let (true, Some((user, password))) = (same_origin, credentials) {
        req = req.basic_auth(user, Some(password.expose()));
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| MediaError::Fetch(without_url(&e)))?;
    if !resp.status().is_success() {
        return Err(MediaError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(MediaError::TooLarge { limit });
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| MediaError::Fetch(without_url(&e)))?
    {
        if bytes.len() as u64 + chunk.len() as u64 > limit {
            return Err(MediaError::TooLarge { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    let store = store.clone();
    let stored = tokio::task::spawn_blocking(move || store.put(&bytes))
        .await
        .map_err(|e| MediaError::Store(std::io::Error::other(e.to_string())))??;
    Ok((stored, content_type))
}

/// A reqwest error's text without the URL (it may carry a token).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_are_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = AttachmentStore::open(&dir.path().join("att")).unwrap();
        let a = store.put(b"hello").unwrap();
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(a.storage_ref, format!("sha256:{}", a.sha256));
        assert_eq!(std::fs::read(store.path_of(&a.sha256)).unwrap(), b"hello");
        assert_eq!(store.put(b"hello").unwrap(), a);
        let files = std::fs::read_dir(dir.path().join("att")).unwrap().count();
        assert_eq!(files, 1);
    }
}
