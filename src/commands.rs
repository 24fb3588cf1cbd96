//! Command-line verbs whose work is more than one library call.

pub mod discover;
pub mod fleet;
pub mod policy;
pub mod register;
pub mod serve;
