//! The expert runtime that runs in each GPU worker pod.

pub mod admin_tls;
pub mod checkpoint;
pub mod compute;
pub mod heap;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod weights;
pub mod wire;

pub use runtime::backend_loader;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod fp8;
#[cfg(test)]
pub(crate) mod testutil;
