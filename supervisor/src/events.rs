//! The event bus behind `/1.0/events`: operation changes, lifecycle events (instance created,
//! started, stopped, ...) and log lines, broadcast to every listener. A listener that falls
//! too far behind misses events rather than slowing the daemon down.

use std::collections::BTreeMap;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::api::types::{Event, LifecycleEvent, LoggingEvent, Operation};
use crate::clock;

/// How many events a slow listener may fall behind before it misses some.
const BACKLOG: usize = 4096;

/// The event kinds a listener may ask for with `?type=`.
pub const KINDS: [&str; 3] = ["operation", "lifecycle", "logging"];

#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    fn send(&self, kind: &str, metadata: Value) {
        // No listener is not an error.
        let _ = self.sender.send(Event {
            kind: kind.to_string(),
            timestamp: clock::now(),
            metadata,
            location: "none".to_string(),
            project: "default".to_string(),
        });
    }

    pub fn operation(&self, operation: &Operation) {
        self.send(
            "operation",
            serde_json::to_value(operation).unwrap_or(Value::Null),
        );
    }

    /// A lifecycle event such as `instance-started` for `/1.0/instances/web`.
    pub fn lifecycle(&self, action: &str, source: &str, context: BTreeMap<String, Value>) {
        let event = LifecycleEvent {
            action: action.to_string(),
            source: source.to_string(),
            context,
        };
        self.send(
            "lifecycle",
            serde_json::to_value(event).unwrap_or(Value::Null),
        );
    }

    /// A log line, also printed on coved's standard error.
    pub fn log(&self, level: &str, message: &str, context: BTreeMap<String, String>) {
        let details: Vec<String> = context
            .iter()
            .map(|(key, value)| format!("{key}={value:?}"))
            .collect();
        eprintln!("coved: {level}: {message} {}", details.join(" "));
        let event = LoggingEvent {
            message: message.to_string(),
            level: level.to_string(),
            context,
        };
        self.send(
            "logging",
            serde_json::to_value(event).unwrap_or(Value::Null),
        );
    }

    pub fn info(&self, message: &str, context: &[(&str, &str)]) {
        self.log("info", message, to_context(context));
    }

    pub fn warn(&self, message: &str, context: &[(&str, &str)]) {
        self.log("warning", message, to_context(context));
    }
}

fn to_context(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}
