//! The JSON shapes of storage pools' and volumes' requests and answers beyond
//! [`super::types::StoragePool`], as LXD spells them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::nullable;

/// POST /1.0/storage-pools
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StoragePoolsPost {
    pub name: String,
    pub driver: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
}

/// PUT and PATCH /1.0/storage-pools/<pool> (and the same for a volume).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StoragePut {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
}

/// GET /1.0/storage-pools/<pool>/resources
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StoragePoolResources {
    pub space: ResourceUsage,
    pub inodes: ResourceUsage,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ResourceUsage {
    pub used: u64,
    pub total: u64,
}

/// POST /1.0/storage-pools/<pool>/volumes/custom
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StorageVolumesPost {
    pub name: String,
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub content_type: String,
}

/// GET /1.0/storage-pools/<pool>/volumes/<type>/<name>
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StorageVolume {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub used_by: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
    #[serde(default, deserialize_with = "nullable")]
    pub content_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub project: String,
    #[serde(default, deserialize_with = "nullable")]
    pub created_at: String,
}
