//! `moe-worker fetch-weights`: the init container of a worker pod whose checkpoint lives in an
//! S3-compatible object store (`spec.model.checkpoint.s3`). It lists the prefix, downloads every
//! object into the cache volume the worker then mounts read-only, and checks each one: its size
//! against the listing and `Content-Length`, its bytes against the store's checksums where it
//! gives them (`x-amz-checksum-sha256`, `x-amz-checksum-crc32`, and a single-part ETag, which is
//! the MD5), and a `.safetensors` file's header against its length (a truncated upload). An
//! interrupted download resumes with a Range request, within the run (bounded retries with
//! back-off) and across runs (a restarted init container, a persistent cache). Objects already
//! in the cache with the listed size and ETag are kept.
//!
//! A failure ends the process with one line naming the object (`s3://bucket/key`), what was
//! being done and why, written to the termination message, which the operator reports in the
//! MoEDeployment's Degraded condition (`controller::weights`).

pub mod fetch;
pub mod md5;
pub mod s3;
pub mod sigv4;

/// The first words of the termination message of a failed fetch; the operator looks for them.
pub const MESSAGE_PREFIX: &str = "fetch-weights: ";

/// Why a fetch failed. Every message names the bucket and key (or prefix) involved.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store answered with an error.
    #[error("{url}: {what}: HTTP {status} {code}: {message}{}", hint_suffix(.hint))]
    Refused {
        url: String,
        what: &'static str,
        status: u16,
        code: String,
        message: String,
        /// What to fix, when the code says.
        hint: String,
        retriable: bool,
    },
    /// The store could not be reached, or the answer broke off.
    #[error("{url}: {message}")]
    Transport {
        url: String,
        message: String,
        retriable: bool,
    },
    /// The bytes are not what the store says they are.
    #[error("{url}: integrity check failed: {message}")]
    Integrity {
        url: String,
        message: String,
        /// A mismatch that a fresh download may not repeat (a corrupted transfer), as opposed to
        /// the stored object itself being wrong.
        retriable: bool,
    },
    /// The cache volume.
    #[error("{path}: {message}")]
    Local { path: String, message: String },
    #[error("{0}")]
    Config(String),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl FetchError {
    pub fn retriable(&self) -> bool {
        match self {
            FetchError::Refused { retriable, .. }
            | FetchError::Transport { retriable, .. }
            | FetchError::Integrity { retriable, .. } => *retriable,
            FetchError::Local { .. } | FetchError::Config(_) => false,
        }
    }

    pub(crate) fn local(path: &std::path::Path, what: &str, e: impl std::fmt::Display) -> Self {
        FetchError::Local {
            path: path.display().to_string(),
            message: format!("{what}: {e}"),
        }
    }
}
