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
//!
//! # Features
//!
//! `server` (on by default) builds the broker: [`engine`], [`storage`], [`server`],
//! [`http_api`], [`metrics`] and the `cmqd` and `cmq-bench` binaries. A program that only talks to
//! a broker depends on `cmqd` with `default-features = false` and gets [`client`], [`protocol`],
//! [`config`] and [`tls`] (client side) without compiling any of it.

pub mod client;
pub mod clock;
pub mod config;
#[cfg(feature = "server")]
pub mod engine;
pub mod error;
#[cfg(feature = "server")]
pub mod http_api;
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
pub mod model;
pub mod protocol;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod storage;
pub mod tls;
