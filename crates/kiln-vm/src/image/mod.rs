//! Guest images: building, listing, importing and removing them.
//!
//! An image is a directory `<data_dir>/images/<name>/` holding everything a VM backend boots:
//!
//! | file | what |
//! | --- | --- |
//! | `rootfs.ext4` | the root filesystem (read-only base; VMs write to an overlay) |
//! | `vmlinuz` | the kernel as a bzImage (QEMU boots it) |
//! | `vmlinux` | the same kernel as an uncompressed ELF (Firecracker boots it), when extractable |
//! | `initramfs.cpio` | `/init` (the agent), `/kiln/modules/*.ko`, `/kiln/modules.order` |
//! | `kiln-agent` | the agent binary the initramfs was built with |
//! | `modules/` | the kernel modules of the initramfs, in load order in `modules/order` |
//! | `manifest.json` | [`Manifest`]: recipe hash, kernel version, packages, sizes, creation time |
//!
//! # Build pipeline ([`build`])
//! 1. **Rootfs**: `mmdebstrap --mode=unshare --variant=minbase` with [`DEFAULT_PACKAGES`] plus the
//!    recipe's packages, as a tarball. A customize hook adds the `runner` user (uid 1001) with
//!    passwordless sudo, like GitHub's hosted runners.
//! 2. **Kernel** (in parallel with 1): `mmdebstrap --variant=extract` of `linux-image-cloud-amd64`
//!    (nothing is installed, the packages are only unpacked), or the recipe's own bzImage.
//! 3. **Modules**: the virtio, virtio-serial and vsock drivers plus whatever they depend on,
//!    ordered from each module's own `depends=` modinfo entry (never a hard-coded order).
//! 4. **vmlinux**: the LZ4 payload of the bzImage, decompressed (see `kernel`).
//! 5. **Filesystem**: the tarball unpacked with its numeric owners and turned into ext4 with
//!    `mke2fs -d` (no loop mount). Unpacking with the real owners needs root.
//! 6. **Initramfs**: a newc cpio written by kiln (see `cpio`); a dynamically linked agent gets
//!    its loader and libraries (from `ldd`) added.
//! 7. **Manifest**, then the new directory atomically replaces the old one.
//!
//! # Caching
//! [`ImageRecipe::hashes`] gives two hashes: the *rootfs hash* (suite, mirror, packages, kernel,
//! size, format version) and the *recipe hash* (the rootfs hash plus the agent's contents). An
//! image whose manifest has the same recipe hash is not rebuilt; one with only the same rootfs
//! hash keeps its rootfs and kernel and gets a new initramfs (a new agent costs about a second).
//! A lock file per image name serializes concurrent builds (several test binaries, several
//! `kiln` invocations).

mod cpio;
mod kernel;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Packages every image gets on top of Debian's minbase: what CI jobs and actions expect.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "git",
    "curl",
    "ca-certificates",
    "tar",
    "gzip",
    "xz-utils",
    "zstd",
    "unzip",
    "jq",
    "python3",
    "sudo",
    "procps",
    "nodejs",
];

/// The Debian suite images are built from unless a recipe says otherwise.
pub const DEFAULT_SUITE: &str = "bookworm";

/// The Debian mirror images are built from unless a recipe says otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Size of the root filesystem unless a recipe says otherwise. The file is sparse: only what the
/// packages use takes space, the rest is free space the guest can write to.
pub const DEFAULT_ROOTFS_MIB: u32 = 8192;

/// The layout version of an image directory; part of every hash.
const FORMAT_VERSION: u32 = 1;

/// The drivers the initramfs loads (plus their dependencies): virtio over MMIO (microvm) and PCI,
/// the root disk, the agent's virtio-serial port, the network, entropy, vsock (Firecracker's
/// agent channel) and overlayfs (Firecracker's writable root over the read-only base). Part of
/// the rootfs hash: a changed list rebuilds the image's kernel files.
const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "overlay",
];

/// The guest's user for steps, with passwordless sudo, as on GitHub's hosted runners.
pub const RUNNER_USER: &str = "runner";

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Image names are file names: letters, digits, `.`, `_`, `-`, not starting with `.`.
    #[error(
        "Invalid image name `{0}`: use letters, digits, `.`, `_` and `-` (not starting with `.`)"
    )]
    InvalidName(String),
    /// No such image.
    #[error("Image `{name}` does not exist in {} (run `kiln image build {name}`)", dir.display())]
    NotFound {
        /// The image name.
        name: String,
        /// The images directory looked in.
        dir: PathBuf,
    },
    /// A host tool the pipeline needs is missing.
    #[error(
        "`{tool}` is needed to build images but was not found (install the `{package}` package)"
    )]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// Building the filesystem needs root.
    #[error(
        "Building an image's ext4 root filesystem needs root (the files must keep their owners); run it as root"
    )]
    NeedsRoot,
    /// A command of the pipeline failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        /// The command line, abbreviated.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// A host I/O operation failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel could not be used.
    #[error("Kernel {}: {reason}", path.display())]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A kernel module could not be read.
    #[error("Kernel module {}: {reason}", path.display())]
    Module {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Kernel modules depend on each other in a circle.
    #[error("Kernel modules depend on each other in a circle: {0}")]
    ModuleCycle(String),
    /// A manifest could not be read or written.
    #[error("Manifest {}: {source}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    fn io(op: impl Into<String>, source: io::Error) -> ImageError {
        ImageError::Io {
            op: op.into(),
            source,
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecipe {
    /// The image name (a directory name).
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Debian mirror URL.
    pub mirror: String,
    /// Packages on top of [`DEFAULT_PACKAGES`].
    pub packages: Vec<String>,
    /// A bzImage to boot instead of Debian's cloud kernel. Its drivers for virtio, virtio-serial
    /// and ext4 must be built in: no modules are added for a user kernel.
    pub kernel: Option<PathBuf>,
    /// The `kiln-agent` binary that becomes the guest's `/init`.
    pub agent: PathBuf,
    /// Size of the ext4 root filesystem in MiB.
    pub rootfs_mib: u32,
}

impl ImageRecipe {
    /// A recipe with the defaults: bookworm, Debian's main mirror, no extra packages, Debian's
    /// cloud kernel.
    pub fn new(name: impl Into<String>, agent: impl Into<PathBuf>) -> ImageRecipe {
        ImageRecipe {
            name: name.into(),
            suite: DEFAULT_SUITE.to_owned(),
            mirror: DEFAULT_MIRROR.to_owned(),
            packages: Vec::new(),
            kernel: None,
            agent: agent.into(),
            rootfs_mib: DEFAULT_ROOTFS_MIB,
        }
    }

    /// The package set: defaults plus extras, sorted and without duplicates.
    pub fn package_set(&self) -> Vec<String> {
        let set: BTreeSet<String> = DEFAULT_PACKAGES
            .iter()
            .map(|p| (*p).to_owned())
            .chain(self.packages.iter().map(|p| p.trim().to_owned()))
            .filter(|p| !p.is_empty())
            .collect();
        set.into_iter().collect()
    }

    /// `(rootfs hash, recipe hash)`, both hex SHA-256. Reads the kernel and agent files.
    pub fn hashes(&self) -> Result<(String, String), ImageError> {
        let mut h = Sha256::new();
        h.update(format!("kiln-image-format {FORMAT_VERSION}\n"));
        h.update(format!("suite {}\nmirror {}\n", self.suite, self.mirror));
        h.update(format!("rootfs_mib {}\n", self.rootfs_mib));
        h.update(format!("modules {}\n", WANTED_MODULES.join(",")));
        for p in self.package_set() {
            h.update(format!("package {p}\n"));
        }
        match &self.kernel {
            Some(path) => h.update(format!("kernel {}\n", file_sha256(path)?)),
            None => h.update("kernel debian linux-image-cloud-amd64\n"),
        }
        let rootfs = hex(&h.finalize());
        let mut h = Sha256::new();
        h.update(format!(
            "rootfs {rootfs}\nagent {}\n",
            file_sha256(&self.agent)?
        ));
        Ok((rootfs, hex(&h.finalize())))
    }
}

/// Options of [`import`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The agent binary.
    pub agent: PathBuf,
    /// A bzImage instead of Debian's cloud kernel.
    pub kernel: Option<PathBuf>,
    /// Suite the Debian kernel comes from.
    pub suite: String,
    /// Mirror the Debian kernel comes from.
    pub mirror: String,
    /// Size of the ext4 root filesystem in MiB.
    pub rootfs_mib: u32,
}

impl ImportOptions {
    /// Defaults: Debian bookworm's cloud kernel, [`DEFAULT_ROOTFS_MIB`].
    pub fn new(agent: impl Into<PathBuf>) -> ImportOptions {
        ImportOptions {
            agent: agent.into(),
            kernel: None,
            suite: DEFAULT_SUITE.to_owned(),
            mirror: DEFAULT_MIRROR.to_owned(),
            rootfs_mib: DEFAULT_ROOTFS_MIB,
        }
    }
}

/// A phase of [`build`] or [`import`], reported to the progress callback as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The image is up to date; nothing is built.
    Cached,
    /// Bootstrapping the Debian root filesystem.
    Rootfs,
    /// Unpacking a root filesystem tarball.
    Unpack,
    /// Fetching and unpacking the kernel package.
    Kernel,
    /// Resolving the kernel modules and their load order.
    Modules,
    /// Decompressing the kernel to an ELF vmlinux.
    Vmlinux,
    /// Writing the ext4 filesystem.
    Filesystem,
    /// Writing the initramfs.
    Initramfs,
    /// Writing the manifest and installing the image.
    Manifest,
    /// Finished.
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Cached => "cached",
            Phase::Rootfs => "rootfs",
            Phase::Unpack => "unpack",
            Phase::Kernel => "kernel",
            Phase::Modules => "modules",
            Phase::Vmlinux => "vmlinux",
            Phase::Filesystem => "filesystem",
            Phase::Initramfs => "initramfs",
            Phase::Manifest => "manifest",
            Phase::Done => "done",
        })
    }
}

/// The progress callback: a phase and a one-line detail. Called from several threads.
pub type ProgressFn<'a> = &'a (dyn Fn(Phase, &str) + Sync);

/// One installed package of the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// Sizes of an image's files in bytes (`rootfs_allocated` is what the sparse file really uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// Apparent size of `rootfs.ext4`.
    pub rootfs: u64,
    /// Disk space `rootfs.ext4` really takes.
    pub rootfs_allocated: u64,
    /// `vmlinuz`.
    pub kernel: u64,
    /// `vmlinux`, 0 when absent.
    pub vmlinux: u64,
    /// `initramfs.cpio`.
    pub initramfs: u64,
    /// `kiln-agent`.
    pub agent: u64,
}

/// `manifest.json` of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version.
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Hash of everything the image was built from.
    pub recipe_hash: String,
    /// Hash of what the rootfs and kernel were built from.
    pub rootfs_hash: String,
    /// `build` or `import`.
    pub source: String,
    /// Debian suite (of the kernel, for imports).
    pub suite: String,
    /// Debian mirror.
    pub mirror: String,
    /// The kernel's version string, e.g. `6.1.0-50-cloud-amd64`.
    pub kernel_version: String,
    /// Whether `vmlinux` exists (Firecracker needs it).
    pub vmlinux: bool,
    /// Kernel modules the initramfs loads, in order.
    pub modules: Vec<String>,
    /// Installed packages (from the rootfs's dpkg database).
    pub packages: Vec<Package>,
    /// File sizes.
    pub sizes: Sizes,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Seconds the build took.
    pub build_seconds: f64,
}

/// An installed image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl ImageInfo {
    /// The image name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
    /// The ext4 root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    /// The bzImage.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The uncompressed ELF kernel, if it could be extracted.
    pub fn vmlinux(&self) -> Option<PathBuf> {
        self.manifest.vmlinux.then(|| self.dir.join("vmlinux"))
    }
    /// The initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
    /// The agent binary.
    pub fn agent(&self) -> PathBuf {
        self.dir.join("kiln-agent")
    }
}

/// Where the agent binary for new images is looked for: `$KILN_AGENT` if set, else `kiln-agent`
/// next to the running executable, else `kiln-agent` in `PATH`.
pub fn find_agent() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_AGENT") {
        return Some(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("kiln-agent")))
        .filter(|p| p.is_file());
    beside.or_else(|| find_in_path("kiln-agent"))
}

/// `<data_dir>/images`.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_owned()))
    }
}

/// Opens an installed image.
pub fn open(data_dir: &Path, name: &str) -> Result<ImageInfo, ImageError> {
    check_name(name)?;
    let dir = images_dir(data_dir).join(name);
    let path = dir.join("manifest.json");
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound {
                name: name.to_owned(),
                dir: images_dir(data_dir),
            });
        }
        Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| ImageError::Manifest { path, source })?;
    Ok(ImageInfo { dir, manifest })
}

/// Every installed image, sorted by name. Directories without a readable manifest (builds in
/// progress, leftovers) are skipped.
pub fn list(data_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let dir = images_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io(format!("reading {}", dir.display()), e)),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if check_name(&name).is_ok()
            && let Ok(image) = open(data_dir, &name)
        {
            images.push(image);
        }
    }
    images.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(images)
}

/// Removes an installed image. VMs already running from it keep their open files.
pub fn remove(data_dir: &Path, name: &str) -> Result<(), ImageError> {
    let image = open(data_dir, name)?;
    let _lock = lock(data_dir, name)?;
    let trash = images_dir(data_dir).join(format!(".{name}.rm-{}", std::process::id()));
    fs::rename(&image.dir, &trash)
        .map_err(|e| ImageError::io(format!("moving {} away", image.dir.display()), e))?;
    fs::remove_dir_all(&trash)
        .map_err(|e| ImageError::io(format!("removing {}", trash.display()), e))
}

/// Builds the image `recipe` describes, or returns the installed one when it is up to date.
pub fn build(
    recipe: &ImageRecipe,
    data_dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<ImageInfo, ImageError> {
    let started = Instant::now();
    check_name(&recipe.name)?;
    let (rootfs_hash, recipe_hash) = recipe.hashes()?;
    let _lock = lock(data_dir, &recipe.name)?;
    remove_stale(data_dir, &recipe.name);
    let existing = open(data_dir, &recipe.name).ok();
    if let Some(image) = &existing
        && image.manifest.recipe_hash == recipe_hash
    {
        progress(
            Phase::Cached,
            &format!("image `{}` is up to date", recipe.name),
        );
        return Ok(image.clone());
    }
    let staging = Staging::new(data_dir, &recipe.name)?;
    let reuse = existing.filter(|image| image.manifest.rootfs_hash == rootfs_hash);
    let base = match &reuse {
        Some(image) => {
            progress(
                Phase::Rootfs,
                "reusing the rootfs and kernel (only the agent changed)",
            );
            reuse_base(image, &staging.dir)?
        }
        None => build_base(recipe, &staging.dir, progress)?,
    };
    let image = finish(
        &staging,
        &base,
        Finish {
            name: &recipe.name,
            agent: &recipe.agent,
            recipe_hash,
            rootfs_hash,
            source: "build",
            suite: &recipe.suite,
            mirror: &recipe.mirror,
            started,
        },
        progress,
    )?;
    drop(staging);
    Ok(image)
}

/// Turns a root filesystem tarball (e.g. `docker export`) into an image named `name`, with
/// Debian's cloud kernel (or `options.kernel`) and the given agent. Always rebuilds.
pub fn import(
    data_dir: &Path,
    name: &str,
    rootfs_tar: &Path,
    options: &ImportOptions,
    progress: ProgressFn<'_>,
) -> Result<ImageInfo, ImageError> {
    let started = Instant::now();
    check_name(name)?;
    require_root()?;
    let tar_hash = file_sha256(rootfs_tar)?;
    let kernel_hash = match &options.kernel {
        Some(path) => file_sha256(path)?,
        None => format!("debian {} {}", options.suite, options.mirror),
    };
    let rootfs_hash = hex(&Sha256::digest(format!(
        "kiln-image-format {FORMAT_VERSION}\nimport {tar_hash}\nkernel {kernel_hash}\nrootfs_mib {}\n",
        options.rootfs_mib
    )));
    let recipe_hash = hex(&Sha256::digest(format!(
        "rootfs {rootfs_hash}\nagent {}\n",
        file_sha256(&options.agent)?
    )));
    let _lock = lock(data_dir, name)?;
    remove_stale(data_dir, name);
    let staging = Staging::new(data_dir, name)?;
    let work = staging.dir.join("work");
    mkdir(&work)?;
    let (rootfs, kernel) = std::thread::scope(|s| {
        let kernel = s.spawn(|| {
            fetch_kernel(
                options.kernel.as_deref(),
                &options.suite,
                &options.mirror,
                &staging.dir,
                progress,
            )
        });
        let rootfs = (|| {
            progress(
                Phase::Unpack,
                &format!("unpacking {}", rootfs_tar.display()),
            );
            let root = work.join("root");
            unpack_tar(rootfs_tar, &root)?;
            let packages = read_dpkg_status(&root);
            progress(Phase::Filesystem, "writing rootfs.ext4 with mke2fs -d");
            mke2fs(&root, &staging.dir.join("rootfs.ext4"), options.rootfs_mib)?;
            Ok::<_, ImageError>(packages)
        })();
        let kernel = kernel.join().unwrap_or_else(|_| {
            Err(ImageError::io(
                "fetching the kernel",
                io::Error::other("the kernel thread panicked"),
            ))
        });
        (rootfs, kernel)
    });
    let packages = rootfs?;
    let kernel = kernel?;
    remove_dir(&work)?;
    let base = Base { packages, kernel };
    finish(
        &staging,
        &base,
        Finish {
            name,
            agent: &options.agent,
            recipe_hash,
            rootfs_hash,
            source: "import",
            suite: &options.suite,
            mirror: &options.mirror,
            started,
        },
        progress,
    )
}

/// The rootfs-side results a build hands to [`finish`]; the files are in the staging dir.
struct Base {
    packages: Vec<Package>,
    kernel: KernelParts,
}

struct KernelParts {
    version: String,
    vmlinux: bool,
    modules: Vec<String>,
}

struct Finish<'a> {
    name: &'a str,
    agent: &'a Path,
    recipe_hash: String,
    rootfs_hash: String,
    source: &'static str,
    suite: &'a str,
    mirror: &'a str,
    started: Instant,
}

fn build_base(
    recipe: &ImageRecipe,
    dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<Base, ImageError> {
    require_root()?;
    require_tool("mmdebstrap", "mmdebstrap")?;
    require_tool("mke2fs", "e2fsprogs")?;
    let work = dir.join("work");
    mkdir(&work)?;
    let (rootfs, kernel) = std::thread::scope(|s| {
        let kernel = s.spawn(|| {
            fetch_kernel(
                recipe.kernel.as_deref(),
                &recipe.suite,
                &recipe.mirror,
                dir,
                progress,
            )
        });
        let rootfs = build_rootfs(recipe, dir, &work, progress);
        let kernel = kernel.join().unwrap_or_else(|_| {
            Err(ImageError::io(
                "fetching the kernel",
                io::Error::other("the kernel thread panicked"),
            ))
        });
        (rootfs, kernel)
    });
    let packages = rootfs?;
    let kernel = kernel?;
    remove_dir(&work)?;
    Ok(Base { packages, kernel })
}

fn build_rootfs(
    recipe: &ImageRecipe,
    dir: &Path,
    work: &Path,
    progress: ProgressFn<'_>,
) -> Result<Vec<Package>, ImageError> {
    let packages = recipe.package_set();
    progress(
        Phase::Rootfs,
        &format!(
            "mmdebstrap {} minbase + {} packages",
            recipe.suite,
            packages.len()
        ),
    );
    let tarball = work.join("rootfs.tar");
    let sudoers = format!("{RUNNER_USER} ALL=(ALL) NOPASSWD:ALL");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=unshare", "--variant=minbase", "--format=tar", "--quiet"])
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!(
            "--customize-hook=chroot \"$1\" useradd --create-home --uid 1001 --user-group --shell /bin/bash {RUNNER_USER}"
        ))
        .arg(format!(
            "--customize-hook=echo '{sudoers}' > \"$1/etc/sudoers.d/{RUNNER_USER}\" && chmod 0440 \"$1/etc/sudoers.d/{RUNNER_USER}\""
        ))
        .arg("--customize-hook=printf '127.0.0.1 localhost\\n::1 localhost ip6-localhost ip6-loopback\\n' > \"$1/etc/hosts\"")
        .arg(&recipe.suite)
        .arg(&tarball)
        .arg(&recipe.mirror)
        .env("TMPDIR", work);
    run(&mut cmd, "mmdebstrap (rootfs)")?;
    progress(Phase::Unpack, "unpacking the rootfs tarball");
    let root = work.join("root");
    unpack_tar(&tarball, &root)?;
    let _ = fs::remove_file(&tarball);
    let installed = read_dpkg_status(&root);
    progress(
        Phase::Filesystem,
        &format!(
            "writing rootfs.ext4 ({} MiB, sparse) with mke2fs -d",
            recipe.rootfs_mib
        ),
    );
    mke2fs(&root, &dir.join("rootfs.ext4"), recipe.rootfs_mib)?;
    remove_dir(&root)?;
    Ok(installed)
}

/// Puts `vmlinuz`, `vmlinux` (when extractable) and `modules/` into `dir`.
fn fetch_kernel(
    user_kernel: Option<&Path>,
    suite: &str,
    mirror: &str,
    dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<KernelParts, ImageError> {
    let vmlinuz = dir.join("vmlinuz");
    let modules_out = dir.join("modules");
    mkdir(&modules_out)?;
    let mut modules = Vec::new();
    if let Some(path) = user_kernel {
        progress(
            Phase::Kernel,
            &format!("using the kernel {}", path.display()),
        );
        copy(path, &vmlinuz)?;
    } else {
        require_tool("mmdebstrap", "mmdebstrap")?;
        progress(
            Phase::Kernel,
            &format!("fetching linux-image-cloud-amd64 from {suite}"),
        );
        let work = dir.join("kernel-work");
        mkdir(&work)?;
        let tarball = work.join("kernel.tar");
        let mut cmd = Command::new("mmdebstrap");
        cmd.args([
            "--mode=unshare",
            "--variant=extract",
            "--format=tar",
            "--quiet",
            "--include=linux-image-cloud-amd64",
        ])
        .arg(suite)
        .arg(&tarball)
        .arg(mirror)
        .env("TMPDIR", &work);
        run(&mut cmd, "mmdebstrap (kernel)")?;
        let tree = work.join("tree");
        mkdir(&tree)?;
        let mut cmd = Command::new("tar");
        cmd.arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tree)
            .args(["./boot", "./lib/modules"]);
        run(&mut cmd, "tar (kernel)")?;
        let boot = tree.join("boot");
        let found = read_dir_names(&boot)?
            .into_iter()
            .filter(|n| n.starts_with("vmlinuz-"))
            .max()
            .ok_or_else(|| ImageError::Kernel {
                path: boot.clone(),
                reason: "the package has no vmlinuz".to_owned(),
            })?;
        let version = found.trim_start_matches("vmlinuz-").to_owned();
        copy(&boot.join(&found), &vmlinuz)?;
        progress(
            Phase::Modules,
            &format!("resolving module order for {version}"),
        );
        let modules_dir = tree.join("lib/modules").join(&version);
        let (order, missing) = kernel::resolve_modules(&modules_dir, WANTED_MODULES)?;
        if !missing.is_empty() {
            progress(
                Phase::Modules,
                &format!(
                    "not modules in this kernel (built in or absent): {}",
                    missing.join(", ")
                ),
            );
        }
        for module in &order {
            copy(
                &module.path,
                &modules_out.join(format!("{}.ko", module.name)),
            )?;
            modules.push(module.name.clone());
        }
        remove_dir(&work)?;
    }
    write(&modules_out.join("order"), modules.join("\n").as_bytes())?;
    let data = fs::read(&vmlinuz)
        .map_err(|e| ImageError::io(format!("reading {}", vmlinuz.display()), e))?;
    let version = kernel::bzimage_version(&vmlinuz, &data)?;
    progress(Phase::Vmlinux, "decompressing the kernel to vmlinux");
    let vmlinux = match kernel::extract_vmlinux(&vmlinuz, &data) {
        Ok(elf) => {
            write(&dir.join("vmlinux"), &elf)?;
            true
        }
        Err(e) => {
            progress(
                Phase::Vmlinux,
                &format!("no vmlinux (Firecracker cannot boot this image): {e}"),
            );
            false
        }
    };
    Ok(KernelParts {
        version,
        vmlinux,
        modules,
    })
}

fn reuse_base(image: &ImageInfo, dir: &Path) -> Result<Base, ImageError> {
    let link = |name: &str| {
        let from = image.dir.join(name);
        let to = dir.join(name);
        fs::hard_link(&from, &to)
            .or_else(|_| fs::copy(&from, &to).map(|_| ()))
            .map_err(|e| ImageError::io(format!("reusing {}", from.display()), e))
    };
    link("rootfs.ext4")?;
    link("vmlinuz")?;
    if image.manifest.vmlinux {
        link("vmlinux")?;
    }
    mkdir(&dir.join("modules"))?;
    for name in read_dir_names(&image.dir.join("modules"))? {
        link(&format!("modules/{name}"))?;
    }
    Ok(Base {
        packages: image.manifest.packages.clone(),
        kernel: KernelParts {
            version: image.manifest.kernel_version.clone(),
            vmlinux: image.manifest.vmlinux,
            modules: image.manifest.modules.clone(),
        },
    })
}

fn finish(
    staging: &Staging,
    base: &Base,
    f: Finish<'_>,
    progress: ProgressFn<'_>,
) -> Result<ImageInfo, ImageError> {
    let dir = &staging.dir;
    progress(Phase::Initramfs, "writing initramfs.cpio");
    copy(f.agent, &dir.join("kiln-agent"))?;
    set_mode(&dir.join("kiln-agent"), 0o755)?;
    write_initramfs(
        f.agent,
        &dir.join("modules"),
        &base.kernel.modules,
        &dir.join("initramfs.cpio"),
    )?;
    progress(Phase::Manifest, "writing manifest.json");
    let size = |name: &str| fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let rootfs_meta = fs::metadata(dir.join("rootfs.ext4"))
        .map_err(|e| ImageError::io("inspecting rootfs.ext4", e))?;
    let manifest = Manifest {
        format: FORMAT_VERSION,
        name: f.name.to_owned(),
        recipe_hash: f.recipe_hash,
        rootfs_hash: f.rootfs_hash,
        source: f.source.to_owned(),
        suite: f.suite.to_owned(),
        mirror: f.mirror.to_owned(),
        kernel_version: base.kernel.version.clone(),
        vmlinux: base.kernel.vmlinux,
        modules: base.kernel.modules.clone(),
        packages: base.packages.clone(),
        sizes: Sizes {
            rootfs: rootfs_meta.len(),
            rootfs_allocated: rootfs_meta.blocks() * 512,
            kernel: size("vmlinuz"),
            vmlinux: size("vmlinux"),
            initramfs: size("initramfs.cpio"),
            agent: size("kiln-agent"),
        },
        created_at: jiff::Timestamp::now().to_string(),
        build_seconds: f.started.elapsed().as_secs_f64(),
    };
    let path = dir.join("manifest.json");
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| ImageError::Manifest {
        path: path.clone(),
        source,
    })?;
    write(&path, &json)?;
    let target = images_dir(&staging.data_dir).join(f.name);
    staging.install(&target)?;
    progress(
        Phase::Done,
        &format!("image `{}` is in {}", f.name, target.display()),
    );
    Ok(ImageInfo {
        dir: target,
        manifest,
    })
}

/// Writes the initramfs: `/init` (the agent), its libraries when it is dynamic, `/dev/console`,
/// the modules and `/kiln/modules.order` (absolute paths, one a line, in load order).
fn write_initramfs(
    agent: &Path,
    modules_dir: &Path,
    modules: &[String],
    out: &Path,
) -> Result<(), ImageError> {
    let file =
        File::create(out).map_err(|e| ImageError::io(format!("creating {}", out.display()), e))?;
    let mut w = cpio::CpioWriter::new(BufWriter::new(file));
    let werr = |e| ImageError::io(format!("writing {}", out.display()), e);
    let agent_data =
        fs::read(agent).map_err(|e| ImageError::io(format!("reading {}", agent.display()), e))?;
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "newroot",
        "kiln/modules",
    ] {
        w.dir(dir, 0o755).map_err(werr)?;
    }
    w.char_device("dev/console", 0o600, 5, 1).map_err(werr)?;
    w.char_device("dev/null", 0o666, 1, 3).map_err(werr)?;
    w.file("init", 0o755, &agent_data).map_err(werr)?;
    for lib in shared_libraries(agent)? {
        let data =
            fs::read(&lib).map_err(|e| ImageError::io(format!("reading {}", lib.display()), e))?;
        w.file(&lib.to_string_lossy(), 0o755, &data).map_err(werr)?;
    }
    let mut order = String::new();
    for name in modules {
        let path = modules_dir.join(format!("{name}.ko"));
        let data = fs::read(&path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        w.file(&format!("kiln/modules/{name}.ko"), 0o644, &data)
            .map_err(werr)?;
        order.push_str(&format!("/kiln/modules/{name}.ko\n"));
    }
    if !modules.is_empty() {
        w.file("kiln/modules.order", 0o644, order.as_bytes())
            .map_err(werr)?;
    }
    w.finish().map_err(werr)?;
    Ok(())
}

/// The loader and libraries of a dynamically linked binary (`ldd`); empty when it is static.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(binary)
        .map_err(|e| ImageError::io(format!("opening {}", binary.display()), e))?;
    file.read_exact(&mut magic)
        .map_err(|e| ImageError::io(format!("reading {}", binary.display()), e))?;
    if &magic != b"\x7fELF" {
        return Err(ImageError::Kernel {
            path: binary.to_owned(),
            reason: "the agent is not an ELF executable".to_owned(),
        });
    }
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// A build directory next to the images that becomes the image on [`Staging::install`] and is
/// removed on drop otherwise.
struct Staging {
    data_dir: PathBuf,
    dir: PathBuf,
}

impl Staging {
    fn new(data_dir: &Path, name: &str) -> Result<Staging, ImageError> {
        let dir =
            images_dir(data_dir).join(format!(".{name}.build-{}", uuid::Uuid::new_v4().simple()));
        mkdir(&dir)?;
        Ok(Staging {
            data_dir: data_dir.to_owned(),
            dir,
        })
    }

    fn install(&self, target: &Path) -> Result<(), ImageError> {
        let old = target.with_file_name(format!(
            ".{}.old-{}",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("image"),
            uuid::Uuid::new_v4().simple()
        ));
        let had_old = target.exists();
        if had_old {
            fs::rename(target, &old)
                .map_err(|e| ImageError::io(format!("moving {} aside", target.display()), e))?;
        }
        fs::rename(&self.dir, target)
            .map_err(|e| ImageError::io(format!("installing {}", target.display()), e))?;
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes what an interrupted build, install or removal of `name` left behind. Only called with
/// the image's lock held, so nothing else is using those directories.
fn remove_stale(data_dir: &Path, name: &str) {
    let dir = images_dir(data_dir);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    let prefixes = [".build-", ".old-", ".rm-"].map(|p| format!(".{name}{p}"));
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if prefixes.iter().any(|p| file_name.starts_with(p.as_str())) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// An exclusive `flock` on `<images>/.<name>.lock`, released when dropped.
fn lock(data_dir: &Path, name: &str) -> Result<File, ImageError> {
    let dir = images_dir(data_dir);
    mkdir(&dir)?;
    let path = dir.join(format!(".{name}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ImageError::io(format!("locking {}", path.display()), e.into()))?;
    Ok(file)
}

fn require_root() -> Result<(), ImageError> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(ImageError::NeedsRoot)
    }
}

fn require_tool(tool: &'static str, package: &'static str) -> Result<(), ImageError> {
    if find_in_path(tool).is_some() {
        Ok(())
    } else {
        Err(ImageError::MissingTool { tool, package })
    }
}

/// The first `name` in `PATH` (plus the sbin directories, which a non-login root may lack).
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn unpack_tar(tarball: &Path, root: &Path) -> Result<(), ImageError> {
    mkdir(root)?;
    let mut cmd = Command::new("tar");
    cmd.args([
        "--numeric-owner",
        "--same-permissions",
        "--xattrs",
        "--xattrs-include=*",
        "-xf",
    ])
    .arg(tarball)
    .arg("-C")
    .arg(root);
    run(&mut cmd, "tar (rootfs)")
}

fn mke2fs(root: &Path, out: &Path, mib: u32) -> Result<(), ImageError> {
    let tool = find_in_path("mke2fs").ok_or(ImageError::MissingTool {
        tool: "mke2fs",
        package: "e2fsprogs",
    })?;
    let mut cmd = Command::new(tool);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", "kiln-root", "-m", "0"])
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ])
        .arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{mib}M"));
    run(&mut cmd, "mke2fs")
}

/// Installed packages from `var/lib/dpkg/status` under `root` (empty when there is none).
fn read_dpkg_status(root: &Path) -> Vec<Package> {
    let Ok(text) = fs::read_to_string(root.join("var/lib/dpkg/status")) else {
        return Vec::new();
    };
    let mut packages = Vec::new();
    for paragraph in text.split("\n\n") {
        let field = |key: &str| {
            paragraph
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
        };
        if let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
            && status.ends_with(" installed")
        {
            packages.push(Package {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    packages
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io(format!("running {what}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    Err(ImageError::Command {
        command: what.to_owned(),
        status: out.status.to_string(),
        output: tail,
    })
}

fn file_sha256(path: &Path) -> Result<String, ImageError> {
    let mut file =
        File::open(path).map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    io::copy(&mut file, &mut h)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mkdir(path: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|e| ImageError::io(format!("creating {}", path.display()), e))
}

fn remove_dir(path: &Path) -> Result<(), ImageError> {
    fs::remove_dir_all(path).map_err(|e| ImageError::io(format!("removing {}", path.display()), e))
}

fn copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| ImageError::io(format!("copying {} to {}", from.display(), to.display()), e))
}

fn write(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    fs::write(path, data).map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(format!("setting the mode of {}", path.display()), e))
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let mut names = Vec::new();
    for entry in
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?
    {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_build_directories_of_the_image_are_removed() {
        let data = tempfile::tempdir().unwrap();
        let images = images_dir(data.path());
        for d in [
            ".default.build-1",
            ".default.old-2",
            ".default.rm-3",
            ".other.build-1",
            "default",
        ] {
            fs::create_dir_all(images.join(d).join("x")).unwrap();
        }
        remove_stale(data.path(), "default");
        let mut left = read_dir_names(&images).unwrap();
        left.sort();
        assert_eq!(left, [".other.build-1", "default"]);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["default", "ci-2", "deb.12_x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes_change_with_what_they_cover() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"one").unwrap();
        let recipe = ImageRecipe::new("default", &agent);
        let (rootfs, full) = recipe.hashes().unwrap();
        let mut more = recipe.clone();
        more.packages.push("make".into());
        assert_ne!(more.hashes().unwrap().0, rootfs);
        // Order and duplicates of packages do not matter.
        let mut dup = recipe.clone();
        dup.packages = vec!["git".into(), "bash".into()];
        assert_eq!(dup.hashes().unwrap().0, rootfs);
        fs::write(&agent, b"two").unwrap();
        let (rootfs2, full2) = recipe.hashes().unwrap();
        assert_eq!(rootfs2, rootfs);
        assert_ne!(full2, full);
    }

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("var/lib/dpkg")).unwrap();
        fs::write(
            dir.path().join("var/lib/dpkg/status"),
            "Package: jq\nStatus: install ok installed\nVersion: 1.6-2.1\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b7\n",
        )
        .unwrap();
        let pkgs = read_dpkg_status(dir.path());
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bash", "jq"]);
        assert_eq!(pkgs[1].version, "1.6-2.1");
    }

    #[test]
    fn missing_images_say_how_to_build_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), "default").unwrap_err();
        assert!(
            err.to_string().contains("kiln image build default"),
            "{err}"
        );
        assert!(list(dir.path()).unwrap().is_empty());
        assert!(matches!(
            remove(dir.path(), "default"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn initramfs_holds_init_console_and_module_order() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("modules");
        fs::create_dir_all(&modules).unwrap();
        fs::write(modules.join("virtio_ring.ko"), b"ring").unwrap();
        fs::write(modules.join("virtio.ko"), b"virtio").unwrap();
        let agent = std::env::current_exe().unwrap();
        let out = dir.path().join("initramfs.cpio");
        write_initramfs(
            &agent,
            &modules,
            &["virtio_ring".into(), "virtio".into()],
            &out,
        )
        .unwrap();
        let data = fs::read(&out).unwrap();
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("kiln/modules.order"));
        assert!(text.contains("/kiln/modules/virtio_ring.ko\n/kiln/modules/virtio.ko\n"));
        assert!(text.contains("dev/console"));
        assert!(text.contains("init\0"));
    }
}
