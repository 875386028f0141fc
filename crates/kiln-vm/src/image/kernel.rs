//! Kernel artefacts: the bzImage header (version string, compressed payload), extraction of the
//! uncompressed ELF `vmlinux` that Firecracker boots, and module dependency resolution from each
//! module's own `.modinfo` section.
//!
//! # vmlinux from a bzImage
//! The setup header gives `setup_sects` (0x1f1) and `payload_offset`/`payload_length`
//! (0x248/0x24c), relative to the protected-mode code at `(setup_sects + 1) * 512`. Debian's cloud
//! kernel compresses the payload with **legacy** LZ4 (`lz4 -l`): the magic `02 21 4c 18`, then
//! repeated `u32 LE length` + block (each at most 8 MiB decoded, a repeated magic may start a new
//! stream), and the kernel build appends the decompressed size as the last 4 bytes.
//!
//! # Module order
//! Debian's kernel package ships no `modules.dep`, and the virtio load order changes between
//! point releases. Each `.ko` names what it needs in the `depends=` entry of its `.modinfo` ELF
//! section, so the order is a depth-first walk over those entries: dependencies first.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::ImageError;

/// Legacy LZ4 stream magic (little endian `02 21 4c 18`).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest block a legacy LZ4 stream decodes to.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

fn invalid(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Kernel {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Checks the x86 boot protocol magic and returns the kernel version string of a bzImage.
pub(crate) fn bzimage_version(path: &Path, data: &[u8]) -> Result<String, ImageError> {
    if data.get(0x202..0x206) != Some(b"HdrS") {
        return Err(invalid(path, "not an x86 bzImage (no `HdrS` boot header)"));
    }
    let offset = u16_at(data, 0x20e).ok_or_else(|| invalid(path, "truncated boot header"))?;
    let start = usize::from(offset) + 0x200;
    let tail = data
        .get(start..)
        .ok_or_else(|| invalid(path, "kernel version string is out of range"))?;
    let end = tail
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(tail.len())
        .min(256);
    let full = String::from_utf8_lossy(&tail[..end]);
    // "6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP ..." -> first word.
    full.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| invalid(path, "empty kernel version string"))
}

/// Decompresses the payload of an LZ4-compressed bzImage into the ELF `vmlinux`.
pub(crate) fn extract_vmlinux(path: &Path, data: &[u8]) -> Result<Vec<u8>, ImageError> {
    let setup_sects = match data.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err(invalid(path, "truncated boot header")),
    };
    let offset = u32_at(data, 0x248).ok_or_else(|| invalid(path, "truncated boot header"))?;
    let length = u32_at(data, 0x24c).ok_or_else(|| invalid(path, "truncated boot header"))?;
    let start = (setup_sects + 1) * 512 + offset as usize;
    let payload = data
        .get(start..start + length as usize)
        .ok_or_else(|| invalid(path, "compressed payload is out of range"))?;
    if u32_at(payload, 0) != Some(LZ4_LEGACY_MAGIC) {
        let magic: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(invalid(
            path,
            format!(
                "payload is not legacy LZ4 (magic {}); only LZ4 kernels can be unpacked to vmlinux",
                magic.join(" ")
            ),
        ));
    }
    if payload.len() < 8 {
        return Err(invalid(path, "LZ4 payload is truncated"));
    }
    let expected = u32_at(payload, payload.len() - 4).unwrap_or(0) as usize;
    let body = &payload[..payload.len() - 4];
    let mut out = Vec::with_capacity(expected);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 0;
    while pos + 4 <= body.len() {
        let word = u32_at(body, pos).unwrap_or(0);
        pos += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let len = word as usize;
        let chunk = body
            .get(pos..pos + len)
            .ok_or_else(|| invalid(path, "LZ4 block runs past the payload"))?;
        pos += len;
        let n = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| invalid(path, format!("LZ4 block does not decode: {e}")))?;
        out.extend_from_slice(&block[..n]);
        if out.len() > expected.max(1 << 30) {
            return Err(invalid(path, "LZ4 payload decodes past its declared size"));
        }
    }
    if out.len() != expected {
        return Err(invalid(
            path,
            format!("decoded {} bytes, the trailer says {expected}", out.len()),
        ));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(invalid(path, "decoded payload is not an ELF file"));
    }
    Ok(out)
}

/// The `key=value` entries of a kernel module's `.modinfo` section.
pub(crate) fn modinfo(path: &Path, data: &[u8]) -> Result<Vec<(String, String)>, ImageError> {
    let bad = |reason: &str| ImageError::Module {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !data.starts_with(b"\x7fELF") || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(bad("not a little-endian ELF64 file"));
    }
    let shoff = u64_at(data, 0x28).ok_or_else(|| bad("truncated ELF header"))? as usize;
    let shentsize = usize::from(u16_at(data, 0x3a).ok_or_else(|| bad("truncated ELF header"))?);
    let shnum = usize::from(u16_at(data, 0x3c).ok_or_else(|| bad("truncated ELF header"))?);
    let shstrndx = usize::from(u16_at(data, 0x3e).ok_or_else(|| bad("truncated ELF header"))?);
    if shentsize < 0x28 {
        return Err(bad("bad section header size"));
    }
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(data, at)?;
        let offset = u64_at(data, at + 0x18)? as usize;
        let size = u64_at(data, at + 0x20)? as usize;
        Some((name, offset, size))
    };
    let bytes = |offset: usize, size: usize| data.get(offset..offset.checked_add(size)?);
    let (_, str_off, str_size) = section(shstrndx).ok_or_else(|| bad("no section names"))?;
    let names = bytes(str_off, str_size).ok_or_else(|| bad("section names out of range"))?;
    for i in 0..shnum {
        let (name, offset, size) = section(i).ok_or_else(|| bad("section header out of range"))?;
        let name = names.get(name as usize..).unwrap_or_default();
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if &name[..end] != b".modinfo" {
            continue;
        }
        let info = bytes(offset, size).ok_or_else(|| bad(".modinfo out of range"))?;
        return Ok(info
            .split(|&b| b == 0)
            .filter_map(|entry| {
                let entry = std::str::from_utf8(entry).ok()?;
                let (k, v) = entry.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect());
    }
    Err(bad("no .modinfo section"))
}

/// A module's canonical name: the file stem with `-` replaced by `_`.
fn module_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".ko")?;
    Some(name.replace('-', "_"))
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), ImageError> {
    let entries =
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| ImageError::io(format!("inspecting {}", path.display()), e))?;
        if kind.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&path) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// One module to load, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderedModule {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
}

/// Resolves `wanted` (module names) and everything they depend on under `modules_dir`
/// (`lib/modules/<version>`), dependencies first. Names listed in `builtin` (from
/// `modules.builtin`) and wanted modules that do not exist at all are skipped: the kernel has them
/// built in or does not offer them.
pub(crate) fn resolve_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<(Vec<OrderedModule>, Vec<String>), ImageError> {
    let mut index = BTreeMap::new();
    index_modules(modules_dir, &mut index)?;
    let mut order = Vec::new();
    let mut missing = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if !index.contains_key(&name) {
            missing.push(name);
            continue;
        }
        visit(&name, &index, &mut done, &mut Vec::new(), &mut order)?;
    }
    Ok((order, missing))
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<OrderedModule>,
) -> Result<(), ImageError> {
    if done.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        stack.push(name.to_owned());
        return Err(ImageError::ModuleCycle(stack.join(" -> ")));
    }
    // A dependency that is not a file is built into the kernel.
    let Some(path) = index.get(name) else {
        return Ok(());
    };
    let data =
        fs::read(path).map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    let deps: Vec<String> = modinfo(path, &data)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect();
    stack.push(name.to_owned());
    for dep in &deps {
        visit(dep, index, done, stack, order)?;
    }
    stack.pop();
    done.insert(name.to_owned());
    order.push(OrderedModule {
        name: name.to_owned(),
        path: path.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 object with a `.modinfo` section holding `entries`.
    fn fake_module(entries: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for e in entries {
            modinfo.extend_from_slice(e.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let mut data = vec![0u8; 64];
        data[..4].copy_from_slice(b"\x7fELF");
        data[4] = 2;
        data[5] = 1;
        let modinfo_off = data.len();
        data.extend_from_slice(&modinfo);
        let strtab_off = data.len();
        data.extend_from_slice(&shstrtab);
        let shoff = data.len();
        let mut section = |name: u32, off: usize, size: usize| {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            data.extend_from_slice(&sh);
        };
        section(0, 0, 0);
        section(1, modinfo_off, modinfo.len());
        section(10, strtab_off, shstrtab.len());
        data[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        data[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        data[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        data[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        data
    }

    #[test]
    fn modinfo_reads_depends() {
        let data = fake_module(&[
            "license=GPL",
            "depends=virtio,virtio_ring",
            "name=virtio_blk",
        ]);
        let info = modinfo(Path::new("x.ko"), &data).unwrap();
        assert!(info.contains(&("depends".to_owned(), "virtio,virtio_ring".to_owned())));
        assert!(modinfo(Path::new("x.ko"), b"not an elf").is_err());
        assert!(modinfo(Path::new("x.ko"), &data[..70]).is_err());
    }

    #[test]
    fn order_follows_depends_not_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let drivers = dir.path().join("kernel/drivers");
        fs::create_dir_all(&drivers).unwrap();
        let write = |name: &str, deps: &str| {
            let data = fake_module(&[&format!("depends={deps}")]);
            fs::write(drivers.join(format!("{name}.ko")), data).unwrap();
        };
        // The 6.1.0-56 shape: virtio needs virtio_ring.
        write("virtio_ring", "");
        write("virtio", "virtio_ring");
        write("virtio_blk", "virtio,virtio_ring");
        write("virtio_mmio", "virtio,virtio_ring");
        write(
            "vmw_vsock_virtio_transport",
            "vmw_vsock_virtio_transport_common,vsock,virtio",
        );
        write("vmw_vsock_virtio_transport_common", "vsock");
        write("vsock", "");
        let (order, missing) = resolve_modules(
            dir.path(),
            &[
                "virtio_blk",
                "virtio_mmio",
                "vmw_vsock_virtio_transport",
                "virtio-nonexistent",
            ],
        )
        .unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "virtio_mmio",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
        assert_eq!(missing, ["virtio_nonexistent"]);
    }

    #[test]
    fn cycles_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.ko"), fake_module(&["depends=b"])).unwrap();
        fs::write(dir.path().join("b.ko"), fake_module(&["depends=a"])).unwrap();
        let err = resolve_modules(dir.path(), &["a"]).unwrap_err();
        assert!(err.to_string().contains("a -> b -> a"), "{err}");
    }

    #[test]
    fn garbage_kernels_are_rejected() {
        assert!(bzimage_version(Path::new("k"), &[0u8; 1024]).is_err());
        let mut data = vec![0u8; 4096];
        data[0x202..0x206].copy_from_slice(b"HdrS");
        data[0x1f1] = 1;
        data[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        data[0x24c..0x250].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(extract_vmlinux(Path::new("k"), &data).is_err());
    }
}
