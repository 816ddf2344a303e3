//! Integration tests: real sluice, real backends, real clients on loopback.

mod balance;
mod cli;
mod close;
mod drain;
mod failures;
mod http;
#[path = "../support/mod.rs"]
mod support;
mod websocket;
