//! Whom execs run as.
//!
//! Steps run as the guest's `runner` user (passwordless sudo, as on GitHub's hosted runners);
//! the host asks for root explicitly for its own housekeeping ([`ExecUser::Root`]). The agent is
//! linked statically and never calls NSS (see the crate docs), so it reads `/etc/passwd` and
//! `/etc/group` itself: `getpwnam`/`initgroups` are not available. The supplementary groups are
//! the primary group plus every group of `/etc/group` that lists the user, which is what
//! `initgroups` computes from files.
//!
//! The user is resolved at each hello ([`Identities::resolve`]):
//! - as PID 1 (root) with a `runner` in `/etc/passwd`: execs run as `runner`;
//! - as PID 1 without one (an image imported from a container tarball, say): as root, and the
//!   hello reply says why;
//! - under `--stdio` (tests, a host): as the agent's own user, whatever it is; nothing about the
//!   host's users is touched.
//!
//! Switching happens in the child between `fork` and `exec` ([`Identity::pre_exec`]): groups,
//! then gid, then uid, so nothing is left of root's credentials.

use std::ffi::CString;
use std::path::Path;

use kiln_proto::{ExecUser, UserInfo};

/// The guest user steps run as (created by `kiln image build`, uid 1001).
pub const RUNNER_USER: &str = "runner";

/// A user to run as, with what `exec` needs to become it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name, ids and home.
    pub info: UserInfo,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    /// Whether the child changes its credentials to these (only a root agent can; an agent
    /// running as this very user leaves them alone).
    pub switch: bool,
}

/// The users of one connection.
#[derive(Debug, Clone)]
pub struct Identities {
    /// [`ExecUser::Runner`].
    pub runner: Identity,
    /// Why `runner` is not the guest's `runner` user, if it is not.
    pub fallback: Option<String>,
    /// Whether the agent is root (and so can switch users at all, and run [`ExecUser::Root`]).
    pub agent_is_root: bool,
}

impl Identities {
    /// Looks the users up (see the module docs).
    pub fn resolve(pid1: bool) -> Identities {
        Identities::resolve_in(pid1, Path::new("/etc"))
    }

    fn resolve_in(pid1: bool, etc: &Path) -> Identities {
        let uid = rustix::process::geteuid().as_raw();
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
        let agent_is_root = uid == 0;
        let own = || {
            let gid = rustix::process::getegid().as_raw();
            let info = passwd_by_uid(&passwd, uid).unwrap_or_else(|| UserInfo {
                name: uid.to_string(),
                uid,
                gid,
                home: std::env::var("HOME").unwrap_or_else(|_| "/".to_owned()),
            });
            Identity {
                groups: Vec::new(),
                info,
                switch: false,
            }
        };
        if !pid1 {
            return Identities {
                runner: own(),
                fallback: Some("the agent serves --stdio: execs run as its own user".to_owned()),
                agent_is_root,
            };
        }
        if !agent_is_root {
            return Identities {
                runner: own(),
                fallback: Some(format!("the agent runs as uid {uid}, not root")),
                agent_is_root,
            };
        }
        match passwd_by_name(&passwd, RUNNER_USER) {
            Some(info) => Identities {
                runner: Identity {
                    groups: groups_of(&group, &info.name, info.gid),
                    info,
                    switch: true,
                },
                fallback: None,
                agent_is_root,
            },
            None => Identities {
                runner: root(&passwd),
                fallback: Some(format!(
                    "the guest has no `{RUNNER_USER}` user in /etc/passwd: execs run as root"
                )),
                agent_is_root,
            },
        }
    }

    /// The identity for `user`, or why the agent cannot run as it.
    pub fn for_user(&self, user: ExecUser) -> Result<Identity, String> {
        match user {
            ExecUser::Runner => Ok(self.runner.clone()),
            ExecUser::Root if self.agent_is_root => {
                let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
                Ok(root(&passwd))
            }
            ExecUser::Root => Err(format!(
                "Cannot run as root: the agent runs as uid {}",
                rustix::process::geteuid().as_raw()
            )),
        }
    }

    /// The owner to give files the agent creates for the host: the default user, when the
    /// agent could switch to it and it is not root (files made by root already belong to root).
    pub fn file_owner(&self) -> Option<(u32, u32)> {
        let info = &self.runner.info;
        (self.agent_is_root && info.uid != 0).then_some((info.uid, info.gid))
    }
}

/// root, with its home from `passwd` (else `/root`).
fn root(passwd: &str) -> Identity {
    let info = passwd_by_uid(passwd, 0).unwrap_or_else(|| UserInfo {
        name: "root".to_owned(),
        uid: 0,
        gid: 0,
        home: "/root".to_owned(),
    });
    Identity {
        groups: vec![0],
        info,
        switch: is_root(),
    }
}

impl Identity {
    /// The environment every exec of this user starts from (`HOME`, `USER`, `LOGNAME`).
    pub fn base_env(&self) -> [(String, String); 3] {
        [
            ("HOME".to_owned(), self.info.home.clone()),
            ("USER".to_owned(), self.info.name.clone()),
            ("LOGNAME".to_owned(), self.info.name.clone()),
        ]
    }

    /// Becomes this user. Only for the child between `fork` and `exec`: it only makes
    /// async-signal-safe system calls, on memory prepared before the fork.
    pub fn pre_exec(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let switch = self.switch;
        let (uid, gid, groups) = (self.info.uid, self.info.gid, self.groups.clone());
        move || {
            if !switch {
                return Ok(());
            }
            // SAFETY: `groups` is a live Vec for the whole call and its length is passed
            // along; setgroups only reads it.
            if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: plain system calls on integers. In the child of a fork only this thread
            // exists, so glibc's cross-thread setxid broadcast has nothing to wait for.
            if unsafe { libc::setgid(gid) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: as above.
            if unsafe { libc::setuid(uid) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The `passwd(5)` entry of `name`.
fn passwd_by_name(passwd: &str, name: &str) -> Option<UserInfo> {
    passwd
        .lines()
        .filter_map(parse_passwd)
        .find(|u| u.name == name)
}

/// The `passwd(5)` entry of `uid`.
fn passwd_by_uid(passwd: &str, uid: u32) -> Option<UserInfo> {
    passwd
        .lines()
        .filter_map(parse_passwd)
        .find(|u| u.uid == uid)
}

/// `name:password:uid:gid:gecos:home:shell`; comments and malformed lines are skipped.
fn parse_passwd(line: &str) -> Option<UserInfo> {
    if line.starts_with('#') {
        return None;
    }
    let fields: Vec<&str> = line.split(':').collect();
    let [name, _, uid, gid, _, home, ..] = fields.as_slice() else {
        return None;
    };
    if name.is_empty() || CString::new(*name).is_err() {
        return None;
    }
    Some(UserInfo {
        name: (*name).to_owned(),
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
        home: if home.is_empty() { "/" } else { home }.to_string(),
    })
}

/// The primary group and every `group(5)` entry that lists `user` as a member.
fn groups_of(group: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in group.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        let [_, _, gid, members, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        if members.split(',').any(|m| m.trim() == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        broken line\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        runner:x:1001:1001::/home/runner:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:runner\nadm:x:4:syslog,runner\n\
        runner:x:1001:\ndocker:x:999:someoneelse\n";

    #[test]
    fn passwd_entries_parse_and_malformed_lines_are_skipped() {
        let runner = passwd_by_name(PASSWD, "runner").expect("runner");
        assert_eq!(
            runner,
            UserInfo {
                name: "runner".into(),
                uid: 1001,
                gid: 1001,
                home: "/home/runner".into()
            }
        );
        assert_eq!(passwd_by_uid(PASSWD, 0).expect("root").home, "/root");
        assert!(passwd_by_name(PASSWD, "broken line").is_none());
        assert!(passwd_by_name("runner:x:notanumber:1::/h:/bin/sh", "runner").is_none());
    }

    #[test]
    fn groups_are_the_primary_and_every_group_listing_the_user() {
        assert_eq!(groups_of(GROUP, "runner", 1001), vec![1001, 27, 4]);
        assert_eq!(groups_of(GROUP, "nobody", 65534), vec![65534]);
    }

    #[test]
    fn without_a_runner_user_pid1_falls_back_to_root_and_says_why() {
        let etc = tempfile::tempdir().expect("tempdir");
        std::fs::write(etc.path().join("passwd"), "root:x:0:0:root:/root:/bin/sh\n")
            .expect("writes");
        let ids = Identities::resolve_in(true, etc.path());
        if ids.agent_is_root {
            assert_eq!(ids.runner.info.uid, 0);
            assert!(
                ids.fallback
                    .as_deref()
                    .is_some_and(|r| r.contains("no `runner` user")),
                "{:?}",
                ids.fallback
            );
            assert_eq!(ids.file_owner(), None);
        } else {
            assert!(ids.fallback.is_some());
        }
    }

    #[test]
    fn with_a_runner_user_pid1_runs_execs_as_runner() {
        let etc = tempfile::tempdir().expect("tempdir");
        std::fs::write(etc.path().join("passwd"), PASSWD).expect("writes");
        std::fs::write(etc.path().join("group"), GROUP).expect("writes");
        let ids = Identities::resolve_in(true, etc.path());
        if ids.agent_is_root {
            assert_eq!(ids.runner.info.name, "runner");
            assert_eq!(ids.runner.groups, vec![1001, 27, 4]);
            assert_eq!(ids.fallback, None);
            assert_eq!(ids.file_owner(), Some((1001, 1001)));
        }
        // Under --stdio nothing switches, whoever the agent is.
        let stdio = Identities::resolve_in(false, etc.path());
        assert_eq!(stdio.runner.info.uid, rustix::process::geteuid().as_raw());
        assert_eq!(stdio.file_owner(), None);
    }
}
