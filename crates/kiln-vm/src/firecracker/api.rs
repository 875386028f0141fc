//! The part of Firecracker's REST API that kiln uses, as typed values.
//!
//! The types follow Firecracker's OpenAPI description (`src/firecracker/swagger/firecracker.yaml`
//! in its repository, version 1.x): field names as the spec spells them, required fields as
//! plain fields, optional ones as `Option` left out of the JSON when `None`. Only what kiln sends
//! or reads is modelled; the spec has more (balloon, MMDS, CPU templates, hotplug).
//!
//! Every call is a [`Request`] value (method, path, body), so tests compare requests as data and
//! the client has one place that turns them into HTTP. A failed call becomes
//! [`FirecrackerApiError::Fault`]: the call's name (`PUT /boot-source`), the status and the
//! `fault_message` of the spec's `Error` object.

use serde::{Deserialize, Serialize};

/// `MachineConfiguration`: vCPUs and memory (`PUT /machine-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// Number of vCPUs, 1..=32 (1 or even when `smt` is on).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading (x86 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking, which diff snapshots need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// `None` or `2M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `BootSource` (`PUT /boot-source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Host path of the kernel (an uncompressed ELF `vmlinux` on x86_64).
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `Drive` (`PUT /drives/{drive_id}`), a virtio-block device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// The id, also the last path segment of the call.
    pub drive_id: String,
    /// Whether Firecracker adds `root=` for this drive to the command line.
    pub is_root_device: bool,
    /// Host path of the backing file (required for virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Read-only device (required for virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// `Unsafe` (default) or `Writeback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// `Sync` (default) or `Async`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored.
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O.
    Sync,
    /// io_uring (host kernels newer than 5.10.51).
    Async,
}

/// `NetworkInterface` (`PUT /network-interfaces/{iface_id}`), backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// The id, also the last path segment of the call.
    pub iface_id: String,
    /// The host TAP device's name.
    pub host_dev_name: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `Vsock` (`PUT /vsock`): the virtio-vsock device and the host Unix socket that proxies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// The guest's context id, at least 3.
    pub guest_cid: u32,
    /// The host socket Firecracker listens on for host-initiated connections.
    pub uds_path: String,
}

/// `Logger` (`PUT /logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// Where the log goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// `InstanceActionInfo` (`PUT /actions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Writes the metrics now.
    FlushMetrics,
    /// Boots the configured VM.
    InstanceStart,
    /// Presses Ctrl+Alt+Del (x86 only).
    SendCtrlAltDel,
}

/// `Vm` (`PATCH /vm`): pause or resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The wanted state.
    pub state: RunState,
}

/// `Vm.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// vCPUs stopped.
    Paused,
    /// vCPUs running.
    Resumed,
}

/// `SnapshotCreateParams` (`PUT /snapshot/create`, on a paused VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// Where the microVM state goes.
    pub snapshot_path: String,
    /// Where the guest memory goes.
    pub mem_file_path: String,
    /// `Full` (default) or `Diff` (only the pages dirtied since the last snapshot or load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// The whole guest memory.
    Full,
    /// Only dirtied pages, at their offsets in a sparse file.
    Diff,
}

/// `SnapshotLoadParams` (`PUT /snapshot/load`, on a fresh process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: String,
    /// Where the guest memory comes from (the spec's replacement for `mem_file_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Keep tracking dirty pages, so diff snapshots of the restored VM work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// A new host socket for the vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// New TAP devices for network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: MemoryBackendType,
    /// The memory file (or the userfaultfd handler's socket).
    pub backend_path: String,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A file mapped privately: many VMs can load one file at once.
    File,
    /// A userfaultfd page-fault handler.
    Uffd,
}

/// `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    /// The new host socket path.
    pub uds_path: String,
}

/// `NetworkOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// `InstanceInfo` (`GET /`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name.
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
}

/// `FirecrackerVersion` (`GET /version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// E.g. `1.16.1`.
    pub firecracker_version: String,
}

/// The spec's `Error` object, the body of every failed call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong.
    #[serde(default)]
    pub fault_message: Option<String>,
}

/// An HTTP method Firecracker's API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read.
    Get,
    /// Create or replace (pre-boot configuration, actions, snapshots).
    Put,
    /// Update (`/vm` state).
    Patch,
}

impl Method {
    /// The method as HTTP spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// One API call as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, e.g. `/drives/rootfs`.
    pub path: String,
    /// The JSON body, if any.
    pub body: Option<serde_json::Value>,
}

impl Request {
    /// The call's name for errors: `PUT /drives/rootfs`.
    pub fn name(&self) -> String {
        format!("{} {}", self.method.as_str(), self.path)
    }

    fn put(path: impl Into<String>, body: &impl Serialize) -> Request {
        Request {
            method: Method::Put,
            path: path.into(),
            body: Some(to_value(body)),
        }
    }

    /// `PUT /machine-config`.
    pub fn machine_config(config: &MachineConfiguration) -> Request {
        Request::put("/machine-config", config)
    }

    /// `PUT /boot-source`.
    pub fn boot_source(source: &BootSource) -> Request {
        Request::put("/boot-source", source)
    }

    /// `PUT /drives/{drive_id}`.
    pub fn drive(drive: &Drive) -> Request {
        Request::put(format!("/drives/{}", drive.drive_id), drive)
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub fn network_interface(iface: &NetworkInterface) -> Request {
        Request::put(format!("/network-interfaces/{}", iface.iface_id), iface)
    }

    /// `PUT /vsock`.
    pub fn vsock(vsock: &Vsock) -> Request {
        Request::put("/vsock", vsock)
    }

    /// `PUT /logger`.
    pub fn logger(logger: &Logger) -> Request {
        Request::put("/logger", logger)
    }

    /// `PUT /actions`.
    pub fn action(action_type: ActionType) -> Request {
        Request::put("/actions", &InstanceActionInfo { action_type })
    }

    /// `PATCH /vm`.
    pub fn vm_state(state: RunState) -> Request {
        Request {
            method: Method::Patch,
            path: "/vm".to_owned(),
            body: Some(to_value(&VmState { state })),
        }
    }

    /// `PUT /snapshot/create`.
    pub fn snapshot_create(params: &SnapshotCreateParams) -> Request {
        Request::put("/snapshot/create", params)
    }

    /// `PUT /snapshot/load`.
    pub fn snapshot_load(params: &SnapshotLoadParams) -> Request {
        Request::put("/snapshot/load", params)
    }

    /// `GET /`.
    pub fn describe_instance() -> Request {
        Request {
            method: Method::Get,
            path: "/".to_owned(),
            body: None,
        }
    }

    /// `GET /version`.
    pub fn version() -> Request {
        Request {
            method: Method::Get,
            path: "/version".to_owned(),
            body: None,
        }
    }
}

fn to_value(body: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(body).expect("API bodies are plain structs of strings, numbers and enums")
}

/// Errors of Firecracker API calls.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerApiError {
    /// Firecracker refused the call (the spec's `Error` object).
    #[error("Firecracker refused {call} (HTTP {status}): {message}")]
    Fault {
        /// The call, e.g. `PUT /boot-source`.
        call: String,
        /// The HTTP status.
        status: u16,
        /// Its `fault_message` (or the raw body when it had none).
        message: String,
    },
    /// The socket could not be reached, or the connection broke.
    #[error("{call}: cannot talk to Firecracker's API socket {socket}")]
    Transport {
        /// The call.
        call: String,
        /// The API socket.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer did not match the spec.
    #[error("{call}: Firecracker's answer does not match its API description: {reason}")]
    BadResponse {
        /// The call.
        call: String,
        /// What was wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("{call}: Firecracker did not answer within {seconds} s")]
    Timeout {
        /// The call.
        call: String,
        /// The limit.
        seconds: u64,
    },
}

/// Maps a response to the typed result of `call`: 2xx is success; anything else is
/// [`FirecrackerApiError::Fault`] with the `fault_message` (or the raw body when it is not the
/// spec's `Error` object).
pub fn check_status(call: &Request, status: u16, body: &[u8]) -> Result<(), FirecrackerApiError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let raw = String::from_utf8_lossy(body).trim().to_owned();
    let message = match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(ApiErrorBody {
            fault_message: Some(message),
        }) => message,
        _ if raw.is_empty() || raw.starts_with('{') => "no fault_message given".to_owned(),
        _ => raw,
    };
    Err(FirecrackerApiError::Fault {
        call: call.name(),
        status,
        message,
    })
}

/// Parses a 200 answer's JSON body as `T`.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    call: &Request,
    body: &[u8],
) -> Result<T, FirecrackerApiError> {
    serde_json::from_slice(body).map_err(|e| FirecrackerApiError::BadResponse {
        call: call.name(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    //! Every body kiln sends and every answer it reads, checked against the field names, types
    //! and required fields of Firecracker's OpenAPI description.

    use serde_json::json;

    use super::*;

    #[test]
    fn machine_config_has_the_required_fields_and_omits_unset_ones() {
        let config = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 1024,
            smt: None,
            track_dirty_pages: Some(true),
            huge_pages: None,
        };
        let request = Request::machine_config(&config);
        assert_eq!(request.name(), "PUT /machine-config");
        assert_eq!(
            request.body,
            Some(json!({"vcpu_count": 2, "mem_size_mib": 1024, "track_dirty_pages": true}))
        );
        // Required by the spec: vcpu_count and mem_size_mib.
        assert!(serde_json::from_value::<MachineConfiguration>(json!({"vcpu_count": 1})).is_err());
        let back: MachineConfiguration =
            serde_json::from_value(json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false}))
                .unwrap();
        assert_eq!(back.smt, Some(false));
    }

    #[test]
    fn boot_source_requires_the_kernel() {
        let source = BootSource {
            kernel_image_path: "/img/vmlinux".into(),
            initrd_path: Some("/img/initramfs.cpio".into()),
            boot_args: Some("console=ttyS0".into()),
        };
        assert_eq!(
            Request::boot_source(&source).body,
            Some(json!({
                "kernel_image_path": "/img/vmlinux",
                "initrd_path": "/img/initramfs.cpio",
                "boot_args": "console=ttyS0",
            }))
        );
        assert!(serde_json::from_value::<BootSource>(json!({"boot_args": "x"})).is_err());
        let minimal = BootSource {
            kernel_image_path: "k".into(),
            initrd_path: None,
            boot_args: None,
        };
        assert_eq!(
            Request::boot_source(&minimal).body,
            Some(json!({"kernel_image_path": "k"}))
        );
    }

    #[test]
    fn drives_are_put_under_their_id_with_the_spec_enums() {
        let drive = Drive {
            drive_id: "rootfs".into(),
            is_root_device: false,
            path_on_host: Some("base.ext4".into()),
            is_read_only: Some(true),
            cache_type: Some(CacheType::Unsafe),
            io_engine: Some(IoEngine::Sync),
        };
        let request = Request::drive(&drive);
        assert_eq!(request.name(), "PUT /drives/rootfs");
        assert_eq!(
            request.body,
            Some(json!({
                "drive_id": "rootfs",
                "is_root_device": false,
                "path_on_host": "base.ext4",
                "is_read_only": true,
                "cache_type": "Unsafe",
                "io_engine": "Sync",
            }))
        );
        // Required: drive_id and is_root_device.
        assert!(serde_json::from_value::<Drive>(json!({"drive_id": "a"})).is_err());
        assert!(
            serde_json::from_value::<Drive>(json!({"drive_id": "a", "is_root_device": true,
                "cache_type": "Writeback", "io_engine": "Async"}))
            .is_ok()
        );
        assert!(
            serde_json::from_value::<Drive>(
                json!({"drive_id": "a", "is_root_device": true, "cache_type": "Lazy"})
            )
            .is_err()
        );
    }

    #[test]
    fn network_interfaces_and_vsock_match_the_spec() {
        let iface = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "kiln-tap0".into(),
            guest_mac: Some("06:00:0a:00:00:02".into()),
        };
        let request = Request::network_interface(&iface);
        assert_eq!(request.name(), "PUT /network-interfaces/eth0");
        assert_eq!(
            request.body,
            Some(json!({"iface_id": "eth0", "host_dev_name": "kiln-tap0",
                        "guest_mac": "06:00:0a:00:00:02"}))
        );
        assert!(serde_json::from_value::<NetworkInterface>(json!({"iface_id": "eth0"})).is_err());
        let vsock = Vsock {
            guest_cid: 3,
            uds_path: "vsock.sock".into(),
        };
        assert_eq!(Request::vsock(&vsock).name(), "PUT /vsock");
        assert_eq!(
            Request::vsock(&vsock).body,
            Some(json!({"guest_cid": 3, "uds_path": "vsock.sock"}))
        );
        assert!(serde_json::from_value::<Vsock>(json!({"guest_cid": 3})).is_err());
    }

    #[test]
    fn actions_and_vm_state_use_the_spec_enums() {
        let start = Request::action(ActionType::InstanceStart);
        assert_eq!(start.name(), "PUT /actions");
        assert_eq!(start.body, Some(json!({"action_type": "InstanceStart"})));
        assert_eq!(
            Request::action(ActionType::SendCtrlAltDel).body,
            Some(json!({"action_type": "SendCtrlAltDel"}))
        );
        let pause = Request::vm_state(RunState::Paused);
        assert_eq!(pause.name(), "PATCH /vm");
        assert_eq!(pause.body, Some(json!({"state": "Paused"})));
        assert_eq!(
            Request::vm_state(RunState::Resumed).body,
            Some(json!({"state": "Resumed"}))
        );
    }

    #[test]
    fn snapshot_bodies_match_the_spec() {
        let create = SnapshotCreateParams {
            snapshot_path: "snap/vmstate".into(),
            mem_file_path: "snap/memory".into(),
            snapshot_type: Some(SnapshotType::Diff),
        };
        assert_eq!(
            Request::snapshot_create(&create).body,
            Some(
                json!({"snapshot_path": "snap/vmstate", "mem_file_path": "snap/memory",
                        "snapshot_type": "Diff"})
            )
        );
        // Required: mem_file_path and snapshot_path.
        assert!(
            serde_json::from_value::<SnapshotCreateParams>(json!({"snapshot_path": "a"})).is_err()
        );
        let load = SnapshotLoadParams {
            snapshot_path: "/s/vmstate".into(),
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/s/memory".into(),
            }),
            track_dirty_pages: Some(true),
            resume_vm: Some(true),
            vsock_override: Some(VsockOverride {
                uds_path: "vsock.sock".into(),
            }),
            network_overrides: Vec::new(),
        };
        let request = Request::snapshot_load(&load);
        assert_eq!(request.name(), "PUT /snapshot/load");
        assert_eq!(
            request.body,
            Some(json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                "track_dirty_pages": true,
                "resume_vm": true,
                "vsock_override": {"uds_path": "vsock.sock"},
            }))
        );
        assert!(
            serde_json::from_value::<MemoryBackend>(json!({"backend_type": "File"})).is_err(),
            "backend_path is required"
        );
        let with_net = SnapshotLoadParams {
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }],
            ..load
        };
        assert_eq!(
            Request::snapshot_load(&with_net).body.unwrap()["network_overrides"],
            json!([{"iface_id": "eth0", "host_dev_name": "tap1"}])
        );
    }

    #[test]
    fn answers_parse_and_require_their_fields() {
        let info: InstanceInfo = parse_body(
            &Request::describe_instance(),
            br#"{"id":"fc-1","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        )
        .unwrap();
        assert_eq!(info.state, "Not started");
        let err = parse_body::<InstanceInfo>(&Request::describe_instance(), br#"{"id":"x"}"#)
            .unwrap_err();
        assert!(err.to_string().starts_with("GET /: "), "{err}");
        let version: FirecrackerVersion =
            parse_body(&Request::version(), br#"{"firecracker_version":"1.16.1"}"#).unwrap();
        assert_eq!(version.firecracker_version, "1.16.1");
        assert_eq!(
            Request::logger(&Logger {
                log_path: Some("fc.log".into()),
                level: Some("Info".into())
            })
            .body,
            Some(json!({"log_path": "fc.log", "level": "Info"}))
        );
    }

    #[test]
    fn faults_name_the_call_and_carry_the_fault_message() {
        let call = Request::boot_source(&BootSource {
            kernel_image_path: "/nope".into(),
            initrd_path: None,
            boot_args: None,
        });
        assert!(check_status(&call, 204, b"").is_ok());
        let err = check_status(
            &call,
            400,
            br#"{"fault_message":"The kernel file cannot be opened: No such file or directory (os error 2)"}"#,
        )
        .unwrap_err();
        match &err {
            FirecrackerApiError::Fault {
                call,
                status,
                message,
            } => {
                assert_eq!(call, "PUT /boot-source");
                assert_eq!(*status, 400);
                assert!(message.starts_with("The kernel file cannot be opened"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "Firecracker refused PUT /boot-source (HTTP 400): The kernel file cannot be opened: \
             No such file or directory (os error 2)"
        );
        let raw = check_status(&call, 500, b"oops").unwrap_err();
        assert!(raw.to_string().ends_with("(HTTP 500): oops"), "{raw}");
        let empty = check_status(&call, 400, b"{}").unwrap_err();
        assert!(
            empty.to_string().ends_with("no fault_message given"),
            "{empty}"
        );
    }
}
