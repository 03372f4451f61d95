//! Telling when a store's files are closed, without keeping them open: a restart in the
//! same process (the simulator, the server's reopen) waits for the old handles to go.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sets its flag when dropped. A store declares it as its last field: fields drop in
/// declaration order, so everything holding the files is gone by then.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal(Arc<AtomicBool>);

impl CloseSignal {
    /// A watch on this signal.
    pub(crate) fn watch(&self) -> CloseWatch {
        CloseWatch { closed: Arc::clone(&self.0) }
    }
}

impl Drop for CloseSignal {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A handle that does not keep a store open; tells when every real handle is gone and its
/// files are closed.
#[derive(Clone, Debug)]
pub struct CloseWatch {
    closed: Arc<AtomicBool>,
}

impl CloseWatch {
    /// Whether the store has been closed (every handle dropped, its files closed and
    /// unlocked), so it can be reopened.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
