//! The VM's run state, shared by the vCPU threads, the event loop and the API: running, paused
//! or stopping, and the reason the VM ended. The first reason recorded wins; recording one wakes
//! the event loop through an EventFd.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// What the vCPUs should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 or a KVM reset event.
    GuestReset,
    /// The guest powered the machine off.
    GuestPowerOff,
    /// The API asked for a shutdown.
    ApiShutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The guest, KVM or cove-vmm failed; the message says how.
    Failure(String),
}

impl ExitReason {
    /// The process exit status for this reason (see `cove-vmm --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Failure(_) => 2,
            _ => 0,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::GuestReset => "the guest reset the machine".into(),
            Self::GuestPowerOff => "the guest powered off".into(),
            Self::ApiShutdown => "shut down through the API".into(),
            Self::Signal(signal) => format!("stopped by signal {signal}"),
            Self::Failure(message) => message.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is shutting down")]
    Stopping,
    #[error("the vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
}

struct Shared {
    state: RunState,
    paused_vcpus: u32,
    finished_vcpus: u32,
    exit: Option<ExitReason>,
}

/// Run state and exit reason behind one lock, with a condition variable for changes.
pub struct VmControl {
    shared: Mutex<Shared>,
    changed: Condvar,
    exit_event: EventFd,
    vcpus: u32,
}

impl VmControl {
    pub fn new(vcpus: u32) -> std::io::Result<Self> {
        Ok(Self {
            shared: Mutex::new(Shared {
                state: RunState::Running,
                paused_vcpus: 0,
                finished_vcpus: 0,
                exit: None,
            }),
            changed: Condvar::new(),
            exit_event: EventFd::new(libc::EFD_NONBLOCK)?,
            vcpus,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The event that becomes readable once an exit reason is recorded.
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_event
    }

    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// Records why the VM ends (only the first reason counts) and tells everyone to stop.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut shared = self.lock();
        if shared.exit.is_none() {
            shared.exit = Some(reason);
        }
        shared.state = RunState::Stopping;
        self.changed.notify_all();
        drop(shared);
        // The counter only saturates after 2^64 - 1 writes; one pending wake-up is enough.
        let _ = self.exit_event.write(1);
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Asks the vCPUs to pause. The caller then kicks them out of KVM_RUN and waits with
    /// `wait_until_paused`.
    pub fn begin_pause(&self) -> Result<(), ControlError> {
        let mut shared = self.lock();
        match shared.state {
            RunState::Running => {
                shared.state = RunState::Paused;
                Ok(())
            }
            RunState::Paused => Err(ControlError::AlreadyPaused),
            RunState::Stopping => Err(ControlError::Stopping),
        }
    }

    /// Waits until every vCPU has parked.
    pub fn wait_until_paused(&self, timeout: Duration) -> Result<(), ControlError> {
        let shared = self.lock();
        let (shared, result) = self
            .changed
            .wait_timeout_while(shared, timeout, |shared| {
                shared.state == RunState::Paused && shared.paused_vcpus < self.vcpus
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match shared.state {
            RunState::Stopping => Err(ControlError::Stopping),
            _ if result.timed_out() => Err(ControlError::PauseTimeout(timeout)),
            _ => Ok(()),
        }
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut shared = self.lock();
        match shared.state {
            RunState::Paused => {
                shared.state = RunState::Running;
                self.changed.notify_all();
                Ok(())
            }
            RunState::Running => Err(ControlError::NotPaused),
            RunState::Stopping => Err(ControlError::Stopping),
        }
    }

    /// Called by a vCPU thread as it ends.
    pub fn vcpu_finished(&self) {
        let mut shared = self.lock();
        shared.finished_vcpus += 1;
        self.changed.notify_all();
    }

    /// Waits until every vCPU thread has ended; returns false if some had not by `timeout`.
    pub fn wait_until_vcpus_finished(&self, timeout: Duration) -> bool {
        let shared = self.lock();
        let (_shared, result) = self
            .changed
            .wait_timeout_while(shared, timeout, |shared| shared.finished_vcpus < self.vcpus)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        !result.timed_out()
    }

    /// Called by a vCPU thread between runs: parks it while the VM is paused. Returns false when
    /// the thread should end.
    pub fn vcpu_may_run(&self) -> bool {
        let mut shared = self.lock();
        if shared.state == RunState::Paused {
            shared.paused_vcpus += 1;
            self.changed.notify_all();
            shared = self
                .changed
                .wait_while(shared, |shared| shared.state == RunState::Paused)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            shared.paused_vcpus -= 1;
        }
        shared.state == RunState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let control = Arc::new(VmControl::new(2).unwrap());
        control.begin_pause().unwrap();
        assert_eq!(control.begin_pause(), Err(ControlError::AlreadyPaused));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let control = control.clone();
                std::thread::spawn(move || control.vcpu_may_run())
            })
            .collect();
        control.wait_until_paused(Duration::from_secs(5)).unwrap();
        control.resume().unwrap();
        for thread in threads {
            assert!(thread.join().unwrap());
        }
        assert_eq!(control.resume(), Err(ControlError::NotPaused));
    }

    #[test]
    fn the_first_exit_reason_wins_and_wakes_the_event_loop() {
        let control = VmControl::new(1).unwrap();
        control.request_exit(ExitReason::GuestReset);
        control.request_exit(ExitReason::Failure("later".into()));
        assert_eq!(control.exit_reason(), Some(ExitReason::GuestReset));
        assert_eq!(control.exit_event().read().unwrap(), 2);
        assert!(!control.vcpu_may_run());
        assert_eq!(control.begin_pause(), Err(ControlError::Stopping));
    }
}
