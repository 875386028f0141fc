//! Guest networking without a DHCP client: static settings from the kernel command line.
//!
//! `kiln.net=ADDRESS/PREFIX,GATEWAY[,DNS]` (QEMU's user-mode NAT is
//! `kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3`) configures the first non-loopback interface with
//! the classic `SIOCSIF*` ioctls, adds a default route through `GATEWAY` (`SIOCADDRT`) and writes
//! `/etc/resolv.conf`. Loopback is brought up separately, always.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Parsed `kiln.net=` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface address.
    pub address: Ipv4Addr,
    /// The prefix length (0-32).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The DNS server, if any.
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    /// Parses `ADDRESS/PREFIX,GATEWAY[,DNS]`.
    pub fn parse(value: &str) -> Option<NetConfig> {
        let mut parts = value.split(',');
        let (address, prefix) = parts.next()?.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let gateway = parts.next()?.parse().ok()?;
        let dns = match parts.next() {
            Some(dns) => Some(dns.parse().ok()?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(NetConfig {
            address: address.parse().ok()?,
            prefix,
            gateway,
            dns,
        })
    }

    fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

/// Brings up interface `name` (`SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP`).
pub fn link_up(name: &str) -> std::io::Result<()> {
    let socket = inet_socket()?;
    let mut request = ifreq(name)?;
    ioctl(&socket, libc::SIOCGIFFLAGS, &mut request)?;
    // SAFETY: after SIOCGIFFLAGS the union holds the flags variant.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(&socket, libc::SIOCSIFFLAGS, &mut request)
}

/// Applies `config` to the first non-loopback interface (waiting up to 5 s for it to appear).
pub fn configure(config: &NetConfig) -> std::io::Result<String> {
    let name = wait_for_interface(Duration::from_secs(5))?;
    let socket = inet_socket()?;

    let mut request = ifreq(&name)?;
    request.ifr_ifru.ifru_addr = sockaddr(config.address);
    ioctl(&socket, libc::SIOCSIFADDR, &mut request)?;

    let mut request = ifreq(&name)?;
    request.ifr_ifru.ifru_netmask = sockaddr(config.netmask());
    ioctl(&socket, libc::SIOCSIFNETMASK, &mut request)?;

    link_up(&name)?;

    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(config.gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one `struct rtentry`, which RtEntry mirrors field for field
    // (repr(C)); the pointer fields are null, which the kernel accepts ("any device").
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &mut route) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    if let Some(dns) = config.dns {
        // /etc/resolv.conf may be a dangling symlink (systemd-resolved images): replace it.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"))?;
    }
    Ok(name)
}

fn wait_for_interface(timeout: Duration) -> std::io::Result<String> {
    let started = Instant::now();
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lo")
            .collect();
        names.sort();
        if let Some(name) = names.into_iter().next() {
            return Ok(name);
        }
        if started.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no network interface besides lo",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel's `struct rtentry` (x86_64 layout), which the libc crate lacks for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn inet_socket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?)
}

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() || name.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(request)
}

fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs; the kernel reads a
    // sockaddr whose family says AF_INET as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ioctl(socket: &OwnedFd, request: libc::c_ulong, ifr: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: every request used here (SIOC[GS]IF*) reads or writes exactly one ifreq, which
    // `ifr` is, valid and exclusively borrowed for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, ifr as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_user_networking() {
        let config = NetConfig::parse("10.0.2.15/24,10.0.2.2,10.0.2.3").expect("parses");
        assert_eq!(config.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(config.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(config.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(config.dns, Some(Ipv4Addr::new(10, 0, 2, 3)));
        let no_dns = NetConfig::parse("192.168.1.9/16,192.168.0.1").expect("parses");
        assert_eq!(no_dns.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(no_dns.dns, None);
    }

    #[test]
    fn rejects_malformed_settings() {
        for bad in [
            "",
            "10.0.2.15",
            "10.0.2.15/33,10.0.2.2",
            "10.0.2.15/24",
            "10.0.2.15/24,x",
            "10.0.2.15/24,10.0.2.2,10.0.2.3,extra",
        ] {
            assert_eq!(NetConfig::parse(bad), None, "{bad}");
        }
        assert_eq!(
            NetConfig::parse("10.0.0.1/0,10.0.0.2").map(|c| c.netmask()),
            Some(Ipv4Addr::UNSPECIFIED)
        );
    }
}
