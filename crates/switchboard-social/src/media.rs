//! The attachment store (files named by the SHA-256 of their content) and
//! the download of WhatsApp media into it: the media id is resolved with
//! the number's token (`GET /{version}/{media-id}` → `url`, `file_size`),
//! then the bytes are fetched with the same token, within a size limit.

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
    /// `sha256:<hex>`.
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

    /// Writes `bytes` durably (temporary file, fsync, rename); a second put
    /// of the same bytes writes nothing.
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
    /// The platform answered with an error status.
    #[error("media download answered {0}")]
    Status(u16),
    /// The bytes are not what the webhook announced.
    #[error("media sha256 is {got}, the webhook announced {want}")]
    Digest {
        /// Announced.
        want: String,
        /// Computed.
        got: String,
    },
    /// The store could not write it.
    #[error("cannot store media: {0}")]
    Store(#[from] std::io::Error),
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

/// Resolves WhatsApp media `media_id` and stores its bytes. Returns what
/// was stored and the content type the platform gave.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_whatsapp(
    client: &reqwest::Client,
    store: &AttachmentStore,
    graph_base: &str,
    version: &str,
    media_id: &str,
    token: &Secret,
    announced_sha256: Option<&str>,
    limit: u64,
    timeout: Duration,
) -> Result<(Stored, Option<String>), MediaError> {
    let info_url = format!("{graph_base}/{version}/{media_id}");
    let info = get_json(client, &info_url, Some(token), timeout).await?;
    if info["file_size"].as_u64().is_some_and(|n| n > limit) {
        return Err(MediaError::TooLarge { limit });
    }
    let url = info["url"]
        .as_str()
        .ok_or_else(|| MediaError::Fetch("the media answer has no url".into()))?;
    let (bytes, given_type) = download(client, url, Some(token), limit, timeout).await?;
    let content_type = info["mime_type"].as_str().map(str::to_owned).or(given_type);
    if let Some(want) = announced_sha256 {
        let got = hex::encode(Sha256::digest(&bytes));
        // WhatsApp announces the digest as hex or base64; compare both.
        let b64 = base64_of(&Sha256::digest(&bytes));
        if !want.eq_ignore_ascii_case(&got) && want != b64 {
            return Err(MediaError::Digest {
                want: want.to_owned(),
                got,
            });
        }
    }
    let store = store.clone();
    let stored = tokio::task::spawn_blocking(move || store.put(&bytes))
        .await
        .map_err(|e| MediaError::Store(std::io::Error::other(e.to_string())))??;
    Ok((stored, content_type))
}

/// GETs a JSON answer from `url` (with `token` as a bearer token, if
/// given).
async fn get_json(
    client: &reqwest::Client,
    url: &str,
    token: Option<&Secret>,
    timeout: Duration,
) -> Result<serde_json::Value, MediaError> {
    let mut req = client.get(url).timeout(timeout);
    if let Some(t) = token {
        req = req.bearer_auth(t.expose());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| MediaError::Fetch(without_url(&e)))?;
    if !resp.status().is_success() {
        return Err(MediaError::Status(resp.status().as_u16()));
    }
    resp.json()
        .await
        .map_err(|e| MediaError::Fetch(without_url(&e)))
}

/// GETs `url` (with `token` as a bearer token, if given) within `limit`
/// bytes: the body and the content type the server gave.
async fn download(
    client: &reqwest::Client,
    url: &str,
    token: Option<&Secret>,
    limit: u64,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<String>), MediaError> {
    let mut req = client.get(url).timeout(timeout);
    if let Some(t) = token {
        req = req.bearer_auth(t.expose());
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
    Ok((bytes, content_type))
}

/// Resolves Telegram file `file_id` with the bot's token (`getFile` →
/// `file_path`) and stores its bytes (the Bot API serves files up to
/// 20 MB). The token is part of both URLs, so errors never show them.
pub async fn fetch_telegram(
    client: &reqwest::Client,
    store: &AttachmentStore,
    api_base: &str,
    token: &Secret,
    file_id: &str,
    limit: u64,
    timeout: Duration,
) -> Result<(Stored, Option<String>), MediaError> {
    let info_url = reqwest::Url::parse_with_params(
        &format!("{api_base}/bot{}/getFile", token.expose()),
        &[("file_id", file_id)],
    )
    .map_err(|_| MediaError::Fetch("the bot's api_base does not make a URL".into()))?;
    let info = get_json(client, info_url.as_str(), None, timeout).await?;
    let file = &info["result"];
    if file["file_size"].as_u64().is_some_and(|n| n > limit) {
        return Err(MediaError::TooLarge { limit });
    }
    let path = file["file_path"]
        .as_str()
        .ok_or_else(|| MediaError::Fetch("getFile answered without a file_path".into()))?;
    let url = format!("{api_base}/file/bot{}/{path}", token.expose());
    let (bytes, content_type) = download(client, &url, None, limit, timeout).await?;
    let store = store.clone();
    let stored = tokio::task::spawn_blocking(move || store.put(&bytes))
        .await
        .map_err(|e| MediaError::Store(std::io::Error::other(e.to_string())))??;
    Ok((stored, content_type))
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
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
        assert_eq!(store.put(b"hello").unwrap(), a);
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_of(b"hello"), "aGVsbG8=");
        assert_eq!(base64_of(b"hi"), "aGk=");
        assert_eq!(base64_of(b"abc"), "YWJj");
    }
}
