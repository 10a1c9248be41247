//! The reconcile pipeline's pure steps: building the owned objects and the rollout state machine.
//! I/O (fetch, server-side apply, scraping, status) lives beside them and calls into these.

pub mod build;
pub mod load;
pub mod replan;
pub mod rollout;
pub mod status;
