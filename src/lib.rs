//! cmqd: a self-hosted message broker with the Tencent Cloud CMQ model.
//!
//! # Architecture
//!
//! Data flows one way: **bytes -> frames ([`protocol::codec`]) -> requests ([`protocol::parse`])
//! -> engine operation ([`engine`]) -> mutations to make durable -> reply ([`protocol::encode`])**.
//!
//! Layering rule: [`protocol`] and [`engine`] use only [`limits`], [`error`], [`model`] and
//! [`clock`] values. The engine never awaits, never touches a socket and never reads a clock: every
//! operation takes `now` and returns each state change as an [`engine::Mutation`] value so a log can
//! record it. [`server`] is the only layer that awaits on the broker side; [`client`] uses
//! [`protocol`] only. Only [`clock::SystemClock`] reads the wall clock.
//!
//! The wire protocol is specified byte by byte in `spec/` at the top of the repository.

pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod http_api;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod tls;
