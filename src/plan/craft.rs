//! craft
