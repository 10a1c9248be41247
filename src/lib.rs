//! moe-operator: serve Mixture-of-Experts models on Kubernetes and keep their experts balanced.
//!
//! Module boundaries follow ../shared/DESIGN.md: `plan` is pure planning with no I/O; the other modules
//! depend on it, never the other way round.

pub mod api;
pub mod bench;
pub mod charts;
pub mod cli;
pub mod controller;
pub mod ep;
pub mod loadgen;
pub mod plan;
pub mod serving;
pub mod text;
pub mod worker;
