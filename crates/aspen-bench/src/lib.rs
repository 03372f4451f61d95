//! Side-by-side benchmark of a 3-node Aspen cluster and a 3-node etcd cluster on one
//! machine: both started as real processes on loopback with fsync on, both driven by the
//! same closed-loop load generator (aspen-client for Aspen, a hand-written gRPC client for
//! etcd), rows interleaved A/B so drift hits both, next to the disk's fsync rate and what a
//! perfect write batcher would make of it. The `aspen-bench` binary runs it
//! (`cargo xtask bench etcd`).
//!
//! Architecture invariant: a client of both systems, never a part of either: depends on
//! aspen-client and the public API types only, and needs no `protoc` or system library to
//! build (CI builds it everywhere); nothing here runs in `cargo test` beyond pure logic and
//! local processes.

pub mod chart;
pub mod cluster;
pub mod etcd;
pub mod failover;
pub mod fsync;
pub mod latency;
pub mod report;
pub mod target;
pub mod workload;
