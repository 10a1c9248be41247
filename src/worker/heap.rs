//! Keep frame-sized buffers in the heap instead of fresh mappings.
//!
//! Every dispatch frame allocates a few buffers of its size (the body, the decoded rows, the
//! staged and converted outputs, the reply). glibc serves allocations above its mmap threshold
//! (at most 32 MiB) with a fresh mapping and unmaps them on free, so each frame pays a page fault
//! and a page clear per 4 KiB, several times over. On 4 H200s (benches/results/policies.md,
//! issue 7) that churn was a tenth to a quarter of a real rank's step time. Served from the heap
//! and never trimmed, the pages are faulted once and reused; the cost is that the process keeps
//! its high-water mark of frame memory, which the worker already bounds (`--max-inflight-bytes`).

/// The settings applied, as glibc's environment variables name them; setting any of these in the
/// environment leaves the allocator to glibc's own reading of it.
/// (mallopt takes an int, so "never trim" is the largest one: 2 GiB of free heap top.)
pub const SETTINGS: [(&str, i32); 3] = [
    ("MALLOC_MMAP_MAX_", 0),
    ("MALLOC_TRIM_THRESHOLD_", i32::MAX),
    ("MALLOC_TOP_PAD_", 256 << 20),
];

/// What [`retain_large_buffers`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeapTuning {
    Applied,
    /// The environment sets glibc's malloc variables itself (named here).
    LeftToEnvironment(String),
    /// Not glibc on Linux: nothing to do.
    Unsupported,
    /// glibc refused a setting (named here).
    Refused(&'static str),
}

/// Serve large allocations from the heap and keep freed memory, unless the environment says
/// otherwise. Call once at start, before the buffers of the first frame are allocated.
pub fn retain_large_buffers() -> HeapTuning {
    if let Some((name, _)) = SETTINGS
        .iter()
        .find(|(name, _)| std::env::var_os(name).is_some())
    {
        return HeapTuning::LeftToEnvironment((*name).to_string());
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> HeapTuning {
    let params = [libc::M_MMAP_MAX, libc::M_TRIM_THRESHOLD, libc::M_TOP_PAD];
    for (&(name, value), param) in SETTINGS.iter().zip(params) {
        // SAFETY: mallopt only sets allocator parameters; it is called before other threads start
        // allocating frame buffers, and glibc serialises it against the arenas anyway.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return HeapTuning::Refused(name);
        }
    }
    HeapTuning::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> HeapTuning {
    HeapTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_settings() {
        // The test binary's own environment may set them (then nothing is applied, by design).
        match retain_large_buffers() {
            HeapTuning::Applied | HeapTuning::LeftToEnvironment(_) | HeapTuning::Unsupported => {}
            HeapTuning::Refused(name) => panic!("glibc refused {name}"),
        }
        // Large buffers still allocate, fill and free under the new settings.
        let mut v = vec![0u8; 64 << 20];
        v[(64 << 20) - 1] = 1;
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 1);
    }
}
