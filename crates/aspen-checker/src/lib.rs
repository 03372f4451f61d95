//! Linearizability checking for histories of key-value operations, for the simulator and
//! the real-process tests.
//!
//! The model is one register per key: `Put`, `Delete`, `Get` and compare-and-set. Histories
//! are split per key (every operation here touches one key, and linearizability is
//! compositional), then each key's history is searched with the Wing & Gong algorithm and
//! Lowe's memoization of (linearized set, state) pairs, as in porcupine and Knossos.
//!
//! An operation whose outcome is unknown (the client timed out) has no return time: it may
//! take effect at any point after its call, or never. Treating its return as infinitely
//! late covers both, since an operation linearized after everything else is unobservable.
//!
//! Architecture invariant: pure computation, no dependencies, no I/O.

use std::collections::{BTreeMap, HashSet};

/// Longest per-key history searched; longer ones are split by the caller or reported.
pub const MAX_OPS_PER_KEY: usize = 4096;
/// Most search states explored per key before giving up with [`Verdict::Unknown`].
pub const MAX_SEARCH_STATES: usize = 5_000_000;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Set the key to a value.
    Put(Vec<u8>),
    /// Remove the key.
    Delete,
    /// Read the key.
    Get,
    /// Set the key to `new` (`None` = delete) if it currently holds `expected`.
    Cas {
        /// The value the key must hold (`None` = absent).
        expected: Option<Vec<u8>>,
        /// The value to store (`None` = delete).
        new: Option<Vec<u8>>,
    },
}

/// What the client saw; `None` in [`Operation::output`] means the outcome is unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// A write was acknowledged.
    Ok,
    /// A read returned this value (`None` = absent).
    Value(Option<Vec<u8>>),
    /// A compare-and-set reported whether it applied.
    CasResult(bool),
}

/// One operation of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The client that issued it (operations of one client never overlap).
    pub client: u64,
    /// The key.
    pub key: Vec<u8>,
    /// When it was invoked.
    pub call: u64,
    /// When it completed; `None` if the outcome is unknown (it may or may not have applied).
    pub ret: Option<u64>,
    /// What was asked.
    pub input: Input,
    /// What was seen; `None` with `ret: None`.
    pub output: Option<Output>,
}

/// The checker's verdict for a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some order of the operations respects real time and the register model.
    Linearizable,
    /// No such order exists for `key`; `explanation` says which operations could not be placed.
    NotLinearizable {
        /// The key whose history fails.
        key: Vec<u8>,
        /// The longest prefix of a valid order found, and the operations left over.
        explanation: String,
    },
    /// The search was cut off by a limit before reaching a verdict.
    Unknown {
        /// The key whose search was cut off.
        key: Vec<u8>,
        /// Which limit.
        reason: String,
    },
}

/// Applies `input` to the register `state`; returns the new state and whether `output`
/// (if known) is what the model produces.
fn step(state: &Option<Vec<u8>>, input: &Input, output: Option<&Output>) -> Option<Option<Vec<u8>>> {
    let (next, produced) = match input {
        Input::Put(value) => (Some(value.clone()), Output::Ok),
        Input::Delete => (None, Output::Ok),
        Input::Get => (state.clone(), Output::Value(state.clone())),
        Input::Cas { expected, new } => {
            if state == expected {
                (new.clone(), Output::CasResult(true))
            } else {
                (state.clone(), Output::CasResult(false))
            }
        }
    };
    match output {
        Some(seen) if *seen != produced => None,
        _ => Some(next),
    }
}

/// Checks a whole history, key by key.
pub fn check(history: &[Operation]) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        by_key.entry(&operation.key).or_default().push(operation);
    }
    for (key, operations) in by_key {
        let verdict = check_key(key, &operations);
        if verdict != Verdict::Linearizable {
            return verdict;
        }
    }
    Verdict::Linearizable
}

fn check_key(key: &[u8], operations: &[&Operation]) -> Verdict {
    // Reads with unknown outcome constrain nothing: drop them.
    let operations: Vec<&Operation> =
        operations.iter().copied().filter(|op| !(op.ret.is_none() && op.input == Input::Get)).collect();
    if operations.len() > MAX_OPS_PER_KEY {
        return Verdict::Unknown { key: key.to_vec(), reason: format!("{} operations on one key", operations.len()) };
    }
    let count = operations.len();
    let ret = |index: usize| operations[index].ret.unwrap_or(u64::MAX);
    // Depth-first search over orders; `linearized` is a bitset of placed operations.
    let words = count.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Option<Vec<u8>> = None;
    let mut stack: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
    let mut seen: HashSet<(Vec<u64>, Option<Vec<u8>>)> = HashSet::new();
    let mut explored = 0usize;
    let mut best: Vec<usize> = Vec::new();
    let is_set = |bits: &[u64], index: usize| bits[index / 64] & (1 << (index % 64)) != 0;
    let mut next_candidate = 0usize;
    loop {
        if stack.len() == count {
            return Verdict::Linearizable;
        }
        // The earliest return among unplaced operations bounds which ones may go next:
        // an operation can be placed only if it was called before every unplaced one returned.
        let horizon = (0..count).filter(|index| !is_set(&linearized, *index)).map(ret).min().unwrap_or(u64::MAX);
        let mut placed = false;
        let mut candidate = next_candidate;
        while candidate < count {
            if !is_set(&linearized, candidate) && operations[candidate].call <= horizon {
                let op = operations[candidate];
                if let Some(next_state) = step(&state, &op.input, op.output.as_ref()) {
                    let mut next_bits = linearized.clone();
                    next_bits[candidate / 64] |= 1 << (candidate % 64);
                    if seen.insert((next_bits.clone(), next_state.clone())) {
                        explored += 1;
                        if explored > MAX_SEARCH_STATES {
                            return Verdict::Unknown {
                                key: key.to_vec(),
                                reason: format!("more than {MAX_SEARCH_STATES} search states"),
                            };
                        }
                        stack.push((candidate, state.clone()));
                        linearized = next_bits;
                        state = next_state;
                        placed = true;
                        if stack.len() > best.len() {
                            best = stack.iter().map(|(index, _)| *index).collect();
                        }
                        break;
                    }
                }
            }
            candidate += 1;
        }
        if placed {
            next_candidate = 0;
            continue;
        }
        // Dead end: undo the last placement and try the next candidate in its place.
        match stack.pop() {
            Some((index, previous_state)) => {
                linearized[index / 64] &= !(1 << (index % 64));
                state = previous_state;
                next_candidate = index + 1;
            }
            None => {
                let left: Vec<String> = (0..count)
                    .filter(|index| !best.contains(index))
                    .take(5)
                    .map(|index| operations[index].to_string())
                    .collect();
                let order: Vec<String> = best
                    .iter()
                    .map(|index| {
                        let op = &operations[*index];
                        format!("{} = {}", op.input, op.output.as_ref().map_or("?".into(), Output::to_string))
                    })
                    .collect();
                return Verdict::NotLinearizable {
                    key: key.to_vec(),
                    explanation: format!(
                        "longest valid order placed {} of {count} operations: [{}]; could not place: {}",
                        best.len(),
                        order.join(", "),
                        left.join("; ")
                    ),
                };
            }
        }
    }
}

/// Bytes as text, for explanations (values in tests and the simulator are text).
fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

fn show_value(value: &Option<Vec<u8>>) -> String {
    value.as_deref().map_or_else(|| "absent".into(), show)
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Put(value) => write!(f, "put({})", show(value)),
            Input::Delete => write!(f, "delete"),
            Input::Get => write!(f, "get"),
            Input::Cas { expected, new } => write!(f, "cas({} -> {})", show_value(expected), show_value(new)),
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Ok => write!(f, "ok"),
            Output::Value(value) => write!(f, "{}", show_value(value)),
            Output::CasResult(applied) => write!(f, "{applied}"),
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: u64| format!("{}.{:06}ms", ns / 1_000_000, ns % 1_000_000);
        let ret = self.ret.map_or_else(|| "?".into(), ms);
        let output = self.output.as_ref().map_or_else(|| "? (unknown outcome)".into(), Output::to_string);
        write!(
            f,
            "client {} [{} .. {}] {} {} = {}",
            self.client,
            ms(self.call),
            ret,
            show(&self.key),
            self.input,
            output
        )
    }
}

#[cfg(test)]
mod tests;
