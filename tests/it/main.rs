//! Integration tests: real sluice, real backends, real clients on loopback.

mod http;
mod support;
mod websocket;
mod balance;
mod failures;
