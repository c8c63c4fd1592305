//! End-to-end tests: real `dpsync` processes on loopback, driven through the CLI.

mod harness;
mod refresh;

mod proxy;
