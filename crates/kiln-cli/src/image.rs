//! `kiln image build|list|rm|import`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::anyhow;
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
