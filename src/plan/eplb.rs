//! eplb
