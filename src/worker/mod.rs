//! The expert runtime that runs in each GPU worker pod.

pub mod checkpoint;
pub mod compute;
pub mod cpu;
pub mod cuda;
pub mod device;
#[cfg(test)]
pub(crate) mod testutil;
