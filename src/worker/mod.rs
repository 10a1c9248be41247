//! The expert runtime that runs in each GPU worker pod.

pub mod compute;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod runtime;
pub mod server;

pub use runtime::backend_loader;
