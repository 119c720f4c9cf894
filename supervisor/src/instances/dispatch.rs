//! One [`Runtime`] for the routes over two: containers (cove-shim monitors, or the library
//! runtime) and virtual machines (`VmRuntime`). Each call goes to the runtime of the
//! instance's type; a VM is known by its directory on the pool, which exists from before its
//! row is committed until it is deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::runtime::{ExecSpec, LaunchSpec, Runtime, RuntimeError, RuntimeState, RuntimeStatus};
use super::vm::VmRuntime;

pub struct InstanceRuntimes {
    containers: Arc<dyn Runtime>,
    machines: Arc<VmRuntime>,
}

impl std::fmt::Debug for InstanceRuntimes {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("InstanceRuntimes")
            .field("machines", &self.machines)
            .finish_non_exhaustive()
    }
}

impl InstanceRuntimes {
    pub fn new(containers: Arc<dyn Runtime>, machines: Arc<VmRuntime>) -> Self {
        Self {
            containers,
            machines,
        }
    }

    fn pick(&self, name: &str) -> &dyn Runtime {
        if self.machines.owns(name) {
            self.machines.as_ref()
        } else {
            self.containers.as_ref()
        }
    }
}

impl Runtime for InstanceRuntimes {
    fn start(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        self.pick(&spec.name).start(spec)
    }

    fn state(&self, name: &str) -> RuntimeState {
        self.pick(name).state(name)
    }

    fn status(&self, name: &str) -> RuntimeStatus {
        self.pick(name).status(name)
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.pick(name).stop(name, timeout)
    }

    fn freeze(&self, name: &str) -> Result<(), RuntimeError> {
        self.pick(name).freeze(name)
    }

    fn unfreeze(&self, name: &str) -> Result<(), RuntimeError> {
        self.pick(name).unfreeze(name)
    }

    fn exec(&self, name: &str, spec: ExecSpec) -> Result<i32, RuntimeError> {
        self.pick(name).exec(name, spec)
    }

    fn delete(&self, name: &str, directory: &Path) -> Result<(), RuntimeError> {
        self.pick(name).delete(name, directory)
    }

    fn rename(
        &self,
        name: &str,
        new_name: &str,
        directory: &Path,
        new_directory: &Path,
    ) -> Result<(), RuntimeError> {
        self.pick(name)
            .rename(name, new_name, directory, new_directory)
    }

    fn root(&self, directory: &Path) -> PathBuf {
        self.containers.root(directory)
    }

    fn console_log(&self, directory: &Path) -> PathBuf {
        let is_machine = directory
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|folder| folder == super::vm_disk::MACHINES_FOLDER);
        if is_machine {
            self.machines.console_log(directory)
        } else {
            self.containers.console_log(directory)
        }
    }

    fn running(&self) -> Vec<String> {
        let mut names = self.containers.running();
        names.extend(self.machines.running());
        names.sort();
        names.dedup();
        names
    }

    fn guest_agent(&self, name: &str) -> Option<cove_agent::client::Client> {
        if self.machines.owns(name) {
            self.machines.agent(name)
        } else {
            None
        }
    }

    fn is_virtual_machine(&self, name: &str) -> bool {
        self.machines.owns(name)
    }

    fn virtual_machines(&self) -> Option<&VmRuntime> {
        Some(&self.machines)
    }
}
