//! The `kiln` command line: argument parsing and wiring only.
//!
//! [`main`] parses arguments, starts logging, runs a command and maps its error to an exit code
//! in one place:
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | every run succeeded |
//! | 1    | a run failed |
//! | 2    | usage or workflow validation error |
//! | 3    | infrastructure error (backend unavailable, VM failed to boot) |
//! | 130  | cancelled (Ctrl-C) |

mod args;
mod config;
mod debug;
mod image;
mod inputs;
mod pool;
mod render;
mod rerun;
mod run;
mod runs;
mod serve;
pub mod terminal;
mod workflows;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// Exit codes (DESIGN.md, "CLI").
pub mod exit {
    /// Every run succeeded.
    pub const SUCCESS: u8 = 0;
    /// A run failed.
    pub const FAILURE: u8 = 1;
    /// Usage or workflow validation error.
    pub const USAGE: u8 = 2;
    /// Infrastructure error.
    pub const INFRA: u8 = 3;
    /// Cancelled.
    pub const CANCELLED: u8 = 130;
}

/// An error that carries its exit code.
#[derive(Debug)]
pub struct Exit {
    code: u8,
    error: anyhow::Error,
}

impl Exit {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Exit {
        Exit {
            code,
            error: error.into(),
        }
    }
}

/// Shorthand: a usage error (exit 2).
fn usage(error: impl Into<anyhow::Error>) -> Exit {
    Exit::new(exit::USAGE, error)
}

/// Runs kiln with the process's arguments.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INFRA);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Exit { code, error }) => {
            eprintln!("error: {}", chain(&error));
            ExitCode::from(code)
        }
    }
}

/// `error: a: b: c` from an error and its sources, each printed once.
fn chain(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var("KILN_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let ansi = render::Style::detect_ansi();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

async fn dispatch(cli: Cli) -> Result<u8, Exit> {
    let file = config::FileConfig::load(cli.config.as_deref()).map_err(usage)?;
    match cli.command {
        Command::Run(args) => run::run(&file, *args).await,
        Command::List(args) => workflows::list(&args),
        Command::Validate(args) => workflows::validate(&args),
        Command::Doctor => run::doctor(&file).await,
        Command::Image(cmd) => image::image(&file, cmd).await,
        Command::Runs { json, limit } => runs::list(&file, json, limit).await,
        Command::Logs { run, json } => runs::logs(&file, &run, json).await,
        Command::Debug(args) => debug::debug(&file, args).await,
        Command::Rerun(args) => rerun::rerun(&file, args).await,
        Command::Pool(cmd) => pool::command(cmd),
        Command::Serve(args) => serve::serve(&file, args).await,
        Command::Worker => not_yet("kiln worker", "service mode"),
    }
}

fn not_yet(what: &str, needs: &str) -> Result<u8, Exit> {
    Err(usage(anyhow::anyhow!(
        "{what} is not yet supported: it needs {needs}, which this kiln version does not have"
    )))
}
