//! The reconcile pipeline's pure steps: building the owned objects and the rollout state machine.
//! I/O (fetch, server-side apply, scraping, status) lives beside them and calls into these.

pub mod build;
pub mod initial_load;
pub mod leader;
pub mod load;
pub mod prometheus;
pub mod reconcile;
pub mod replan;
pub mod rollout;
pub mod status;
pub mod telemetry;
