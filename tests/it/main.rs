//! Integration tests: real sluice, real backends, real clients on loopback.

mod access_log;
mod acme;
mod admin;
mod balance;
mod cli;
mod close;
mod cluster;
mod ctl;
mod dashboard;
mod drain;
mod edge;
mod examples;
mod failures;
mod fuzz;
mod health;
mod http;
mod http2;
mod layers;
mod liveness;
mod proxy_protocol;
mod rebalance;
mod reload;
mod sticky;
#[path = "../support/mod.rs"]
mod support;
mod tls;
mod upgrade;
mod websocket;
