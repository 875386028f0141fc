//! The one place that reaps child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest, so it must reap processes it never
//! started. A blanket `waitpid(-1)` would steal the statuses of its own children from whoever
//! waits for them, so nothing else in the agent waits: execs are spawned through
//! [`Reaper::spawn`], which registers the child's pid, and the reaper (woken by `SIGCHLD`)
//! reaps everything and hands each registered child's status to its waiter. Statuses of
//! unregistered processes (orphans) are dropped.
//!
//! The registry lock is held across `fork`/`exec` and across every `waitpid`, so a child that
//! exits before its registration (or one that `std` itself reaps after a failed `exec`) can
//! never be reaped by the loop first.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::process::{WaitOptions, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// See the module docs.
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Reaper {
    /// Installs the `SIGCHLD` handler and starts the reaping task. Call inside the runtime,
    /// before spawning anything.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            waiters: Mutex::new(HashMap::new()),
        });
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        // Inserts and removes are single operations; a poisoned map is still consistent.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `command` and returns the child and a receiver of its wait status. Never call
    /// `wait` on the returned [`Child`].
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiters = self.lock();
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        // Pids fit in i32: the kernel's pid_max is at most 2^22.
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reaps every exited child, routing registered ones to their waiters.
    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if let Some(tx) = waiters.remove(&pid.as_raw_nonzero().get()) {
                        let _ = tx.send(status);
                    }
                }
                // No child has exited, or there are no children at all.
                Ok(None) | Err(_) => return,
            }
        }
    }
}
