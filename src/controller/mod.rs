//! The operator: a reconcile pipeline (fetch -> validate -> observe -> decide -> apply) and the
//! pure pieces `decide` calls (build, initial_load, ranks, replan, rollout, status, weights), with the
//! operator's own telemetry and leader election beside them.

pub mod admin_pki;
pub mod apply;
pub mod build;
pub mod decide;
pub mod fetch;
pub mod gang;
pub mod groups;
pub mod initial_load;
pub mod leader;
pub mod load;
pub mod observe;
pub mod prometheus;
pub mod ranks;
pub mod reconcile;
pub mod replan;
pub mod rollout;
pub mod status;
pub mod telemetry;
pub mod weights;
