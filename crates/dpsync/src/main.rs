//! `dpsync`: the one binary. `server` (a site), `agent` (a distribution point), and the
//! admin commands that drive a running server over its Unix socket.

mod cli;
mod daemon;
mod docs;
mod logging;
mod quickstart;
mod util;
mod wait;

fn main() -> std::process::ExitCode {
    cli::main()
}
