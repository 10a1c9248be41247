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
//!   [`packed`]: how it is stored in the 1 MiB plan ConfigMap.
//! - [`limits`]: the largest shapes anything accepts.

pub mod balance;
pub mod craft;
pub mod eplb;
pub mod expert_plan;
pub mod limits;
pub mod load;
pub mod load_formats;
pub mod model;
pub mod packed;
pub mod planner;
pub mod reference;

pub use expert_plan::{Algorithm, ExpertPlan, HashRule, LayerPlan, PlanReadError};
pub use load::LoadWindow;
pub use model::{parse_byte_size, Dtype, ModelShape, Topology};
