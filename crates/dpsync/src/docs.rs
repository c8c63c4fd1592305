//! `dpsync completions SHELL` and `dpsync man DIR`: shell completions and man pages
//! generated from the clap definitions, so they never disagree with `--help`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::util::outln;

/// Prints the completion script of `shell` for `cmd` on stdout.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "dpsync", &mut out);
    let text = String::from_utf8(out).context("the completion script is not UTF-8")?;
    outln!("{}", text.trim_end());
    Ok(())
}

/// Writes one man page per command and subcommand into `dir`, and lists them.
pub fn man_pages(cmd: clap::Command, dir: &Path, json: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    let mut pages: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dpsync") && n.ends_with(".1"))
        .collect();
    pages.sort();
    if json {
        outln!("{}", serde_json::json!({ "dir": dir.display().to_string(), "pages": pages }));
    } else {
        outln!(
            "wrote {} man pages into {} (try: man -l {})",
            pages.len(),
            dir.display(),
            dir.join("dpsync.1").display()
        );
    }
    Ok(())
}
