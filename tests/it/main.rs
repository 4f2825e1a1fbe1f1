//! The integration suite: one binary, one module per surface. Every test starts its own broker on
//! 127.0.0.1 with an ephemeral port and stops it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backlog;
mod cluster;
mod cluster_client;
mod cluster_history;
mod cluster_membership;
mod cluster_nemesis;
mod cluster_proxy;
mod cluster_support;
mod cmq_sdk;
mod concurrency;
mod connection_memory;
mod consume;
mod crash;
mod dashboard;
mod fuzz_regressions;
mod hostile;
mod http_api;
mod http_hostile;
mod long_poll;
mod pipeline;
mod ports;
mod protocol;
mod queue;
mod spec_rules;
mod spec_vectors;
mod storage_churn;
mod storage_corruption;
mod storage_damage;
mod storage_faults;
mod storage_power_loss;
mod storage_write_faults;
mod support;
mod tls;
mod topic;
