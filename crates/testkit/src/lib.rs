//! What dpsync's tests, benchmarks and `dpsync quickstart` all need, written once:
//!
//! - [`Rng`], [`random_bytes`], [`text_bytes`], [`lognormal_sizes`]: seeded content, the
//!   same bytes for the same seed on every machine and in every release (tests and
//!   benchmarks depend on exact sizes and contents);
//! - [`gen_tree`] and [`Tree`]: a seeded source tree; [`tree_digest`] and [`TreeDigest`]:
//!   a comparable description of a tree on disk;
//! - [`Daemon`]: a child process with a log file, killed and reaped when dropped;
//! - [`poll_until`] and [`file_text`]: bounded waits for a condition or a file (such as
//!   an agent's `listen.addr`).
//!
//! **API Boundary:** only the `dpsync` binary (for its quickstart), tests and benchmarks
//! may depend on this crate (checked by `crates/dpsync/tests/deps.rs`); it depends on no
//! other dpsync crate.
//!
//! Error policy: what the quickstart uses returns `Result` or `Option`. The helpers that
//! only tests use ([`gen_tree`], [`write_random_file`], [`tree_digest`], the `Tree`
//! builders) panic with the path concerned: in a test that is the failure to report.

mod content;
mod daemon;
mod http;
mod rng;
mod tree;
mod wait;

pub use content::{WORDS, lognormal_sizes, random_bytes, text_bytes, write_random_file};
pub use daemon::{Daemon, LOG_TAIL_LINES, NotReady, Stop};
pub use http::{HttpResponse, http_get, try_http_get};
pub use rng::Rng;
pub use tree::{Node, Tree, TreeDigest, gen_tree, tree_digest, try_tree_digest};
#[cfg(feature = "tokio")]
pub use wait::poll_until_async;
pub use wait::{POLL_INTERVAL, file_text, poll_every, poll_until};
