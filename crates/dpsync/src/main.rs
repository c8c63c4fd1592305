//! `dpsync`: the one binary. `server` (a site), `agent` (a distribution point), and the
//! admin commands that drive a running server over its Unix socket.

mod agent;
mod api;
mod cli;
mod client;
mod config;
mod logging;
mod quickstart;
mod site;
mod util;
mod wait;

fn main() -> std::process::ExitCode {
    cli::main()
}
