//! A heap budget for one SQLite call on one thread, so a SQL query can be refused memory
//! without any other connection (the writer above all) feeling it.
//!
//! SQLite's own bounds are process-wide (`sqlite3_hard_heap_limit64` fails whichever
//! allocation crosses the line, the writer's included, and a failed apply stops the node;
//! `sqlite3_soft_heap_limit64` only shrinks caches) or per value (`SQLITE_LIMIT_LENGTH`,
//! which does not bound how many values a query keeps alive at once: constant expressions
//! keep one register each for the statement's lifetime, so a 16 KiB query can hold
//! hundreds of 5 MiB values). So [`install`] wraps SQLite's allocator: every allocation
//! and free is passed to the original, and, while a [`HeapBudget`] is active on the
//! calling thread, the net bytes it allocated are counted and an allocation that would
//! exceed the budget fails. SQLite reports that as `SQLITE_NOMEM` for that statement only.
//! A query runs entirely on the thread that steps it: SQL connections never start sorter
//! worker threads (`SQLITE_LIMIT_WORKER_THREADS` is 0 on them).

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The allocator SQLite had before [`install`]; every call ends there.
struct SystemMethods(ffi::sqlite3_mem_methods);

// SAFETY: the methods are plain C function pointers and SQLite's opaque `pAppData`, which
// SQLite itself hands to every thread; they are written once, before SQLite starts.
unsafe impl Sync for SystemMethods {}
// SAFETY: as above.
unsafe impl Send for SystemMethods {}

static SYSTEM: OnceLock<SystemMethods> = OnceLock::new();

/// Net bytes allocated on this thread since the budget started, and its bound.
#[derive(Clone, Copy)]
struct Budget {
    net_bytes: i64,
    max_bytes: i64,
    refused: bool,
}

thread_local! {
    // Const-initialised and without a destructor: reading it from inside SQLite's
    // allocator never allocates, registers anything or panics, even while a thread exits.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Installs the counting allocator if SQLite has not started yet in this process; returns
/// whether budgets are enforced. Call before the process opens its first SQLite
/// connection: SQLite accepts a new allocator only before it initialises.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let installed = install_once();
        if !installed {
            tracing::warn!("SQLite started before the state machine opened: SQL queries run without a memory budget");
        }
        installed
    })
}

fn install_once() -> bool {
    let mut system = std::mem::MaybeUninit::<ffi::sqlite3_mem_methods>::zeroed();
    // SAFETY: SQLITE_CONFIG_GETMALLOC takes one pointer to a `sqlite3_mem_methods` and
    // fills it. `install` runs once (its `OnceLock`), before this crate opens a connection.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETMALLOC, system.as_mut_ptr()) };
    if rc != ffi::SQLITE_OK {
        return false;
    }
    // SAFETY: every field of `sqlite3_mem_methods` is an `Option` of a function pointer or
    // a raw pointer, valid when zeroed, and SQLite has just filled them all.
    let system = unsafe { system.assume_init() };
    if system.xMalloc.is_none() || system.xFree.is_none() || system.xRealloc.is_none() || system.xSize.is_none() {
        return false;
    }
    if SYSTEM.set(SystemMethods(system)).is_err() {
        return false;
    }
    let counting = ffi::sqlite3_mem_methods {
        xMalloc: Some(counting_malloc),
        xFree: Some(counting_free),
        xRealloc: Some(counting_realloc),
        ..system
    };
    // SAFETY: SQLITE_CONFIG_MALLOC copies the struct it points to; it fails (SQLITE_MISUSE)
    // rather than swap allocators under a running SQLite.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &counting as *const ffi::sqlite3_mem_methods) };
    rc == ffi::SQLITE_OK
}

/// A bound on what SQLite may add to its heap, counted only inside [`HeapBudget::within`]
/// and only on the calling thread. Reading a finished row's values stays outside: rusqlite
/// panics when SQLite cannot materialize a value it reports, and those values are bounded
/// by `SQLITE_LIMIT_LENGTH` and the caller's byte budget anyway.
pub struct HeapBudget {
    state: Cell<Budget>,
}

impl HeapBudget {
    /// A budget under which SQLite may add at most `max_bytes` to its heap.
    pub fn new(max_bytes: usize) -> HeapBudget {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        HeapBudget { state: Cell::new(Budget { net_bytes: 0, max_bytes, refused: false }) }
    }

    /// Runs `work` with SQLite's allocations on this thread counted against the budget.
    pub fn within<T>(&self, work: impl FnOnce() -> T) -> T {
        let previous = BUDGET.replace(Some(self.state.get()));
        // Restores the thread's previous state even if `work` unwinds.
        let _restore = Restore { budget: self, previous };
        work()
    }

    /// Whether an allocation was refused so far.
    pub fn refused(&self) -> bool {
        self.state.get().refused
    }
}

struct Restore<'a> {
    budget: &'a HeapBudget,
    previous: Option<Budget>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Some(state) = BUDGET.replace(self.previous) {
            self.budget.state.set(state);
        }
    }
}

/// Adds `bytes` (negative for a release) to this thread's budget if one is active; false
/// if that would exceed it, and then nothing is added.
fn charge(bytes: i64) -> bool {
    // `try_with`: the allocator must never panic across the FFI boundary.
    BUDGET
        .try_with(|cell| {
            let Some(mut budget) = cell.get() else { return true };
            let net_bytes = budget.net_bytes.saturating_add(bytes);
            let allowed = bytes <= 0 || net_bytes <= budget.max_bytes;
            if allowed {
                budget.net_bytes = net_bytes;
            } else {
                budget.refused = true;
            }
            cell.set(Some(budget));
            allowed
        })
        .unwrap_or(true)
}

fn system() -> &'static ffi::sqlite3_mem_methods {
    // The counting functions are only installed after `SYSTEM` is set.
    &SYSTEM.get().unwrap_or_else(|| unreachable!("counting allocator installed without the system one")).0
}

/// Bytes the system allocator hands out for a request of `bytes`.
fn rounded(bytes: c_int) -> i64 {
    match system().xRoundup {
        // SAFETY: SQLite's own xRoundup, called as SQLite calls it.
        Some(roundup) => i64::from(unsafe { roundup(bytes) }),
        None => i64::from(bytes),
    }
}

/// Bytes held by an allocation of the system allocator.
fn size_of(pointer: *mut c_void) -> i64 {
    match system().xSize {
        // SAFETY: `pointer` came from the system allocator (SQLite passes only its own).
        Some(size) if !pointer.is_null() => i64::from(unsafe { size(pointer) }),
        _ => 0,
    }
}

unsafe extern "C" fn counting_malloc(bytes: c_int) -> *mut c_void {
    let Some(malloc) = system().xMalloc else { return std::ptr::null_mut() };
    let charged = rounded(bytes);
    if !charge(charged) {
        return std::ptr::null_mut();
    }
    // SAFETY: SQLite's own xMalloc, called as SQLite calls it.
    let pointer = unsafe { malloc(bytes) };
    if pointer.is_null() {
        charge(-charged);
    }
    pointer
}

unsafe extern "C" fn counting_free(pointer: *mut c_void) {
    let Some(free) = system().xFree else { return };
    charge(-size_of(pointer));
    // SAFETY: SQLite's own xFree on a pointer its allocator returned.
    unsafe { free(pointer) }
}

unsafe extern "C" fn counting_realloc(pointer: *mut c_void, bytes: c_int) -> *mut c_void {
    let Some(realloc) = system().xRealloc else { return std::ptr::null_mut() };
    let growth = rounded(bytes) - size_of(pointer);
    if !charge(growth.max(0)) {
        // SQLite keeps the old allocation when a realloc fails.
        return std::ptr::null_mut();
    }
    // SAFETY: SQLite's own xRealloc on a pointer its allocator returned.
    let resized = unsafe { realloc(pointer, bytes) };
    if resized.is_null() {
        charge(-growth.max(0));
    } else if growth < 0 {
        charge(growth);
    }
    resized
}
