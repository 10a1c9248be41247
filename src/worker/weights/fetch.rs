//! Listing, downloading (resumable), verifying and placing the objects of a prefix.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::md5::Md5;
use super::s3::{Object, Store};
use super::sigv4::Credentials;
use super::{FetchError, MESSAGE_PREFIX};
use crate::worker::wire::http::HttpClient;

/// The cache's record of what it holds, next to the files.
pub const MANIFEST: &str = ".moe-fetch.json";
/// First back-off between two attempts at an object; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(16);

/// `moe-worker fetch-weights`: fetch the objects under an S3 prefix into a directory.
#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {
    /// The store's endpoint, `http(s)://host[:port]`.
    #[arg(long)]
    pub endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    #[arg(long)]
    pub bucket: String,
    /// Key prefix; keys below it keep their relative path under --dest.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// The cache directory (the checkpoint path the worker reads).
    #[arg(long)]
    pub dest: PathBuf,
    /// Address the bucket in the path (`endpoint/bucket/key`) rather than the host.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub path_style: bool,
    /// A directory holding the files `accessKeyId`, `secretAccessKey` and optionally
    /// `sessionToken` (the credentials Secret, mounted). Without it: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; without those the requests are anonymous.
    #[arg(long)]
    pub credentials_dir: Option<PathBuf>,
    /// The Secret the credentials come from (only named in error messages).
    #[arg(long)]
    pub credentials_secret: Option<String>,
    /// Objects downloaded at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Attempts after the first at an object that failed for a passing cause (network, 5xx,
    /// a body cut short), each resuming where the last stopped.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// A download that receives nothing for this long is cut and resumed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_seconds: u64,
    /// Names this fetcher's partial files (`<file>.partial.<instance>`), so that the pods sharing
    /// one cache volume (a ReadWriteMany claim) never write the same partial file; a pod's
    /// restarted init container continues its own. Default: the pod's host name.
    #[arg(long, env = "HOSTNAME", default_value = "local")]
    pub instance: String,
}

/// What a fetch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub objects: usize,
    pub downloaded: usize,
    pub cached: usize,
    pub bytes: u64,
    pub resumed: usize,
}

/// One object as the cache records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    key: String,
    size: u64,
    #[serde(default)]
    etag: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Relative path -> object.
    files: BTreeMap<String, Entry>,
}

/// The checksums an answer carried for the whole object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Expected {
    sha256: Option<String>,
    crc32: Option<String>,
    md5: Option<String>,
}

/// The credentials from the environment; None when neither key is set (anonymous).
pub fn env_credentials(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, FetchError> {
    let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
    match (
        nonempty("AWS_ACCESS_KEY_ID"),
        nonempty("AWS_SECRET_ACCESS_KEY"),
    ) {
        (None, None) => Ok(None),
        (Some(id), Some(secret)) => Ok(Some(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: nonempty("AWS_SESSION_TOKEN"),
        })),
        (Some(_), None) => Err(FetchError::Config(
            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: the Secret needs both accessKeyId and secretAccessKey".into(),
        )),
        (None, Some(_)) => Err(FetchError::Config(
            "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: the Secret needs both accessKeyId and secretAccessKey".into(),
        )),
    }
}

/// The credentials from the files of a mounted Secret.
pub fn dir_credentials(dir: &Path, secret: Option<&str>) -> Result<Credentials, FetchError> {
    let read = |key: &str| -> Result<Option<String>, FetchError> {
        match std::fs::read_to_string(dir.join(key)) {
            Ok(v) => Ok(Some(v.trim().to_string()).filter(|v| !v.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FetchError::local(&dir.join(key), "reading a credential", e)),
        }
    };
    let name = secret.map_or_else(|| dir.display().to_string(), |s| format!("Secret {s}"));
    let need = |key: &str| {
        read(key)?.ok_or_else(|| {
            FetchError::Config(format!(
                "{name} has no (or an empty) key {key}: it needs accessKeyId and secretAccessKey"
            ))
        })
    };
    Ok(Credentials {
        access_key_id: need("accessKeyId")?,
        secret_access_key: need("secretAccessKey")?,
        session_token: read("sessionToken")?,
    })
}

/// The path of `key` under `prefix`, relative to the cache: refused when it would leave the
/// cache (`..`, absolute) or is empty; None for a "directory" marker (a key ending in `/`).
pub fn relative_path(prefix: &str, key: &str) -> Result<Option<PathBuf>, String> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key {key:?} is not under the prefix {prefix:?}"))?;
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() || key.ends_with('/') {
        return Ok(None);
    }
    let p = PathBuf::from(rest);
    // By the key's own segments: Path::components drops `.` and empty segments.
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "key {key:?} would be written outside the checkpoint directory (its path under the prefix has `..`, `.`, `//` or a root)"
        ));
    }
    if rest.contains(".partial") || rest == MANIFEST {
        return Err(format!(
            "key {key:?} clashes with the fetcher's own files (*.partial*, {MANIFEST})"
        ));
    }
    Ok(Some(p))
}

/// `op` until it succeeds, fails for good, or `retries` more attempts (with back-off) failed.
async fn retrying<T, F, Fut>(what: String, retries: u32, mut op: F) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut backoff = BACKOFF_START;
    for attempt in 0.. {
        match op().await {
            Err(e) if e.retriable() && attempt < retries => {
                warn!(target = %what, attempt = attempt + 1, "{e}; trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            r => return r,
        }
    }
    unreachable!("the loop returns")
}

/// Fetch everything under `prefix` into `dest`.
pub async fn fetch(
    store: &Store,
    prefix: &str,
    dest: &Path,
    args: &FetchArgs,
) -> Result<Summary, FetchError> {
    let listed = retrying(store.loc.url(prefix), args.retries, || store.list(prefix)).await?;
    let mut objects: Vec<(Object, PathBuf)> = Vec::new();
    for o in listed {
        let rel = relative_path(prefix, &o.key)
            .map_err(|m| FetchError::Config(format!("{}: {m}", store.loc.url(&o.key))))?;
        if let Some(rel) = rel {
            objects.push((o, rel));
        }
    }
    if objects.is_empty() {
        return Err(FetchError::Config(format!(
            "{}: no objects under this prefix: check model.checkpoint.s3.bucket and prefix",
            store.loc.url(prefix)
        )));
    }
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| FetchError::local(dest, "creating the cache directory", e))?;
    let manifest_path = dest.join(MANIFEST);
    let mut manifest: Manifest = tokio::fs::read(&manifest_path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // Files this fetcher wrote for objects no longer listed: a stale checkpoint the worker
    // would otherwise load beside the new one.
    let wanted: std::collections::HashSet<String> = objects
        .iter()
        .map(|(_, r)| r.display().to_string())
        .collect();
    for (rel, _) in manifest.files.iter().filter(|(r, _)| !wanted.contains(*r)) {
        let _ = tokio::fs::remove_file(dest.join(rel)).await;
        info!(file = %rel, "removed: no longer under the prefix");
    }
    manifest.files.retain(|r, _| wanted.contains(r));

    let mut summary = Summary {
        objects: objects.len(),
        ..Default::default()
    };
    let mut todo = Vec::new();
    for (o, rel) in objects {
        let path = dest.join(&rel);
        let key = rel.display().to_string();
        let entry = Entry {
            key: o.key.clone(),
            size: o.size,
            etag: o.etag.clone(),
        };
        let on_disk = tokio::fs::metadata(&path).await.ok().map(|m| m.len());
        if manifest.files.get(&key) == Some(&entry) && on_disk == Some(o.size) {
            summary.cached += 1;
            continue;
        }
        todo.push((o, rel, entry));
    }
    let results: Vec<Result<(String, Entry, u64, bool), FetchError>> =
        futures::stream::iter(todo.into_iter().map(|(o, rel, entry)| async move {
            let path = dest.join(&rel);
            let resumed = fetch_object(store, &o, &path, args).await?;
            Ok((rel.display().to_string(), entry, o.size, resumed))
        }))
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut first_err = None;
    for r in results {
        match r {
            Ok((rel, entry, size, resumed)) => {
                summary.downloaded += 1;
                summary.bytes += size;
                summary.resumed += usize::from(resumed);
                manifest.files.insert(rel, entry);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    // The manifest keeps what did complete, so a rerun skips it.
    write_manifest(&manifest_path, &manifest).await?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

async fn write_manifest(path: &Path, m: &Manifest) -> Result<(), FetchError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(m).expect("a manifest serialises");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| FetchError::local(&tmp, "writing the cache manifest", e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| FetchError::local(path, "writing the cache manifest", e))
}

/// The partial file of a download, and the checksums its first answer carried.
fn partial_paths(path: &Path, instance: &str) -> (PathBuf, PathBuf) {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // One instance name per path component: nothing it holds can leave the directory.
    let instance: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        path.with_file_name(format!("{name}.partial.{instance}")),
        path.with_file_name(format!(".{name}.partial.{instance}.json")),
    )
}

/// Download `o` to `path`: resume a partial file, retry passing failures with back-off, verify,
/// and move it in place. True when it resumed bytes left from before.
async fn fetch_object(
    store: &Store,
    o: &Object,
    path: &Path,
    args: &FetchArgs,
) -> Result<bool, FetchError> {
    let url = store.loc.url(&o.key);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| FetchError::local(parent, "creating a directory", e))?;
    }
    let (partial, meta) = partial_paths(path, &args.instance);
    let idle = Duration::from_secs(args.idle_timeout_seconds.max(1));
    let start = Instant::now();
    let mut backoff = BACKOFF_START;
    let mut resumed = false;
    let mut attempt = 0;
    let checks;
    loop {
        let have = tokio::fs::metadata(&partial).await.map_or(0, |m| m.len());
        resumed |= have > 0;
        let r = match download(store, o, &partial, &meta, idle).await {
            Ok(expected) => verify(o, &url, &partial, &expected).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(c) => {
                checks = c;
                break;
            }
            Err(e) if e.retriable() && attempt < args.retries => {
                attempt += 1;
                warn!(object = %url, attempt, "{e}; trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                if attempt > 0 {
                    return Err(match e {
                        FetchError::Transport {
                            url,
                            message,
                            retriable,
                        } => FetchError::Transport {
                            url,
                            message: format!("{message} (after {} attempts)", attempt + 1),
                            retriable,
                        },
                        e => e,
                    });
                }
                return Err(e);
            }
        }
    }
    tokio::fs::rename(&partial, path)
        .await
        .map_err(|e| FetchError::local(path, "moving the download in place", e))?;
    let _ = tokio::fs::remove_file(&meta).await;
    info!(object = %url, bytes = o.size, resumed, checks = %checks.join(","), secs = start.elapsed().as_secs_f64(), "fetched");
    Ok(resumed)
}

/// The checksums of a response's headers that cover the whole object.
fn expected_from(h: &hyper::HeaderMap, etag: Option<&str>) -> Expected {
    let get = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    // Composite checksums of multipart uploads ("...-N") are not of the whole object's bytes.
    let whole = |v: Option<String>| v.filter(|v| !v.contains('-'));
    // A single-part upload's ETag is its MD5, unless the object is encrypted with a KMS or
    // customer key.
    let encrypted = get("x-amz-server-side-encryption").is_some_and(|v| v.starts_with("aws:kms"))
        || get("x-amz-server-side-encryption-customer-algorithm").is_some();
    let md5 = etag
        .map(|e| e.trim_matches('"').to_ascii_lowercase())
        .filter(|e| e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter(|_| !encrypted);
    Expected {
        sha256: whole(get("x-amz-checksum-sha256")),
        crc32: whole(get("x-amz-checksum-crc32")),
        md5,
    }
}

fn content_range_total(v: &str) -> Option<(u64, u64, u64)> {
    // bytes START-END/TOTAL
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?, total.parse().ok()?))
}

/// One attempt: continue `partial` up to the object's size. Returns the checksums to verify.
async fn download(
    store: &Store,
    o: &Object,
    partial: &Path,
    meta: &Path,
    idle: Duration,
) -> Result<Expected, FetchError> {
    let url = store.loc.url(&o.key);
    let mut have = tokio::fs::metadata(partial).await.map_or(0, |m| m.len());
    let saved: Option<Expected> = tokio::fs::read(meta)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if have > o.size || (have > 0 && saved.is_none()) {
        // Longer than the object, or left without its record: start over.
        have = 0;
    }
    if have == o.size && have > 0 {
        return Ok(saved.unwrap_or_default());
    }
    let mut resp = store.get(o, have).await?;
    let integrity = |message: String| FetchError::Integrity {
        url: url.clone(),
        message,
        retriable: false,
    };
    let header = |k: &str| {
        resp.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header("etag").map(|e| e.trim_matches('"').to_string());
    let declared: Option<u64> = header("content-length").and_then(|v| v.parse().ok());
    let start = match resp.status {
        // Changed since it was listed (If-Match), or the range is past its end: start over.
        412 | 416 => {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(FetchError::Transport {
                url,
                message: format!(
                    "resuming at byte {have}: HTTP {} (the object changed since the partial download began); starting over",
                    resp.status
                ),
                retriable: true,
            });
        }
        206 => {
            let cr = header("content-range").unwrap_or_default();
            match content_range_total(&cr) {
                Some((s, e, total)) if s == have && e + 1 == o.size && total == o.size => have,
                _ => {
                    return Err(integrity(format!(
                        "asked for bytes {have}-, the store sent Content-Range {cr:?} for a {}-byte object",
                        o.size
                    )))
                }
            }
        }
        // The whole object (a store that ignores Range answers this way too).
        _ => 0,
    };
    if let (Some(listed), Some(got)) = (&o.etag, &etag) {
        if listed != got {
            return Err(FetchError::Transport {
                url,
                message: format!(
                    "the object changed since it was listed (ETag {got}, listed {listed}); starting over"
                ),
                retriable: true,
            });
        }
    }
    if let Some(n) = declared {
        if start + n != o.size {
            return Err(integrity(format!(
                "Content-Length {n} from byte {start} does not add up to the listed size of {} bytes",
                o.size
            )));
        }
    }
    let expected = if start == 0 {
        let e = expected_from(&resp.headers, etag.as_deref().or(o.etag.as_deref()));
        let bytes = serde_json::to_vec(&e).expect("serialises");
        tokio::fs::write(meta, bytes)
            .await
            .map_err(|err| FetchError::local(meta, "writing the download's record", err))?;
        e
    } else {
        saved.unwrap_or_default()
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(start == 0)
        .append(start > 0)
        .open(partial)
        .await
        .map_err(|e| FetchError::local(partial, "opening the partial download", e))?;
    let mut at = start;
    loop {
        let chunk = match resp.chunk(idle).await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = file.flush().await;
                return Err(FetchError::Transport {
                    url,
                    message: format!(
                        "downloading: cut off after byte {at} of {}: {e}; resuming",
                        o.size
                    ),
                    retriable: true,
                });
            }
        };
        if at + chunk.len() as u64 > o.size {
            drop(file);
            let _ = tokio::fs::remove_file(partial).await;
            return Err(integrity(format!(
                "the store sent more than the listed {} bytes",
                o.size
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| FetchError::local(partial, "writing", e))?;
        at += chunk.len() as u64;
    }
    file.flush()
        .await
        .map_err(|e| FetchError::local(partial, "writing", e))?;
    file.sync_all()
        .await
        .map_err(|e| FetchError::local(partial, "syncing", e))?;
    if at != o.size {
        return Err(FetchError::Transport {
            url,
            message: format!(
                "downloading: the answer ended after byte {at} of {} (a truncated transfer); resuming",
                o.size
            ),
            retriable: true,
        });
    }
    Ok(expected)
}

/// Check the finished partial file against the store's checksums, and a `.safetensors` file's
/// header against its length. A checksum mismatch drops the file (a retry downloads it anew).
async fn verify(
    o: &Object,
    url: &str,
    partial: &Path,
    e: &Expected,
) -> Result<Vec<&'static str>, FetchError> {
    let (p, e2) = (partial.to_path_buf(), e.clone());
    let sums = tokio::task::spawn_blocking(move || digest_file(&p, &e2))
        .await
        .map_err(|err| FetchError::local(partial, "hashing", err))?
        .map_err(|err| FetchError::local(partial, "reading back", err))?;
    let mut bad = Vec::new();
    let mut checked = vec!["size"];
    let b64 = base64::engine::general_purpose::STANDARD;
    if let (Some(want), Some(got)) = (&e.sha256, &sums.sha256) {
        checked.push("sha256");
        if b64.encode(got) != *want {
            bad.push(format!(
                "SHA-256 {} (the store's x-amz-checksum-sha256 is {want})",
                b64.encode(got)
            ));
        }
    }
    if let (Some(want), Some(got)) = (&e.crc32, &sums.crc32) {
        checked.push("crc32");
        if b64.encode(got.to_be_bytes()) != *want {
            bad.push(format!(
                "CRC32 {} (the store's x-amz-checksum-crc32 is {want})",
                b64.encode(got.to_be_bytes())
            ));
        }
    }
    if let (Some(want), Some(got)) = (&e.md5, &sums.md5) {
        checked.push("etag-md5");
        if hex::encode(got) != *want {
            bad.push(format!(
                "MD5 {} (the store's ETag is {want})",
                hex::encode(got)
            ));
        }
    }
    if !bad.is_empty() {
        let _ = tokio::fs::remove_file(partial).await;
        return Err(FetchError::Integrity {
            url: url.to_string(),
            message: format!("the {} downloaded bytes have {}", o.size, bad.join(", ")),
            retriable: true,
        });
    }
    if o.key.ends_with(".safetensors") {
        checked.push("safetensors-header");
        let p = partial.to_path_buf();
        let header = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&p)?;
            crate::worker::checkpoint::safetensors::read_header(&p, &f)
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .await
        .map_err(|err| FetchError::local(partial, "reading the header", err))?;
        if let Err(err) = header {
            let _ = tokio::fs::remove_file(partial).await;
            // The partial file's path says nothing to the user; the reason does.
            let reason = err.to_string();
            let reason = reason
                .split_once(": ")
                .filter(|(head, _)| head.contains(".partial"))
                .map_or(reason.as_str(), |(_, r)| r)
                .to_string();
            return Err(FetchError::Integrity {
                url: url.to_string(),
                message: format!(
                    "the stored object is not a whole safetensors file ({} bytes, as listed): {reason}; upload it again",
                    o.size
                ),
                retriable: false,
            });
        }
    }
    Ok(checked)
}

#[derive(Default)]
struct Sums {
    sha256: Option<Vec<u8>>,
    crc32: Option<u32>,
    md5: Option<[u8; 16]>,
}

/// The digests `e` asks for, in one pass over the file.
fn digest_file(path: &Path, e: &Expected) -> std::io::Result<Sums> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut sha = e.sha256.as_ref().map(|_| Sha256::new());
    let mut crc = e.crc32.as_ref().map(|_| flate2::Crc::new());
    let mut md5 = e.md5.as_ref().map(|_| Md5::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let b = &buf[..n];
        if let Some(s) = sha.as_mut() {
            s.update(b);
        }
        if let Some(c) = crc.as_mut() {
            c.update(b);
        }
        if let Some(m) = md5.as_mut() {
            m.update(b);
        }
    }
    Ok(Sums {
        sha256: sha.map(|s| s.finalize().to_vec()),
        crc32: crc.map(|c| c.sum()),
        md5: md5.map(|m| m.finish()),
    })
}

/// The fetch-weights command: fetch, log a summary; on failure write the one-line reason to the
/// termination message (`MOE_TERMINATION_LOG`, else /dev/termination-log) and fail.
pub async fn run(args: FetchArgs) -> anyhow::Result<()> {
    let result = async {
        let creds = match &args.credentials_dir {
            Some(d) => Some(dir_credentials(d, args.credentials_secret.as_deref())?),
            None => env_credentials(|k| std::env::var(k).ok())?,
        };
        let loc =
            super::s3::Location::new(&args.endpoint, &args.region, &args.bucket, args.path_style)?;
        let store = Store::new(
            loc,
            HttpClient::new(),
            creds,
            args.credentials_secret.clone(),
        );
        fetch(&store, &args.prefix, &args.dest, &args).await
    }
    .await;
    match result {
        Ok(s) => {
            info!(
                objects = s.objects,
                downloaded = s.downloaded,
                cached = s.cached,
                resumed = s.resumed,
                bytes = s.bytes,
                "weights fetched into {}",
                args.dest.display()
            );
            Ok(())
        }
        Err(e) => {
            let line = format!("{MESSAGE_PREFIX}{e}");
            let log = std::env::var("MOE_TERMINATION_LOG")
                .unwrap_or_else(|_| "/dev/termination-log".into());
            let _ = std::fs::write(&log, format!("{line}\n"));
            anyhow::bail!(line)
        }
    }
}

#[cfg(test)]
mod tests;
