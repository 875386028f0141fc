//! The kiln runner: sessions, the workflow executor and the run event stream.
//!
//! - [`session`]: the [`SessionManager`](session::SessionManager) binds exactly one VM to each
//!   session and guarantees its release.
//! - [`executor`]: the [`WorkflowExecutor`](executor::WorkflowExecutor) runs a workflow's jobs and
//!   steps in a session's VM.
//! - [`event`]: [`RunEvent`](event::RunEvent), the one stream every consumer reads (terminal,
//!   `--json`, logs, store).
//! - [`vm_types`]: how a job's `runs-on` labels select its VM type (size, image, time limit).

#![warn(missing_docs)]

pub mod event;
pub mod executor;
pub mod metrics;
pub mod pool;
pub mod session;
pub mod vm_types;
pub mod workspace;
