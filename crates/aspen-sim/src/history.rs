//! The recorded client history and the run's event trace, and how they are written out.

use std::sync::{Arc, Mutex, MutexGuard};

use aspen_checker::{Input, Operation, Output};
use serde_json::{Value, json};

/// Most trace events kept; later events are counted, not stored.
pub const MAX_TRACE_EVENTS: usize = 200_000;
/// Most operations recorded per run.
pub const MAX_HISTORY_OPS: usize = 200_000;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere leaves it consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Events of one run with their simulated time, shared by every task of the run.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    inner: Arc<Mutex<TraceInner>>,
}

#[derive(Debug, Default)]
struct TraceInner {
    events: Vec<String>,
    dropped: u64,
    violations: Vec<String>,
    minority_writes_ms: Vec<u64>,
    leader_cut_offs_ms: Vec<u64>,
}

impl Trace {
    /// Records an event at simulated time `at_ms`.
    pub fn event(&self, at_ms: u64, message: impl Into<String>) {
        let mut inner = lock(&self.inner);
        if inner.events.len() < MAX_TRACE_EVENTS {
            let message = message.into();
            inner.events.push(format!("{:>6}.{:03}s {message}", at_ms / 1000, at_ms % 1000));
        } else {
            inner.dropped += 1;
        }
    }

    /// Records an invariant violation (also as an event).
    pub fn violation(&self, at_ms: u64, message: impl Into<String>) {
        let message = message.into();
        self.event(at_ms, format!("VIOLATION {message}"));
        lock(&self.inner).violations.push(message);
    }

    /// Records how long a write through the majority's leader took while a minority was cut
    /// off (the availability invariant's measurement, summed up over seeds).
    pub fn minority_write(&self, took_ms: u64) {
        lock(&self.inner).minority_writes_ms.push(took_ms);
    }

    /// The writes recorded by [`Trace::minority_write`], in ms.
    pub fn minority_writes_ms(&self) -> Vec<u64> {
        lock(&self.inner).minority_writes_ms.clone()
    }

    /// Records how long the majority took to lead and commit after the leader was cut off.
    pub fn leader_cut_off(&self, took_ms: u64) {
        lock(&self.inner).leader_cut_offs_ms.push(took_ms);
    }

    /// The times recorded by [`Trace::leader_cut_off`], in ms.
    pub fn leader_cut_offs_ms(&self) -> Vec<u64> {
        lock(&self.inner).leader_cut_offs_ms.clone()
    }

    /// Violations so far.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.inner).violations.clone()
    }

    /// The events, one per line, with a note of any that did not fit.
    pub fn render(&self) -> String {
        let inner = lock(&self.inner);
        let mut text = inner.events.join("\n");
        if inner.dropped > 0 {
            text.push_str(&format!("\n... {} more events not kept (limit {MAX_TRACE_EVENTS})", inner.dropped));
        }
        text.push('\n');
        text
    }

    /// A digest of the events: two runs of one seed must have equal digests.
    pub fn digest(&self) -> String {
        let inner = lock(&self.inner);
        let mut hasher = blake3::Hasher::new();
        for event in &inner.events {
            hasher.update(event.as_bytes());
            hasher.update(b"\n");
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// The operations clients completed (or gave up on), shared by every client of the run.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Arc<Mutex<Vec<Operation>>>,
}

impl History {
    /// Records one operation; returns false once the history is full.
    pub fn record(&self, op: Operation) -> bool {
        let mut ops = lock(&self.ops);
        if ops.len() >= MAX_HISTORY_OPS {
            return false;
        }
        ops.push(op);
        true
    }

    /// A copy of the operations.
    pub fn operations(&self) -> Vec<Operation> {
        lock(&self.ops).clone()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The history as JSON, one object per operation (times in simulated nanoseconds).
pub fn history_json(ops: &[Operation]) -> Value {
    let ops: Vec<Value> = ops
        .iter()
        .map(|op| {
            let input = match &op.input {
                Input::Put(value) => json!({ "put": text(value) }),
                Input::Delete => json!("delete"),
                Input::Get => json!("get"),
                Input::Cas { expected, new } => json!({
                    "cas": { "expected": expected.as_deref().map(text), "new": new.as_deref().map(text) }
                }),
            };
            let output = match &op.output {
                None => Value::Null,
                Some(Output::Ok) => json!("ok"),
                Some(Output::Value(value)) => json!({ "value": value.as_deref().map(text) }),
                Some(Output::CasResult(applied)) => json!({ "cas_applied": applied }),
            };
            json!({
                "client": op.client,
                "key": text(&op.key),
                "call_ns": op.call,
                "return_ns": op.ret,
                "input": input,
                "output": output,
            })
        })
        .collect();
    Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_is_bounded_and_digest_follows_content() {
        let trace = Trace::default();
        trace.event(1500, "a");
        let first = trace.digest();
        trace.violation(2000, "two leaders");
        assert_ne!(first, trace.digest());
        assert_eq!(trace.violations(), vec!["two leaders".to_string()]);
        assert!(trace.render().contains("     1.500s a"));
        let other = Trace::default();
        other.event(1500, "a");
        assert_eq!(other.digest(), first);
    }

    #[test]
    fn history_json_keeps_unknown_outcomes() {
        let op = Operation {
            client: 3,
            key: b"k1".to_vec(),
            call: 10,
            ret: None,
            input: Input::Cas { expected: None, new: Some(b"v".to_vec()) },
            output: None,
        };
        let json = history_json(&[op]);
        assert_eq!(json[0]["return_ns"], Value::Null);
        assert_eq!(json[0]["input"]["cas"]["new"], json!("v"));
        assert_eq!(json[0]["key"], json!("k1"));
    }
}
