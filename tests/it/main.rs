//! The integration suite: one binary, one module per surface. Every test starts its own broker on
//! 127.0.0.1 with an ephemeral port and stops it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod concurrency;
mod dashboard;
mod long_poll;
mod protocol;
mod queue;
mod spec_vectors;
mod support;
