//! The fault battery's checkers: what a history of client operations under
//! faults must satisfy.
//!
//! In: histories recorded by the battery's clients. Out: whether they are
//! linearizable ([`linearizability`]). The battery that records them (the
//! nemeses, the workloads) builds on this.

pub mod linearizability;
