//! `kiln image build|list|rm|import`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::anyhow;
use kiln_vm::BackendConfig;
use kiln_vm::image::{self, ImageRecipe, ImportOptions, Phase};

use crate::args::ImageCommand;
use crate::config::{Dirs, FileConfig};
use crate::{Exit, exit, usage};

/// Runs an image command.
pub async fn image(file: &FileConfig, cmd: ImageCommand) -> Result<u8, Exit> {
    let dirs = Dirs::from_env();
    let data = dirs.data.clone();
    match cmd {
        ImageCommand::Build {
            name,
            packages,
            suite,
            mirror,
            kernel,
            agent,
            force,
        } => {
            let options = BuildOptions {
                name,
                packages,
                suite,
                mirror,
                kernel,
                agent,
                force,
            };
            build(file, &data, options).await?;
            Ok(exit::SUCCESS)
        }
        ImageCommand::List => {
            let images = image::list(&data).map_err(|e| Exit::new(exit::INFRA, e))?;
            if images.is_empty() {
                eprintln!(
                    "No images in {}. Build one with `kiln image build`.",
                    data.display()
                );
            }
            for info in images {
                println!(
                    "{:<16} kernel {:<24} {:>4} packages  created {}",
                    info.name(),
                    info.manifest.kernel_version,
                    info.manifest.packages.len(),
                    info.manifest.created_at
                );
            }
            Ok(exit::SUCCESS)
        }
        ImageCommand::Rm { name } => {
            image::remove(&data, &name).map_err(usage)?;
            eprintln!("removed image `{name}`");
            Ok(exit::SUCCESS)
        }
        ImageCommand::Import {
            name,
            rootfs,
            agent,
        } => {
            let options = ImportOptions::new(find_agent(agent)?);
            let info =
                blocking(move || image::import(&data, &name, &rootfs, &options, &progress)).await?;
            eprintln!("image `{}` imported: {}", info.name(), info.dir.display());
            Ok(exit::SUCCESS)
        }
    }
}

/// What `kiln image build` was asked for.
#[derive(Debug, Default)]
struct BuildOptions {
    name: String,
    packages: Vec<String>,
    suite: Option<String>,
    mirror: Option<String>,
    kernel: Option<PathBuf>,
    agent: Option<PathBuf>,
    force: bool,
}

/// Builds (or finds unchanged) an image, showing each phase on stderr.
async fn build(file: &FileConfig, data: &Path, options: BuildOptions) -> Result<(), Exit> {
    let BuildOptions {
        name,
        packages,
        suite,
        mirror,
        kernel,
        agent,
        force,
    } = options;
    let data = data.to_path_buf();
    let mut recipe = ImageRecipe::new(name.clone(), find_agent(agent)?);
    if let Some(section) = file.image(&name) {
        recipe.packages.extend(section.packages.iter().cloned());
        if let Some(s) = &section.suite {
            recipe.suite = s.clone();
        }
        if let Some(m) = &section.mirror {
            recipe.mirror = m.clone();
        }
    }
    recipe.packages.extend(packages);
    if let Some(s) = suite {
        recipe.suite = s;
    }
    if let Some(m) = mirror {
        recipe.mirror = m;
    }
    recipe.kernel = kernel;
    if force {
        // A changed name-independent input is the only cache key; removing the
        // installed image is how a rebuild is forced.
        let _ = image::remove(&data, &name);
    }
    let started = Instant::now();
    let info = blocking(move || image::build(&recipe, &data, &progress)).await?;
    eprintln!(
        "image `{}` ready in {:.1} s: kernel {}, {} packages, {}",
        info.name(),
        started.elapsed().as_secs_f64(),
        info.manifest.kernel_version,
        info.manifest.packages.len(),
        info.dir.display()
    );
    Ok(())
}

/// Whether `kiln run --backend auto` fell back to local only because no image is built: QEMU
/// is installed, and there is no image.
pub fn only_the_image_is_missing(config: &BackendConfig) -> bool {
    kiln_vm::qemu::missing_tools(&config.qemu()).is_none()
        && image::list(&config.data_dir).is_ok_and(|images| images.is_empty())
}

/// No image is built: on a terminal (stdin and stderr), and unless `ask` is false, offers to
/// build the default one now; otherwise prints the command that does. Returns whether an image
/// was built. Building needs root: as another user the build runs under `sudo`.
pub async fn offer_default_image(file: &FileConfig, data: &Path, ask: bool) -> Result<bool, Exit> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kiln"));
    let root = rustix::process::geteuid().is_root();
    let command = if root {
        format!("{} image build", exe.display())
    } else {
        format!(
            "sudo env KILN_DATA_DIR={} {} image build",
            data.display(),
            exe.display()
        )
    };
    let agent_found = std::env::var_os("KILN_AGENT").is_some() || image::find_agent().is_some();
    if !agent_found {
        // Without the static agent the build cannot start: say what comes first.
        eprintln!(
            "hint: no guest image is built, so steps run on this host; for real VMs build the \
             static guest agent (see the README, \"Real VMs\"), then run: {command} --agent AGENT"
        );
        return Ok(false);
    }
    let terminal = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if !(ask && terminal) {
        eprintln!(
            "hint: no guest image is built, so steps run on this host; for real VMs run: {command}"
        );
        return Ok(false);
    }
    eprint!(
        "No guest image is built, so steps would run on this host without isolation.\n\
         Build the default image now ({command}; a few minutes)? [y/N] "
    );
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| Exit::new(exit::INFRA, anyhow!("Reading the answer failed: {e}")))?
    .unwrap_or_default();
    if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        eprintln!("Not building it; for real VMs later run: {command}");
        return Ok(false);
    }
    if root {
        let options = BuildOptions {
            name: "default".to_owned(),
            ..BuildOptions::default()
        };
        build(file, data, options).await?;
    } else {
        let status = tokio::process::Command::new("sudo")
            .arg("env")
            .arg(format!("KILN_DATA_DIR={}", data.display()))
            .arg(&exe)
            .args(["image", "build"])
            .status()
            .await
            .map_err(|e| Exit::new(exit::INFRA, anyhow!("Cannot run sudo: {e}")))?;
        if !status.success() {
            return Err(Exit::new(
                exit::INFRA,
                anyhow!("Building the default image failed ({status})"),
            ));
        }
    }
    Ok(true)
}

fn progress(phase: Phase, detail: &str) {
    eprintln!("[{phase:>10}] {detail}");
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, image::ImageError> + Send + 'static,
) -> Result<T, Exit> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Exit::new(exit::INFRA, anyhow!("image task failed: {e}")))?
        .map_err(|e| Exit::new(exit::INFRA, e))
}

/// `--agent` (or `KILN_AGENT`, which clap already folds in), else what
/// [`image::find_agent`] finds: `kiln-agent` next to this executable, then on `PATH`.
fn find_agent(explicit: Option<PathBuf>) -> Result<PathBuf, Exit> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(usage(anyhow!("--agent {}: no such file", path.display())))
        };
    }
    image::find_agent().ok_or_else(|| {
        usage(anyhow!(
            "No kiln-agent binary next to kiln or on PATH: build it with \
             `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p kiln-agent \
             --target x86_64-unknown-linux-gnu` and pass --agent FILE"
        ))
    })
}
