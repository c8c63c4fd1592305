//! The benchmark harness shared by the `import`, `compare` and `fanout` binaries.

pub mod harness;
