//! `GET /1.0/metrics`: the running instances' figures in the Prometheus text format
//! (`crate::metrics`), as LXD serves them to its scrapers.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use cove_vmm::cpuid::HostKind;

use super::ApiError;
use crate::daemon::{blocking, Daemon};
use crate::instances::vm_launch;
use crate::metrics::{self, InstanceMetrics};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new().route("/1.0/metrics", get(scrape))
}

fn collect(daemon: &Daemon) -> Result<Vec<InstanceMetrics>, ApiError> {
    let layout = cove_shim::cgroup::CgroupLayout::detect().ok();
    let mut collected = Vec::new();
    for record in daemon.store.instances()? {
        let state = daemon.runtime.state(&record.name);
        if !metrics::scraped(state.status) {
            continue;
        }
        if record.kind == "virtual-machine" {
            let (expanded, _) = daemon
                .expand(&record.profiles, &record.config, &record.devices)
                .unwrap_or_default();
            let memory = vm_launch::shape(&expanded, HostKind::detect(), None)
                .map(|shape| shape.memory_bytes)
                .unwrap_or_default();
            collected.push(metrics::virtual_machine(&record.name, &state, memory));
            continue;
        }
        let Some(layout) = &layout else {
            continue;
        };
        let cgroup = Path::new(&daemon.settings.cgroup_parent).join(&record.name);
        let root = daemon
            .instance_directory(&record)
            .map(|directory| daemon.runtime.root(&directory))
            .unwrap_or_default();
        collected.push(metrics::container(
            layout,
            &cgroup,
            &record.name,
            &state,
            &root,
        ));
    }
    Ok(collected)
}

async fn scrape(State(daemon): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    let collected = blocking(move || collect(&daemon)).await??;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&collected),
    )
        .into_response())
}
