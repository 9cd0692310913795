//! Man pages (clap_mangen) and shell completions (clap_complete) generated
//! from the command-line definitions, so the packaged documentation cannot
//! drift from the flags. Run by `scripts/package.sh` through the hidden
//! `dynamicproxy generate-docs DIR`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `DIR/man/dynamicproxy.1` (and one page per subcommand,
/// `dynamicproxy-proxy.1`, ...) and `DIR/completions/` for bash, zsh and fish.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // Unbuilt, so clap_mangen can leave out the `help` subcommand's pages.
    clap_mangen::generate_to(Cli::command(), &man)?;
    let mut cli = without_hidden(Cli::command());
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli, "dynamicproxy", &completions)?;
    }
    Ok(())
}

/// The command line less its hidden subcommands, which some shells'
/// completions would offer otherwise.
fn without_hidden(cli: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned().collect();
    let mut trimmed = clap::Command::new("dynamicproxy")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cli.get_arguments().cloned())
        .subcommands(visible)
        .subcommand_required(true);
    if let Some(about) = cli.get_about() {
        trimmed = trimmed.about(about.clone());
    }
    trimmed
}
