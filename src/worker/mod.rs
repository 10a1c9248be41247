//! The expert runtime that runs in each GPU worker pod.

pub mod compute;
