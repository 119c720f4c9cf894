//! Freezing a container: every process in its cgroup (and the sub-cgroups its init made) stops
//! being scheduled until it is thawed, through the kernel's cgroup freezer, as `lxc freeze`
//! does.
//!
//! Two interfaces, chosen by the host's layout:
//! - **v1** (a `freezer` hierarchy, as on hybrid hosts): write `FROZEN` to `freezer.state` and
//!   read it back until it says `FROZEN`; while some task is still on its way it says
//!   `FREEZING`, and writing `FROZEN` again retries (the kernel's documented protocol).
//! - **v2** (unified): write `1` to `cgroup.freeze` and wait until `cgroup.events` reports
//!   `frozen 1`.
//!
//! A freeze that does not complete in time is undone (thawed) and reported. The freezer files
//! stay host root's: delegation does not hand them to the container, so it cannot thaw itself.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::container::Container;

/// How long `Container::freeze` waits for every task to freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("container \"{0}\" is not running: start it before freezing or unfreezing it")]
    NotRunning(String),
    #[error(
        "this host has no cgroup freezer (no v1 freezer hierarchy and no cgroup.freeze in the \
         unified one): containers cannot be frozen here"
    )]
    NoFreezer,
    #[error("cannot write \"{value}\" to {path}: {source}")]
    Write {
        path: PathBuf,
        value: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the processes in {path} did not all freeze within {waited:?} (the freezer still says \
         \"{state}\"); the container was thawed again: try once more"
    )]
    Timeout {
        path: PathBuf,
        waited: Duration,
        state: String,
    },
}

/// The freezer files of one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Freezer {
    /// v1: `freezer.state` (`THAWED`, `FREEZING`, `FROZEN`).
    Legacy { state: PathBuf },
    /// v2: `cgroup.freeze` (write 0 or 1) and `cgroup.events` (`frozen 0|1`).
    Unified { freeze: PathBuf, events: PathBuf },
}

impl Freezer {
    /// The control file, named in errors.
    fn control(&self) -> &Path {
        match self {
            Freezer::Legacy { state } => state,
            Freezer::Unified { freeze, .. } => freeze,
        }
    }

    fn request(&self, frozen: bool) -> Result<(), FreezeError> {
        let (path, value) = match (self, frozen) {
            (Freezer::Legacy { state }, true) => (state, "FROZEN"),
            (Freezer::Legacy { state }, false) => (state, "THAWED"),
            (Freezer::Unified { freeze, .. }, true) => (freeze, "1"),
            (Freezer::Unified { freeze, .. }, false) => (freeze, "0"),
        };
        std::fs::write(path, value).map_err(|source| FreezeError::Write {
            path: path.clone(),
            value,
            source,
        })
    }

    /// What the kernel reports now: `FROZEN`, `FREEZING`, `THAWED` (v2's `frozen 1`/`frozen 0`
    /// are reported as `FROZEN`/`THAWED`).
    fn current(&self) -> Result<String, FreezeError> {
        let (path, text) = match self {
            Freezer::Legacy { state } => (state, std::fs::read_to_string(state)),
            Freezer::Unified { events, .. } => (events, std::fs::read_to_string(events)),
        };
        let text = text.map_err(|source| FreezeError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(match self {
            Freezer::Legacy { .. } => text.trim().to_string(),
            Freezer::Unified { .. } => unified_state(&text).to_string(),
        })
    }

    /// Asks for `frozen` and waits until the kernel reports it, re-asking on the way (a v1
    /// freezer stuck in `FREEZING` retries when written again).
    fn settle(&self, frozen: bool, timeout: Duration) -> Result<(), FreezeError> {
        let wanted = if frozen { "FROZEN" } else { "THAWED" };
        let started = Instant::now();
        let mut pause = Duration::from_micros(100);
        self.request(frozen)?;
        loop {
            let state = self.current()?;
            if state == wanted {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(FreezeError::Timeout {
                    path: self.control().to_path_buf(),
                    waited: started.elapsed(),
                    state,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
            self.request(frozen)?;
        }
    }
}

/// `FROZEN` or `THAWED` from the text of a v2 `cgroup.events` file.
fn unified_state(events: &str) -> &'static str {
    let frozen = events
        .lines()
        .any(|line| line.split_whitespace().eq(["frozen", "1"]));
    if frozen {
        "FROZEN"
    } else {
        "THAWED"
    }
}

impl Cgroup {
    /// The freezer for this cgroup: the v1 hierarchy if the host has one, else the unified
    /// hierarchy's core freezer.
    fn freezer(&self) -> Result<Freezer, FreezeError> {
        let layout = self.layout();
        if let Some(hierarchy) = layout
            .legacy
            .iter()
            .find(|hierarchy| hierarchy.controllers.iter().any(|c| c == "freezer"))
        {
            return Ok(Freezer::Legacy {
                state: hierarchy.mount.join(self.relative()).join("freezer.state"),
            });
        }
        let unified = layout.unified.as_ref().ok_or(FreezeError::NoFreezer)?;
        let directory = unified.join(self.relative());
        let freeze = directory.join("cgroup.freeze");
        if !freeze.exists() {
            return Err(FreezeError::NoFreezer);
        }
        Ok(Freezer::Unified {
            freeze,
            events: directory.join("cgroup.events"),
        })
    }

    /// Freezes every process in the cgroup, waiting up to `timeout` for all of them; thaws
    /// them again and fails if they do not all freeze in time.
    pub fn freeze(&self, timeout: Duration) -> Result<(), FreezeError> {
        let freezer = self.freezer()?;
        freezer.settle(true, timeout).inspect_err(|_| {
            let _ = freezer.settle(false, timeout);
        })
    }

    /// Lets the cgroup's processes run again.
    pub fn thaw(&self) -> Result<(), FreezeError> {
        self.freezer()?.settle(false, FREEZE_TIMEOUT)
    }

    /// True when every process in the cgroup is frozen; false when thawed, still freezing, or
    /// when the host has no freezer.
    pub fn is_frozen(&self) -> bool {
        self.freezer()
            .and_then(|freezer| freezer.current())
            .is_ok_and(|state| state == "FROZEN")
    }
}

impl Container {
    /// Freezes every process of the running container (`state()` then reports
    /// [`Status::Frozen`](crate::Status::Frozen)); commands cannot be run in it until it is
    /// unfrozen, and `stop` thaws it first.
    pub fn freeze(&self) -> Result<(), FreezeError> {
        if self.init_pid().is_none() {
            return Err(FreezeError::NotRunning(self.name().to_string()));
        }
        self.cgroup().freeze(FREEZE_TIMEOUT)
    }

    /// Lets a frozen container run again; unfreezing a running one changes nothing.
    pub fn unfreeze(&self) -> Result<(), FreezeError> {
        if self.init_pid().is_none() {
            return Err(FreezeError::NotRunning(self.name().to_string()));
        }
        self.cgroup().thaw()
    }

    /// True while the container is frozen.
    pub fn is_frozen(&self) -> bool {
        self.cgroup().is_frozen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CgroupLayout, LegacyHierarchy};

    #[test]
    fn unified_events_say_whether_the_cgroup_is_frozen() {
        assert_eq!(unified_state("populated 1\nfrozen 1\n"), "FROZEN");
        assert_eq!(unified_state("populated 1\nfrozen 0\n"), "THAWED");
        assert_eq!(unified_state(""), "THAWED");
    }

    #[test]
    fn the_v1_freezer_is_preferred_on_a_hybrid_host() {
        let layout = CgroupLayout {
            unified: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            legacy: vec![
                LegacyHierarchy {
                    mount: PathBuf::from("/sys/fs/cgroup/memory"),
                    controllers: vec!["memory".to_string()],
                },
                LegacyHierarchy {
                    mount: PathBuf::from("/sys/fs/cgroup/freezer"),
                    controllers: vec!["freezer".to_string()],
                },
            ],
        };
        let cgroup = Cgroup::existing(layout, "cove", "web");
        assert_eq!(
            cgroup.freezer().expect("a freezer"),
            Freezer::Legacy {
                state: PathBuf::from("/sys/fs/cgroup/freezer/cove/web/freezer.state")
            }
        );
    }

    #[test]
    fn no_freezer_is_a_clear_error() {
        let layout = CgroupLayout {
            unified: None,
            legacy: vec![LegacyHierarchy {
                mount: PathBuf::from("/sys/fs/cgroup/memory"),
                controllers: vec!["memory".to_string()],
            }],
        };
        let cgroup = Cgroup::existing(layout, "cove", "web");
        assert!(matches!(cgroup.freezer(), Err(FreezeError::NoFreezer)));
        assert!(!cgroup.is_frozen());
    }
}
