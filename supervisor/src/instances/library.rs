//! Containers run inside coved's own process through the cove-shim library: coved is their
//! init's parent. For development and for hosts without the `cove-shim` monitor binary; such
//! containers do not survive a restart of coved (see [`super::shim`] for the real thing), and
//! stopping one discards its snapshot (the library starts each run on a fresh directory).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cove_shim::exec::DEFAULT_PATH;
use cove_shim::{
    BridgedNic, Container, ContainerConfig, DiskMount, ExecRequest, Host, Network, Status,
};

use super::runtime::{
    move_container_directory, ExecSpec, LaunchSpec, Runtime, RuntimeError, RuntimeState,
    RuntimeStatus,
};

#[derive(Debug)]
pub struct LibraryRuntime {
    host: Host,
    containers: Mutex<HashMap<String, Arc<Mutex<Container>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn failed(error: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(error.to_string())
}

impl LibraryRuntime {
    pub fn new(host: Host) -> Self {
        Self {
            host,
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn container(&self, name: &str) -> Option<Arc<Mutex<Container>>> {
        lock(&self.containers).get(name).cloned()
    }

    fn running_container(&self, name: &str) -> Result<Arc<Mutex<Container>>, RuntimeError> {
        let container = self
            .container(name)
            .ok_or_else(|| RuntimeError::NotRunning(name.to_string()))?;
        if lock(&container).state().status == Status::Stopped {
            return Err(RuntimeError::NotRunning(name.to_string()));
        }
        Ok(container)
    }

    /// Removes a container directory left by an earlier process.
    fn remove_leftovers(&self, directory: &Path) {
        if directory.exists() {
            let _ = cove_shim::rootfs::unmount_if_mounted(&directory.join(cove_shim::rootfs::ROOT));
            let _ = cove_shim::rootfs::remove_snapshot(directory);
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

impl Runtime for LibraryRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        if let Some(container) = self.container(&spec.name) {
            if lock(&container).state().status != Status::Stopped {
                return Err(RuntimeError::AlreadyRunning(spec.name.clone()));
            }
            // Stopped (and so released): its directory stays for the new start to reuse.
            lock(&self.containers).remove(&spec.name);
        }
        let mut config =
            ContainerConfig::from_keys(&spec.name, &spec.rootfs, &spec.keys).map_err(failed)?;
        if let Some(nic) = &spec.nic {
            config.network = Network::Bridged(BridgedNic::from_device(nic).map_err(failed)?);
        }
        for disk in &spec.disks {
            config
                .disks
                .push(DiskMount::from_device(disk).map_err(failed)?);
        }
        let host = Host {
            containers_directory: spec.containers_directory()?.to_path_buf(),
            cgroup_parent: self.host.cgroup_parent.clone(),
        };
        let container = Container::start(&config, &host).map_err(failed)?;
        lock(&self.containers).insert(spec.name.clone(), Arc::new(Mutex::new(container)));
        Ok(())
    }

    fn state(&self, name: &str) -> RuntimeState {
        let Some(container) = self.container(name) else {
            return RuntimeState::stopped();
        };
        let state = lock(&container).state();
        RuntimeState {
            status: match state.status {
                Status::Running => RuntimeStatus::Running,
                Status::Frozen => RuntimeStatus::Frozen,
                Status::Stopped => RuntimeStatus::Stopped,
            },
            init_pid: state.init_pid,
            memory_bytes: state.memory_bytes,
            processes: state.processes,
            cpu_time_ns: state.cpu_time.map(|time| time.as_nanos() as u64),
            addresses: state.addresses,
        }
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let container = self
            .container(name)
            .ok_or_else(|| RuntimeError::NotRunning(name.to_string()))?;
        lock(&container).stop(timeout).map_err(failed)?;
        Ok(())
    }

    fn freeze(&self, name: &str) -> Result<(), RuntimeError> {
        let container = self.running_container(name)?;
        let result = lock(&container).freeze().map_err(failed);
        result
    }

    fn unfreeze(&self, name: &str) -> Result<(), RuntimeError> {
        let container = self.running_container(name)?;
        let result = lock(&container).unfreeze().map_err(failed);
        result
    }

    fn exec(&self, name: &str, spec: ExecSpec) -> Result<i32, RuntimeError> {
        let container = self.running_container(name)?;
        let mut request = ExecRequest::new(&[]);
        request.command = spec.command;
        request.uid = spec.uid;
        request.gid = spec.gid;
        if let Some(cwd) = spec.cwd {
            request.working_directory = PathBuf::from(cwd);
        }
        let mut environment = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        environment.retain(|(key, _)| !spec.environment.contains_key(key));
        environment.extend(spec.environment);
        request.environment = environment;
        let mut process = lock(&container).exec(&request).map_err(failed)?;
        // The library makes its own pipes: copy between them and the caller's fds.
        let copy = |from: Option<File>, to: File| {
            std::thread::spawn(move || {
                if let Some(mut from) = from {
                    let mut to = to;
                    let mut buffer = [0u8; 16384];
                    loop {
                        match from.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(read) => {
                                if to.write_all(&buffer[..read]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            })
        };
        let stdin_pipe = process.stdin.take();
        let stdin_copier = std::thread::spawn({
            let input = File::from(spec.stdin);
            move || {
                if let Some(pipe) = stdin_pipe {
                    let mut input = input;
                    let mut pipe = pipe;
                    let _ = std::io::copy(&mut input, &mut pipe);
                }
            }
        });
        let stdout = copy(process.stdout.take(), File::from(spec.stdout));
        let stderr = copy(process.stderr.take(), File::from(spec.stderr));
        let code = match spec.signals {
            None => process.wait().map_err(failed)?,
            Some(signals) => loop {
                if let Some(code) = process.try_wait().map_err(failed)? {
                    break code;
                }
                if let Ok(signal) = signals.recv_timeout(Duration::from_millis(50)) {
                    let _ = process.signal(signal);
                }
            },
        };
        let _ = stdout.join();
        let _ = stderr.join();
        // The stdin copier ends when the caller closes stdin or the pipe breaks; do not wait.
        drop(stdin_copier);
        Ok(code)
    }

    fn delete(&self, name: &str, directory: &Path) -> Result<(), RuntimeError> {
        if let Some(container) = lock(&self.containers).remove(name) {
            match Arc::try_unwrap(container) {
                Ok(container) => container
                    .into_inner()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .delete()
                    .map_err(failed)?,
                Err(container) => {
                    lock(&container).stop(Duration::ZERO).map_err(failed)?;
                }
            }
        }
        self.remove_leftovers(directory);
        Ok(())
    }

    fn rename(
        &self,
        name: &str,
        new_name: &str,
        directory: &Path,
        new_directory: &Path,
    ) -> Result<(), RuntimeError> {
        if self.status(name) != RuntimeStatus::Stopped {
            return Err(RuntimeError::AlreadyRunning(name.to_string()));
        }
        // The stopped container's directory, with its files, moves to the new name.
        lock(&self.containers).remove(name);
        self.delete(new_name, new_directory)?;
        move_container_directory(directory, new_directory)
    }

    fn running(&self) -> Vec<String> {
        Vec::new()
    }
}
