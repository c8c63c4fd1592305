//! End-to-end tests: real `dpsync` processes on loopback, driven through the CLI.

mod backup;
mod beneath;
mod cli;
mod cluster;
mod config;
mod distribute;
mod hardening;
mod harness;
mod hostile;
mod operations_packages;
mod operations_targets;
mod prestage;
mod privacy;
mod quickstart;
mod refresh;
mod scale;
mod sites;
mod web;
mod windows;

mod proxy;
mod pull;
