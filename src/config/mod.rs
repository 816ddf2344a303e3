//! Configuration: the TOML schema, its defaults and its validation.
//!
//! Owns turning a file into a [`Config`] whose fields have their final types
//! (socket addresses, durations, pool indices). Nothing outside this module
//! sees raw TOML. Errors name the file, line, section and key:
//! `sluice.toml:14: pool "app": unknown key "algoritm"`.
//!
//! - `schema.rs`: the validated types and their defaults (plain data);
//! - `load.rs`: reading and validating a file into them;
//! - `reader.rs`: the TOML walker that knows spans and leftover keys;
//! - `diff.rs`: what a reload changes (pure).

mod diff;
mod load;
mod reader;
mod schema;
#[cfg(test)]
mod tests;

pub use crate::pem::CertSource;
pub use diff::{Change, diff};
pub use load::{load, parse};
pub use reader::MAX_DURATION;
pub use schema::*;
