//! Whole-system operations, used when the agent is PID 1: clock, hostname, signals to every
//! process, sync, power-off.

use std::io::Write;

use kiln_proto::{Clock, Signal};

/// `uname -r`.
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Sets the wall clock.
pub fn set_clock(clock: Clock) -> std::io::Result<()> {
    let timespec = rustix::time::Timespec {
        tv_sec: clock.secs,
        tv_nsec: i64::from(clock.nanos.min(999_999_999)),
    };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, timespec)?;
    Ok(())
}

/// Sets the hostname and makes it resolvable (so `sudo` does not complain).
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid hostname {name:?}"),
        ));
    }
    rustix::system::sethostname(name.as_bytes())?;
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let known = hosts
        .lines()
        .any(|line| line.split_whitespace().skip(1).any(|h| h == name));
    if !known {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open("/etc/hosts")?;
        if !hosts.is_empty() && !hosts.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        writeln!(file, "127.0.1.1\t{name}")?;
    }
    Ok(())
}

/// Signals every process except the agent itself (`kill(-1, sig)`). Only for PID 1: from
/// anywhere else this would hit every process of the user.
pub fn kill_everything(signal: Signal) {
    if !rustix::process::getpid().is_init() {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; -1 means every
    // process we may signal except ourselves, which is the intent here.
    let _ = unsafe { libc::kill(-1, crate::exec::to_rustix(signal).as_raw()) };
}

/// Flushes every filesystem to disk.
pub fn sync() {
    rustix::fs::sync();
}

/// Syncs and powers the machine off. Returns only if the kernel refused.
pub fn power_off() -> std::io::Error {
    sync();
    match rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        Ok(()) => std::io::Error::other("reboot(POWER_OFF) returned"),
        Err(e) => e.into(),
    }
}
