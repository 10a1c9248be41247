//! The expert-parallel data plane (docs/data-plane.md): ranks that are token sources and expert
//! hosts, exchanging rows over one transport interface (host TCP, CUDA IPC, NCCL), with plan
//! epochs switched by the whole group at one step.

pub mod backend;
pub mod cuda;
pub mod group;
pub mod mesh;
pub mod meta;
pub mod rank;
pub mod route;
pub mod session;
pub mod transport;

#[cfg(test)]
pub(crate) mod testutil;
