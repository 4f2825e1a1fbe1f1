//! cmqd: a self-hosted message broker with the Tencent Cloud CMQ model.
//!
//! # Architecture
//!
//! Data flows one way: **bytes -> frames ([`protocol::codec`]) -> requests ([`protocol::parse`])
//! -> [`broker`] (order guard, engine operation, mutations appended to [`storage`]) -> reply
//! ([`protocol::encode`])**.
//!
//! Layers, each importing only the ones below it:
//!
//! 1. [`limits`], [`error`], [`model`], [`clock`]: values and rules every layer shares (the
//!    6010/6020 batch-delete rule is [`error::batch_delete_status`]).
//! 2. [`protocol`] (I/O-free codec), [`engine`] (sans-IO state machine), [`storage`] (the log).
//!    The engine never awaits, never touches a socket and never reads a clock: every operation
//!    takes `now` and returns each state change as an [`engine::Mutation`] value so a log can
//!    record it. None of them knows the broker or its front ends.
//! 3. [`broker`]: the one owner of every change. [`broker::Broker`] runs each request (order
//!    guard, refusal check, engine call, append, reply or what to wait for), the long polls,
//!    the streaming consumers' receives, HTTP push delivery and the ticker; it also holds what
//!    both front ends share (accounts, admission gate, log rate limits, metrics sampling).
//! 4. Front ends, adapters that decode, call one broker method and encode: [`server`] (the
//!    binary protocol, TLS, streaming-consume windows) and [`http_api`] (CMQ's HTTP API).
//!    Neither imports the other. [`metrics`] holds the metric names; [`config`] the settings.
//!
//! [`client`] uses [`protocol`] only. Only [`clock::SystemClock`] reads the wall clock.
//!
//! The wire protocol is specified byte by byte in `spec/` at the top of the repository.
//!
//! # Features
//!
//! `server` (on by default) builds the broker: [`engine`], [`storage`], [`broker`], [`server`],
//! [`http_api`], [`metrics`] and the `cmqd` and `cmq-bench` binaries. A program that only talks to
//! a broker depends on `cmqd` with `default-features = false` and gets [`client`], [`protocol`],
//! [`config`] and [`tls`] (client side) without compiling any of it.

#[cfg(feature = "server")]
pub mod broker;
pub mod client;
pub mod clock;
pub mod config;
#[cfg(feature = "server")]
pub mod consensus;
#[cfg(feature = "server")]
pub mod engine;
pub mod error;
#[cfg(feature = "server")]
pub mod http_api;
pub mod id_hash;
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
