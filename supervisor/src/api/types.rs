//! The JSON shapes of the LXD 1.0 REST API as coved serves them: envelopes, server info,
//! instances and their state, operations, events, images, profiles, storage pools and
//! networks. The daemon, the `cove` CLI and the tests all import these, so the two sides of
//! the socket cannot drift apart.
//!
//! Field names follow LXD's exactly (including its `kebab-case` exceptions such as
//! `wait-for-websocket`); every request type accepts missing fields with LXD's defaults, and
//! none refuses fields it does not know, as LXD's own server does not.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Go clients (lxc) send `null` for empty maps and lists: read it as the default.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// LXD's status codes: operations and instances 100–113, results 200, 400, 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    OperationCreated = 100,
    Started = 101,
    Stopped = 102,
    Running = 103,
    Cancelling = 104,
    Pending = 105,
    Starting = 106,
    Stopping = 107,
    Aborting = 108,
    Freezing = 109,
    Frozen = 110,
    Thawed = 111,
    Error = 112,
    Ready = 113,
    Success = 200,
    Failure = 400,
    Cancelled = 401,
}

impl StatusCode {
    /// The status text LXD sends beside the code.
    pub fn text(self) -> &'static str {
        match self {
            Self::OperationCreated => "Operation created",
            Self::Started => "Started",
            Self::Stopped => "Stopped",
            Self::Running => "Running",
            Self::Cancelling => "Cancelling",
            Self::Pending => "Pending",
            Self::Starting => "Starting",
            Self::Stopping => "Stopping",
            Self::Aborting => "Aborting",
            Self::Freezing => "Freezing",
            Self::Frozen => "Frozen",
            Self::Thawed => "Thawed",
            Self::Error => "Error",
            Self::Ready => "Ready",
            Self::Success => "Success",
            Self::Failure => "Failure",
            Self::Cancelled => "Cancelled",
        }
    }

    pub fn code(self) -> u16 {
        self as u16
    }

    /// True for the codes an operation ends with.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Cancelled)
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            100 => Self::OperationCreated,
            101 => Self::Started,
            102 => Self::Stopped,
            103 => Self::Running,
            104 => Self::Cancelling,
            105 => Self::Pending,
            106 => Self::Starting,
            107 => Self::Stopping,
            108 => Self::Aborting,
            109 => Self::Freezing,
            110 => Self::Frozen,
            111 => Self::Thawed,
            112 => Self::Error,
            113 => Self::Ready,
            200 => Self::Success,
            400 => Self::Failure,
            401 => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Every response body: `type` is `sync`, `async` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub operation: String,
    #[serde(default, deserialize_with = "nullable")]
    pub error_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub error: String,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: Value,
}

impl Response {
    pub fn sync(metadata: Value) -> Self {
        Self {
            kind: "sync".into(),
            status: StatusCode::Success.text().into(),
            status_code: StatusCode::Success.code(),
            operation: String::new(),
            error_code: 0,
            error: String::new(),
            metadata,
        }
    }

    /// An async response: `operation` is the operation's URL, `metadata` the operation.
    pub fn async_operation(operation: &Operation) -> Self {
        Self {
            kind: "async".into(),
            status: StatusCode::OperationCreated.text().into(),
            status_code: StatusCode::OperationCreated.code(),
            operation: format!("/1.0/operations/{}", operation.id),
            error_code: 0,
            error: String::new(),
            metadata: serde_json::to_value(operation).unwrap_or(Value::Null),
        }
    }

    pub fn error(code: u16, message: &str) -> Self {
        Self {
            kind: "error".into(),
            status: String::new(),
            status_code: 0,
            operation: String::new(),
            error_code: code,
            error: message.into(),
            metadata: Value::Null,
        }
    }
}

/// GET /1.0
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Server {
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, Value>,
    pub api_extensions: Vec<String>,
    pub api_status: String,
    pub api_version: String,
    pub auth: String,
    #[serde(default, deserialize_with = "nullable")]
    pub auth_methods: Vec<String>,
    pub public: bool,
    pub environment: ServerEnvironment,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerEnvironment {
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    pub architectures: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub certificate: String,
    #[serde(default, deserialize_with = "nullable")]
    pub certificate_fingerprint: String,
    pub driver: String,
    pub driver_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub firewall: String,
    pub kernel: String,
    pub kernel_architecture: String,
    #[serde(default, deserialize_with = "nullable")]
    pub kernel_features: BTreeMap<String, String>,
    pub kernel_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub lxc_features: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub os_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub os_version: String,
    pub project: String,
    pub server: String,
    pub server_clustered: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub server_event_mode: String,
    pub server_name: String,
    pub server_pid: u32,
    pub server_version: String,
    pub storage: String,
    pub storage_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub storage_supported_drivers: Vec<StorageDriver>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StorageDriver {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Remote")]
    pub remote: bool,
}

/// An instance's device: a map of string keys (`type`, `path`, `pool`, ...).
pub type Device = BTreeMap<String, String>;

/// GET /1.0/instances/<name> (recursion 1). [`InstanceFull`] adds state and snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    pub architecture: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
    #[serde(default, deserialize_with = "nullable")]
    pub ephemeral: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub profiles: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub stateful: bool,
    pub created_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub expanded_config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub expanded_devices: BTreeMap<String, Device>,
    pub status: String,
    pub status_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub last_used_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub project: String,
}

/// recursion=2: the instance with its state, snapshots and backups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceFull {
    #[serde(flatten)]
    pub instance: Instance,
    pub state: Option<InstanceState>,
    #[serde(default, deserialize_with = "nullable")]
    pub snapshots: Vec<Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub backups: Vec<Value>,
}

/// GET /1.0/instances/<name>/state
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceState {
    pub status: String,
    pub status_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub disk: BTreeMap<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub memory: InstanceStateMemory,
    #[serde(default, deserialize_with = "nullable")]
    pub network: BTreeMap<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub pid: i64,
    #[serde(default, deserialize_with = "nullable")]
    pub processes: i64,
    #[serde(default, deserialize_with = "nullable")]
    pub cpu: InstanceStateCpu,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateMemory {
    pub usage: i64,
    pub usage_peak: i64,
    pub swap_usage: i64,
    pub swap_usage_peak: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateCpu {
    /// Nanoseconds of CPU time.
    pub usage: i64,
}

/// POST /1.0/instances
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstancesPost {
    pub name: String,
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub source: InstanceSource,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
    /// `None`: the default profile.
    #[serde(default)]
    pub profiles: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub ephemeral: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub architecture: String,
    /// Start the instance once created (LXD's `instance_create_start`).
    #[serde(default, deserialize_with = "nullable")]
    pub start: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSource {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub alias: String,
    #[serde(default, deserialize_with = "nullable")]
    pub fingerprint: String,
    #[serde(default, deserialize_with = "nullable")]
    pub server: String,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    #[serde(default, deserialize_with = "nullable")]
    pub mode: String,
    /// `type: copy`: the instance (`NAME`) or snapshot (`NAME/SNAPSHOT`) to copy.
    #[serde(default, deserialize_with = "nullable")]
    pub source: String,
    /// `type: copy`: leave the source's snapshots behind.
    #[serde(default, deserialize_with = "nullable")]
    pub instance_only: bool,
}

/// PUT /1.0/instances/<name> (and PATCH, where a missing field keeps its value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstancePut {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub devices: Option<BTreeMap<String, Device>>,
    #[serde(default)]
    pub ephemeral: Option<bool>,
    #[serde(default)]
    pub profiles: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
    /// A snapshot to restore: refused, snapshots are not supported.
    #[serde(default)]
    pub restore: Option<String>,
    #[serde(default)]
    pub stateful: Option<bool>,
}

/// POST /1.0/instances/<name>: rename.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstancePost {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub migration: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub live: bool,
}

/// PUT /1.0/instances/<name>/state
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStatePut {
    pub action: String,
    /// Seconds; -1 or 0: the default.
    #[serde(default, deserialize_with = "nullable")]
    pub timeout: i64,
    #[serde(default, deserialize_with = "nullable")]
    pub force: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub stateful: bool,
}

/// POST /1.0/instances/<name>/exec
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceExecPost {
    pub command: Vec<String>,
    #[serde(default)]
    pub environment: Option<BTreeMap<String, String>>,
    #[serde(rename = "wait-for-websocket", default, deserialize_with = "nullable")]
    pub wait_for_websocket: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub interactive: bool,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(rename = "record-output", default, deserialize_with = "nullable")]
    pub record_output: bool,
    #[serde(default)]
    pub user: Option<u32>,
    #[serde(default)]
    pub group: Option<u32>,
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A message on an exec's control websocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExecControl {
    pub command: String,
    #[serde(default, deserialize_with = "nullable")]
    pub args: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub signal: i32,
}

/// An operation, as in async responses, GET /1.0/operations/<id> and operation events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Operation {
    pub id: String,
    pub class: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    pub status: String,
    pub status_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub resources: BTreeMap<String, Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: Value,
    pub may_cancel: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub err: String,
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
}

/// A message on /1.0/events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
    pub metadata: Value,
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
    #[serde(default, deserialize_with = "nullable")]
    pub project: String,
}

/// The metadata of a lifecycle event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LifecycleEvent {
    pub action: String,
    pub source: String,
    #[serde(default, deserialize_with = "nullable")]
    pub context: BTreeMap<String, Value>,
}

/// The metadata of a logging event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoggingEvent {
    pub message: String,
    pub level: String,
    #[serde(default, deserialize_with = "nullable")]
    pub context: BTreeMap<String, String>,
}

/// GET /1.0/images/<fingerprint>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    #[serde(default, deserialize_with = "nullable")]
    pub aliases: Vec<ImageAlias>,
    pub architecture: String,
    #[serde(default, deserialize_with = "nullable")]
    pub auto_update: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub cached: bool,
    pub fingerprint: String,
    pub filename: String,
    #[serde(default, deserialize_with = "nullable")]
    pub properties: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub public: bool,
    pub size: u64,
    pub created_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub last_used_at: String,
    pub uploaded_at: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub update_source: Option<Value>,
}

/// An alias as listed inside an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageAlias {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
}

/// GET /1.0/images/aliases/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageAliasesEntry {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    pub target: String,
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
}

/// POST /1.0/images/aliases
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageAliasesPost {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    pub target: String,
}

/// PUT /1.0/images/aliases/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageAliasesEntryPut {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
}

/// POST /1.0/images/aliases/<name>: rename.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageAliasesEntryPost {
    pub name: String,
}

/// PUT /1.0/images/<fingerprint>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImagePut {
    #[serde(default)]
    pub auto_update: Option<bool>,
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub public: Option<bool>,
    #[serde(default)]
    pub profiles: Option<Vec<String>>,
}

/// GET /1.0/profiles/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
    #[serde(default, deserialize_with = "nullable")]
    pub used_by: Vec<String>,
}

/// POST /1.0/profiles
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProfilesPost {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
}

/// PUT and PATCH /1.0/profiles/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProfilePut {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub devices: Option<BTreeMap<String, Device>>,
}

/// POST /1.0/profiles/<name>: rename.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProfilePost {
    pub name: String,
}

/// GET /1.0/storage-pools/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoragePool {
    pub name: String,
    pub driver: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub used_by: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub locations: Vec<String>,
}

/// GET /1.0/networks/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub managed: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub used_by: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub locations: Vec<String>,
}

/// POST /1.0/networks
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct NetworksPost {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
}

/// PUT and PATCH /1.0/networks/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct NetworkPut {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_has_lxd_fields() {
        let value = serde_json::to_value(Response::error(404, "not found")).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "type": "error", "status": "", "status_code": 0, "operation": "",
                "error_code": 404, "error": "not found", "metadata": null
            })
        );
    }

    #[test]
    fn exec_request_takes_lxd_names() {
        let request: InstanceExecPost = serde_json::from_str(
            r#"{"command":["ls"],"wait-for-websocket":true,"record-output":false,
                "interactive":false,"environment":{"TERM":"xterm"},"user":0,"group":0,"cwd":""}"#,
        )
        .unwrap();
        assert!(request.wait_for_websocket);
        assert_eq!(request.environment.unwrap()["TERM"], "xterm");
    }

    #[test]
    fn nulls_from_go_clients_are_defaults() {
        let profile: ProfilesPost = serde_json::from_str(
            r#"{"name":"small","config":null,"devices":null,"description":""}"#,
        )
        .unwrap();
        assert!(profile.config.is_empty() && profile.devices.is_empty());
        let instance: InstancesPost = serde_json::from_str(
            r#"{"name":"a","source":{"type":"image","alias":"x"},"config":null,"profiles":null}"#,
        )
        .unwrap();
        assert!(instance.profiles.is_none());
    }

    #[test]
    fn status_codes_round_trip() {
        for code in (100..=113).chain([200, 400, 401]) {
            assert_eq!(StatusCode::from_code(code).unwrap().code(), code);
        }
        assert!(StatusCode::from_code(199).is_none());
        assert!(StatusCode::Cancelled.is_final());
        assert!(!StatusCode::Running.is_final());
    }
}

/// An instance snapshot (`/1.0/instances/<name>/snapshots/<snapshot>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSnapshot {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    pub architecture: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
    #[serde(default, deserialize_with = "nullable")]
    pub expanded_config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub expanded_devices: BTreeMap<String, Device>,
    #[serde(default, deserialize_with = "nullable")]
    pub profiles: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ephemeral: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub stateful: bool,
    pub created_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub last_used_at: String,
    /// Bytes on disk that the snapshot holds.
    #[serde(default, deserialize_with = "nullable")]
    pub size: i64,
}

/// POST /1.0/instances/<name>/snapshots
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSnapshotsPost {
    /// Empty: the next free `snapN`.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub stateful: bool,
    /// RFC 3339; absent or LXD's zero time: never.
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: String,
}

/// POST /1.0/instances/<name>/snapshots/<snapshot>: a rename.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSnapshotPost {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub migration: bool,
}

/// PUT and PATCH /1.0/instances/<name>/snapshots/<snapshot>.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSnapshotPut {
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}
