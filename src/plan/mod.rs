//! Pure expert-replication planning: no I/O, no clocks, no randomness without a seed.
//!
//! The pieces, in the order a plan is made:
//! - [`load`]: per-expert token counts over a window of batches ([`LoadWindow`]) and their parsers.
//! - [`balance`]: the objective (balancedness) and the replay of a window through a placement.
//! - [`eplb`]: a faithful port of DeepSeek's EPLB (`rebalance_experts`).
//! - [`craft`]: CRAFT (replicate, slot capacities, place, benefit table, knapsack DP).
//! - [`expert_plan`]: the plan document (JSON contract of DESIGN.md), its hash and plan diffs.

pub mod balance;
pub mod craft;
pub mod eplb;
pub mod expert_plan;
pub mod load;
pub mod load_formats;
pub mod model;
pub mod reference;

pub use expert_plan::{Algorithm, ExpertPlan, LayerPlan};
pub use load::LoadWindow;
pub use model::{Dtype, ModelShape, Topology};
