//! The `synod` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Synod: a replicated command log with WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
    /// Print this node's engine fingerprint (what peers compare).
    Engine,
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Build Rust plugin crates into components.
    Build {
        /// A plugin crate, or a workspace of them.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Only this package (repeatable).
        #[arg(short, long = "package")]
        packages: Vec<String>,
        /// Where to write the components (default: <target>/components).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Guest target dir (default: $SYNOD_PLUGIN_TARGET_DIR or target/ of
        /// the guest workspace).
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Validate a component as a command handler and print what it declares.
    Inspect {
        /// The component file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Plugin { command: PluginCmd::Build { dir, packages, out_dir, target_dir } } => {
            let options = synod::toolchain::BuildOptions { packages, target_dir, out_dir };
            for built in synod::toolchain::build(&dir, &options)? {
                let size = std::fs::metadata(&built.component)?.len();
                println!("{}\t{}\t{size} bytes", built.name, built.component.display());
            }
        }
        Cmd::Plugin { command: PluginCmd::Inspect { file } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let runtime = synod::runtime::Runtime::new()?;
            let plugin = runtime.load(&bytes, synod::runtime::PluginLimits::default())?;
            let info = serde_json::json!({
                "sha256": plugin.sha256_hex(),
                "commands": plugin.info().commands,
                "queries": plugin.info().queries,
                "limits": plugin.limits(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Cmd::Engine => {
            let runtime = synod::runtime::Runtime::new()?;
            println!("{}", serde_json::to_string_pretty(runtime.fingerprint())?);
        }
    }
    Ok(())
}
