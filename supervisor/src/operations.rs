//! Operations: the background work behind every async response (`/1.0/operations/<id>`),
//! with their status, metadata, cancellation, `wait`, and the secrets that admit websockets
//! to them (exec's stdin, stdout, stderr and control streams).
//!
//! Operations live in memory only, as LXD's do: they describe work of this daemon process.
//! A finished operation stays visible for [`RETENTION`] so that clients that poll after
//! `wait` (pylxd does) still find it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::WebSocket;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::api::types::{Operation, StatusCode};
use crate::clock;
use crate::events::Events;

/// How long a finished operation stays listed.
pub const RETENTION: Duration = Duration::from_secs(60);

/// LXD's operation classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Background work.
    Task,
    /// Work that waits for websockets to connect (exec).
    Websocket,
}

impl Class {
    fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Websocket => "websocket",
        }
    }
}

/// A websocket connected to an operation, handed to the operation's task with its fd name.
pub type ConnectedSocket = (String, WebSocket);

#[derive(Debug)]
struct State {
    status: StatusCode,
    updated_at: String,
    metadata: Value,
    err: String,
    may_cancel: bool,
}

/// The websockets an operation admits: secret -> fd name, and where connected ones go.
#[derive(Debug, Default)]
struct Sockets {
    secrets: HashMap<String, String>,
    sender: Option<mpsc::UnboundedSender<ConnectedSocket>>,
}

/// One operation.
#[derive(Debug)]
pub struct OperationHandle {
    id: String,
    class: Class,
    description: String,
    created_at: String,
    resources: BTreeMap<String, Vec<String>>,
    state: Mutex<State>,
    finished: watch::Sender<bool>,
    cancel: watch::Sender<bool>,
    sockets: Mutex<Sockets>,
    events: Events,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OperationHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn url(&self) -> String {
        format!("/1.0/operations/{}", self.id)
    }

    pub fn snapshot(&self) -> Operation {
        let state = lock(&self.state);
        Operation {
            id: self.id.clone(),
            class: self.class.as_str().to_string(),
            description: self.description.clone(),
            created_at: self.created_at.clone(),
            updated_at: state.updated_at.clone(),
            status: state.status.text().to_string(),
            status_code: state.status.code(),
            resources: self.resources.clone(),
            metadata: state.metadata.clone(),
            may_cancel: state.may_cancel,
            err: state.err.clone(),
            location: "none".to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        lock(&self.state).status
    }

    fn change(&self, apply: impl FnOnce(&mut State)) {
        let snapshot = {
            let mut state = lock(&self.state);
            if state.status.is_final() {
                return;
            }
            apply(&mut state);
            state.updated_at = clock::now();
            drop(state);
            self.snapshot()
        };
        self.events.operation(&snapshot);
        if snapshot.status_code >= 200 {
            self.finished.send_replace(true);
            lock(&self.sockets).sender = None;
        }
    }

    pub fn set_metadata(&self, metadata: Value) {
        self.change(|state| state.metadata = metadata);
    }

    pub fn succeed(&self, metadata: Option<Value>) {
        self.change(|state| {
            state.status = StatusCode::Success;
            state.may_cancel = false;
            if let Some(metadata) = metadata {
                state.metadata = metadata;
            }
        });
    }

    pub fn fail(&self, message: &str) {
        self.change(|state| {
            state.status = StatusCode::Failure;
            state.may_cancel = false;
            state.err = message.to_string();
        });
    }

    pub fn cancelled(&self) {
        self.change(|state| {
            state.status = StatusCode::Cancelled;
            state.may_cancel = false;
            state.err = "Operation cancelled".to_string();
        });
    }

    /// Asks the operation's task to stop; false if it cannot be cancelled.
    pub fn request_cancel(&self) -> bool {
        let may_cancel = lock(&self.state).may_cancel;
        if may_cancel {
            self.change(|state| state.status = StatusCode::Cancelling);
            self.cancel.send_replace(true);
        }
        may_cancel
    }

    /// Resolves when a cancel was requested.
    pub async fn cancel_requested(&self) {
        let mut receiver = self.cancel.subscribe();
        let _ = receiver.wait_for(|requested| *requested).await;
    }

    /// Waits until the operation has finished, or `timeout` passed; returns it either way.
    pub async fn wait(&self, timeout: Option<Duration>) -> Operation {
        let mut receiver = self.finished.subscribe();
        let finished = receiver.wait_for(|finished| *finished);
        match timeout {
            Some(timeout) => {
                let _ = tokio::time::timeout(timeout, finished).await;
            }
            None => {
                let _ = finished.await;
            }
        }
        self.snapshot()
    }

    /// Registers websocket secrets (fd name -> secret) and returns where connected sockets
    /// arrive.
    pub fn accept_websockets(
        &self,
        secrets: &BTreeMap<String, String>,
    ) -> mpsc::UnboundedReceiver<ConnectedSocket> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut sockets = lock(&self.sockets);
        sockets.secrets = secrets
            .iter()
            .map(|(fd, secret)| (secret.clone(), fd.clone()))
            .collect();
        sockets.sender = Some(sender);
        receiver
    }

    /// The fd a secret admits to, each secret once; `None` for a wrong or used secret.
    pub fn claim_secret(
        &self,
        secret: &str,
    ) -> Option<(String, mpsc::UnboundedSender<ConnectedSocket>)> {
        let mut sockets = lock(&self.sockets);
        let sender = sockets.sender.clone()?;
        let fd = sockets.secrets.remove(secret)?;
        Some((fd, sender))
    }
}

/// Every operation of this daemon.
#[derive(Debug)]
pub struct Operations {
    table: Mutex<HashMap<String, Arc<OperationHandle>>>,
    events: Events,
}

impl Operations {
    pub fn new(events: Events) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// A new running operation, announced on the event bus.
    pub fn create(
        self: &Arc<Self>,
        class: Class,
        description: &str,
        resources: BTreeMap<String, Vec<String>>,
        metadata: Value,
        may_cancel: bool,
    ) -> Arc<OperationHandle> {
        let now = clock::now();
        let handle = Arc::new(OperationHandle {
            id: clock::uuid(),
            class,
            description: description.to_string(),
            created_at: now.clone(),
            resources,
            state: Mutex::new(State {
                status: StatusCode::Running,
                updated_at: now,
                metadata,
                err: String::new(),
                may_cancel,
            }),
            finished: watch::channel(false).0,
            cancel: watch::channel(false).0,
            sockets: Mutex::new(Sockets::default()),
            events: self.events.clone(),
        });
        lock(&self.table).insert(handle.id.clone(), handle.clone());
        self.events.operation(&handle.snapshot());
        // Forget the operation a while after it finished.
        let table = Arc::clone(self);
        let watched = handle.clone();
        tokio::spawn(async move {
            watched.wait(None).await;
            tokio::time::sleep(RETENTION).await;
            lock(&table.table).remove(&watched.id);
        });
        handle
    }

    /// Runs `work` in the background as `handle`'s task: success carries the metadata it
    /// returns, an error its message.
    pub fn run<F>(handle: Arc<OperationHandle>, work: F)
    where
        F: Future<Output = Result<Option<Value>, String>> + Send + 'static,
    {
        tokio::spawn(async move {
            match work.await {
                Ok(metadata) => handle.succeed(metadata),
                Err(message) => handle.fail(&message),
            }
        });
    }

    pub fn get(&self, id: &str) -> Option<Arc<OperationHandle>> {
        lock(&self.table).get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<OperationHandle>> {
        let mut all: Vec<_> = lock(&self.table).values().cloned().collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operations_finish_once_and_wake_waiters() {
        let events = Events::new();
        let mut listener = events.subscribe();
        let operations = Arc::new(Operations::new(events));
        let handle = operations.create(Class::Task, "Testing", BTreeMap::new(), Value::Null, true);
        let waiter = {
            let handle = handle.clone();
            tokio::spawn(async move { handle.wait(None).await })
        };
        handle.succeed(Some(serde_json::json!({"return": 0})));
        handle.fail("too late");
        let done = waiter.await.unwrap();
        assert_eq!(done.status_code, 200);
        assert_eq!(done.metadata["return"], 0);
        assert!(done.err.is_empty());
        assert_eq!(listener.recv().await.unwrap().kind, "operation");
        assert!(operations.get(handle.id()).is_some());
        let timed_out = operations
            .create(Class::Task, "Slow", BTreeMap::new(), Value::Null, false)
            .wait(Some(Duration::from_millis(10)))
            .await;
        assert_eq!(timed_out.status_code, 103);
    }

    #[tokio::test]
    async fn secrets_admit_once() {
        let operations = Arc::new(Operations::new(Events::new()));
        let handle = operations.create(
            Class::Websocket,
            "Executing command",
            BTreeMap::new(),
            Value::Null,
            false,
        );
        let secrets = BTreeMap::from([("0".to_string(), "s0".to_string())]);
        let _receiver = handle.accept_websockets(&secrets);
        assert!(handle.claim_secret("wrong").is_none());
        assert_eq!(handle.claim_secret("s0").unwrap().0, "0");
        assert!(handle.claim_secret("s0").is_none());
        assert!(!handle.request_cancel());
    }
}
