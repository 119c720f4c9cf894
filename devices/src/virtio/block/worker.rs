//! The block device's worker threads: they take parsed requests from a shared list, move the
//! bytes between the image and guest memory, write the status byte, and hand the outcome back
//! as a [`Completion`] with a write to an eventfd, which the device returns as its `backend_fd`.
//! The event loop then puts completions on the used ring; workers never touch the rings.
//!
//! What must not live here: queue handling or request checks. A job is a request that
//! `request::parse_request` accepted, with its buffers inside guest memory.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::image::{DiskImage, Scratch};
use super::request::{Request, Segment};
use super::{finish, Outcome};

/// How many worker threads a block device starts: enough requests in flight to keep a host
/// SSD's queue busy with O_DIRECT (4 workers gave a third of QEMU's 64-thread pool on 4 KiB
/// random reads, 32 more than it); idle workers cost only their stacks.
pub const WORKER_COUNT: usize = 32;

/// Runs first on every worker thread, before it takes any job (the VMM installs the thread's
/// seccomp filter there); an error stops the worker and fails `Block::start_workers`.
pub type ThreadStartHook =
    Arc<dyn Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// A request handed to a worker.
pub struct Job {
    pub head: u16,
    pub request: Request,
    /// The data buffers; handed back in the completion to be used again.
    pub data: Vec<Segment>,
    pub status_address: GuestAddress,
    pub memory: Arc<GuestMemoryMmap>,
}

/// A request a worker has finished; its status byte is written.
pub struct Completion {
    pub head: u16,
    pub outcome: Outcome,
    pub bounced: bool,
    pub data: Vec<Segment>,
}

#[derive(Default)]
struct JobList {
    jobs: VecDeque<Job>,
    /// Jobs a worker has taken and not yet completed.
    running: usize,
    shutdown: bool,
}

/// What the device and its workers share.
pub struct Shared {
    jobs: Mutex<JobList>,
    /// Signalled when a job arrives or the workers must stop.
    job_ready: Condvar,
    /// Signalled when the last running job completes and none waits.
    idle: Condvar,
    completions: Mutex<Vec<Completion>>,
    /// Written once per completion; the device's `backend_fd`.
    pub completed: EventFd,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-job leaves plain data behind: keep going with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            jobs: Mutex::new(JobList::default()),
            job_ready: Condvar::new(),
            idle: Condvar::new(),
            completions: Mutex::new(Vec::new()),
            completed: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn submit(&self, job: Job) {
        lock(&self.jobs).jobs.push_back(job);
        self.job_ready.notify_one();
    }

    /// Moves the completions posted so far into `into` (which the caller keeps, so that
    /// draining allocates nothing).
    pub fn take_completions(&self, into: &mut Vec<Completion>) {
        let _ = self.completed.read();
        std::mem::swap(&mut *lock(&self.completions), into);
    }

    /// Forgets the jobs no worker has started, waits for those running to finish, and drops
    /// every completion: afterwards no worker touches guest memory for what was submitted.
    pub fn cancel_all(&self) {
        let mut jobs = lock(&self.jobs);
        jobs.jobs.clear();
        while jobs.running > 0 {
            jobs = self
                .idle
                .wait(jobs)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        drop(jobs);
        // The eventfd may stay readable: the event loop's next `take_completions` finds
        // nothing and quiets it (this runs on a vCPU thread, whose filter has no `read`).
        lock(&self.completions).clear();
    }

    fn next_job(&self) -> Option<Job> {
        let mut jobs = lock(&self.jobs);
        loop {
            if jobs.shutdown {
                return None;
            }
            if let Some(job) = jobs.jobs.pop_front() {
                jobs.running += 1;
                return Some(job);
            }
            jobs = self
                .job_ready
                .wait(jobs)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn complete(&self, completion: Completion) {
        lock(&self.completions).push(completion);
        let _ = self.completed.write(1);
        // Only now is the job no longer running: `cancel_all` must find its completion.
        let mut jobs = lock(&self.jobs);
        jobs.running -= 1;
        if jobs.running == 0 {
            self.idle.notify_all();
        }
    }

    fn shut_down(&self) {
        lock(&self.jobs).shutdown = true;
        self.job_ready.notify_all();
    }
}

/// The running workers; dropping this stops and joins them.
pub struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers over `image`; each runs `on_thread_start` first and reports how
    /// that went before this returns.
    pub fn start(
        count: usize,
        shared: Arc<Shared>,
        image: Arc<DiskImage>,
        on_thread_start: ThreadStartHook,
    ) -> Result<Self, super::BlockError> {
        let mut workers = Self {
            shared,
            threads: Vec::with_capacity(count),
        };
        let (started, outcomes) = std::sync::mpsc::channel();
        for index in 0..count {
            let shared = workers.shared.clone();
            let image = image.clone();
            let hook = on_thread_start.clone();
            let started = started.clone();
            let thread = std::thread::Builder::new()
                .name(format!("virtio-blk{index}"))
                .spawn(move || {
                    let outcome = hook();
                    let ready = outcome.is_ok();
                    let _ = started.send(outcome);
                    if ready {
                        serve(&shared, &image);
                    }
                })
                .map_err(super::BlockError::SpawnWorker)?;
            workers.threads.push(thread);
        }
        for _ in 0..count {
            match outcomes.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(super::BlockError::StartWorker(source)),
                Err(_) => {
                    return Err(super::BlockError::StartWorker(
                        "a worker thread ended before it started".into(),
                    ))
                }
            }
        }
        Ok(workers)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.shut_down();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(shared: &Shared, image: &DiskImage) {
    let mut scratch = Scratch::default();
    while let Some(job) = shared.next_job() {
        let Job {
            head,
            request,
            data,
            status_address,
            memory,
        } = job;
        let result = image.execute(memory.as_ref(), &request, &data, &[], &mut scratch);
        let outcome = finish(memory.as_ref(), status_address, result);
        shared.complete(Completion {
            head,
            outcome,
            bounced: scratch.bounced,
            data,
        });
    }
}
