//! Command-line arguments. Precedence (file < environment < flags) is resolved in
//! [`crate::config`]; flags here are `Option`s so that "not given" is visible.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// kiln runs GitHub Actions workflows in disposable microVMs.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, max_term_width = 100)]
pub struct Cli {
    /// Configuration file (default: ./kiln.toml, then ~/.config/kiln/kiln.toml).
    #[arg(long, global = true, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More log output (-v: info, -vv: debug). KILN_LOG=<filter> overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// kiln's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run workflows: a file, or the workflows of a directory matching EVENT.
    Run(Box<RunArgs>),
    /// List the workflows and jobs that EVENT would run.
    List(ListArgs),
    /// Check workflow files without running them.
    Validate(ValidateArgs),
    /// Show which backends work on this host and why.
    Doctor,
    /// Build, list, remove and import guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List past runs (newest first) from the run database in the data dir.
    Runs {
        /// One JSON object per run and line on stdout.
        #[arg(long)]
        json: bool,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print a past run's logs.
    Logs {
        /// Run id (see `kiln runs`).
        run: String,
        /// The run's events as recorded, one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Restore a run's step snapshot into a fresh VM and open a shell there, or run one command.
    Debug(DebugArgs),
    /// Go on with a failed run from its last good step snapshot.
    Rerun(RerunArgs),
    /// Warm pools and ready snapshots.
    #[command(subcommand)]
    Pool(crate::pool::PoolCommand),
    /// Serve webhooks, the REST API, the web UI and /metrics.
    Serve(ServeArgs),
    /// Take runs from a shared queue (not yet supported).
    Worker,
}

/// `kiln image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a guest image (default name: `default`).
    Build {
        /// Image name.
        #[arg(default_value = "default")]
        name: String,
        /// Extra Debian packages (repeatable).
        #[arg(long = "package", value_name = "PKG")]
        packages: Vec<String>,
        /// Debian suite.
        #[arg(long)]
        suite: Option<String>,
        /// Debian mirror URL.
        #[arg(long)]
        mirror: Option<String>,
        /// Use this kernel (bzImage) instead of Debian's cloud kernel.
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// The guest agent binary to put in the image.
        #[arg(long, value_name = "FILE", env = "KILN_AGENT")]
        agent: Option<PathBuf>,
        /// Rebuild even when the cached image matches the recipe.
        #[arg(long)]
        force: bool,
    },
    /// List built images.
    List,
    /// Remove an image.
    Rm {
        /// Image name.
        name: String,
    },
    /// Turn an exported container filesystem (a tar file) into an image.
    Import {
        /// Image name.
        name: String,
        /// The root filesystem tarball.
        rootfs: PathBuf,
        /// The guest agent binary to put in the image.
        #[arg(long, value_name = "FILE", env = "KILN_AGENT")]
        agent: Option<PathBuf>,
    },
}

/// `kiln run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A workflow file, or a directory whose .github/workflows/*.y{a,}ml are matched to EVENT.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// The triggering event.
    #[arg(default_value = "push")]
    pub event: String,
    /// Run only this job (repeatable).
    #[arg(short, long = "job", value_name = "JOB")]
    pub jobs: Vec<String>,
    /// Run only matrix legs with KEY = VALUE (repeatable).
    #[arg(long = "matrix", value_name = "KEY:VALUE")]
    pub matrix: Vec<String>,
    /// The event payload (JSON file), for `github.event`.
    #[arg(short = 'e', long = "eventpath", value_name = "FILE")]
    pub event_path: Option<PathBuf>,
    /// A secret: NAME=VALUE, or NAME to read it from the environment (repeatable).
    #[arg(short = 's', long = "secret", value_name = "NAME[=VALUE]")]
    pub secrets: Vec<String>,
    /// Secrets from a file of NAME=VALUE lines.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Environment for every step, from a file of NAME=VALUE lines.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// A configuration variable (`vars` context): NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Variables from a file of NAME=VALUE lines.
    #[arg(long, value_name = "FILE")]
    pub var_file: Option<PathBuf>,
    /// An input (`inputs` context): NAME=VALUE (repeatable).
    #[arg(long = "input", value_name = "NAME=VALUE")]
    pub inputs: Vec<String>,
    /// Show what would run, without running anything.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// VM backend.
    #[arg(long, env = "KILN_BACKEND", value_name = "auto|local|qemu|firecracker")]
    pub backend: Option<String>,
    /// Guest image.
    #[arg(long, env = "KILN_IMAGE", value_name = "NAME")]
    pub image: Option<String>,
    /// One VM per workflow run, or one per job.
    #[arg(long, env = "KILN_ISOLATION", value_name = "workflow|job")]
    pub isolation: Option<String>,
    /// At most this many sessions (VMs) at once.
    #[arg(long, env = "KILN_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<usize>,
    /// At the session limit: wait for a slot, or fail.
    #[arg(long, env = "KILN_ON_LIMIT", value_name = "wait|fail")]
    pub on_limit: Option<String>,
    /// `steps`: snapshot the VM after each step, for `kiln debug` and `kiln rerun`.
    #[arg(long, value_name = "off|steps")]
    pub snapshots: Option<String>,
    /// Write one JSON event per line to stdout.
    #[arg(long)]
    pub json: bool,
    /// Boot every VM cold: no warm pool, no snapshot restore (for comparison and debugging).
    #[arg(long)]
    pub cold: bool,
    /// Never offer to build the default guest image when none is built (`--backend auto`).
    #[arg(long, env = "KILN_NO_PROMPT", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_build_prompt: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while kiln runs.
    #[arg(long, env = "KILN_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The action cache (default: `<data dir>/actions`).
    #[arg(long, env = "KILN_ACTION_CACHE", value_name = "DIR")]
    pub action_cache: Option<PathBuf>,
    /// Use only the action cache and --local-action; never fetch.
    #[arg(long, env = "KILN_OFFLINE")]
    pub offline: bool,
    /// Use a host directory for a remote action or reusable workflow's repository.
    #[arg(long = "local-action", value_name = "OWNER/REPO@REF=PATH")]
    pub local_actions: Vec<String>,
    /// Where remote actions are fetched from (`<URL>/<owner>/<repo>`).
    #[arg(
        long,
        env = "KILN_ACTIONS_URL",
        value_name = "URL",
        default_value = "https://github.com"
    )]
    pub actions_url: String,
}

/// `kiln debug`.
#[derive(Debug, Args)]
pub struct DebugArgs {
    /// Run id (a run made with `--snapshots steps`).
    pub run: String,
    /// The snapshot taken after step N (1-based, as in `Executing step N/M`) instead of the
    /// failure state.
    #[arg(long, value_name = "N")]
    pub step: Option<usize>,
    /// With --step: the job whose step (default: the job of the failed step, else the only
    /// job with snapshots).
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Run this command (in the step's environment and working directory) instead of a shell,
    /// and exit with its exit code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kiln rerun`.
#[derive(Debug, Args)]
pub struct RerunArgs {
    /// Run id (a failed run made with `--snapshots steps`).
    pub run: String,
    /// Restore the last good snapshot and go on from the failed step (the only kind of rerun
    /// for now; a full rerun is `kiln run` again).
    #[arg(long)]
    pub from_failed: bool,
    /// A secret: NAME=VALUE, or NAME to read it from the environment (repeatable). Secrets are
    /// never stored with a run, so pass them again.
    #[arg(short = 's', long = "secret", value_name = "NAME[=VALUE]")]
    pub secrets: Vec<String>,
    /// A configuration variable (`vars` context): NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Write one JSON event per line to stdout.
    #[arg(long)]
    pub json: bool,
}

/// `kiln serve`. Secrets come from the environment (`KILN_GITHUB_WEBHOOK_SECRET`,
/// `KILN_GITEA_WEBHOOK_SECRET`, `KILN_GITHUB_TOKEN`, `KILN_GITEA_TOKEN`, `KILN_API_TOKEN`, each
/// also as `<NAME>_FILE`), never from flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default: [server] listen, else 127.0.0.1:8080).
    #[arg(long, env = "KILN_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `kiln list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A workflow file or a directory.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// The triggering event.
    #[arg(default_value = "push")]
    pub event: String,
}

/// `kiln validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Workflow files or directories (default: the current directory's workflows).
    pub paths: Vec<PathBuf>,
}
