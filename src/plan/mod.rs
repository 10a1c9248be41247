//! Pure expert-replication planning: no I/O, no clocks, no randomness without a seed.
//!
//! The pieces, in the order a plan is made:
//! - [`load`]: per-expert token counts over a window of batches ([`LoadWindow`]); [`load_formats`]: the parsers.
//! - [`balance`]: the objective (balancedness) and the replay of a window through a placement.
//! - [`eplb`]: a faithful port of DeepSeek's EPLB (`rebalance_experts`).
//! - [`craft`]: CRAFT (replicate, slot capacities, place, benefit table, knapsack DP).
//! - [`reference`]: the CRAFT authors' reference heuristic, kept as a baseline.
//! - [`planner`]: the front door: request + window in, sealed plan out.
//! - [`expert_plan`]: the plan document (JSON contract of ../shared/DESIGN.md), its hash and plan diffs;
//!   [`packed`]: how it is stored in the 1 MiB plan ConfigMap; [`engines`]: the same plan as SGLang's
//!   and vLLM's expert layouts.
//! - [`limits`]: the largest shapes anything accepts.
//!
//! Errors are typed, one enum per domain, each next to what it checks: [`TopologyError`],
//! [`ShapeError`] (a model's shape, and a load or plan that does not fit it), [`ByteSizeError`] and
//! [`model::HfConfigError`] in [`model`]; [`WindowError`] in [`load`]; [`load_formats::LoadError`]
//! (file and position, with a [`load_formats::LoadProblem`]) and
//! [`load_formats::SyntheticError`]; [`limits::LimitError`]; [`expert_plan::InvariantError`] and
//! [`PlanReadError`]; [`eplb::EplbError`]; [`reference::ReferenceError`]; [`planner::PlanError`]
//! with [`planner::BudgetError`] and [`planner::AlgorithmError`]; [`packed::PackError`].

pub mod balance;
pub mod craft;
pub mod dispatch;
pub mod engines;
pub mod eplb;
pub mod expert_plan;
pub mod limits;
pub mod load;
pub mod load_formats;
pub mod model;
pub mod packed;
pub mod planner;
pub mod reference;
pub mod step_cost;

pub use expert_plan::{Algorithm, ExpertPlan, HashRule, LayerPlan, PlanReadError};
pub use load::{LoadWindow, WindowError};
pub use model::{
    parse_byte_size, ByteSizeError, Dtype, ModelShape, ShapeError, Topology, TopologyError,
};
