//! The lease: a translation that a device keeps for a long time, enters
//! briefly and often, and that an invalidation can close at any moment.
//!
//! A [`crate::Pin`] suits DMA that starts and ends (a block request): the
//! invalidation waits until the holder drops it. A virtqueue's rings are
//! used for as long as the queue runs, so a pin over them would make every
//! UNMAP of a ring wait for a device reset. A lease turns that around: the
//! device holds the translation indefinitely but touches memory through it
//! only inside short *access sections*, and an invalidation closes the
//! lease and waits only for the sections that are open at that moment.
//!
//! # Protocol
//!
//! One atomic word holds a `CLOSED` bit and the number of open sections;
//! the list of waiting invalidations sits behind a mutex.
//!
//! 1. *Enter* (`enter`) increments the count with a
//!    compare-and-swap that fails if `CLOSED` is set. A closed lease never
//!    opens again.
//! 2. *Close* (`close`) takes the waiters' mutex, sets `CLOSED`
//!    with one read-modify-write, and, if that write saw open sections,
//!    registers a waiter before it lets the mutex go.
//! 3. *Exit* (`exit`) decrements the count. The exit that takes a
//!    closed lease from one open section to none takes the waiters' mutex
//!    and hands every waiter back to the caller to release.
//!
//! # Invariant
//!
//! Once a close has seen no open section, or once the waiter it registered
//! has been handed out, no section is open and none can open: every access
//! through the leased translation has finished (and happened before, by
//! the acquire/release pairs on the word and the mutex).
//!
//! Why: all changes of the word are totally ordered. An enter ordered
//! after the close sees `CLOSED` and fails (rule 1). An enter ordered
//! before it is counted in the value the close read; if that count was
//! zero, the section had already exited. Otherwise the waiter is
//! registered under the mutex, and the last exit (the only change that
//! brings a closed count to zero, since no enter succeeds any more) is
//! ordered after the close, so it takes the mutex after the registration
//! and finds the waiter. Exactly one exit sees `CLOSED | 1`, so every
//! waiter is handed out once.
//!
//! The hot path is one compare-and-swap and one decrement on a word no
//! invalidation holds: closing never blocks an entering device, and a
//! device never waits for an invalidation. The loom models in
//! `loom_tests.rs` check the protocol on its own and through the address
//! space.

use crate::sync::{lock, AtomicUsize, Mutex, Ordering};

/// Set once the lease is closed.
const CLOSED: usize = 1;
/// One open access section.
const SECTION: usize = 2;

/// The state of one lease; `W` is what an invalidation waits with.
pub(crate) struct Lease<W> {
    state: AtomicUsize,
    waiters: Mutex<Vec<W>>,
}

/// What [`Lease::close`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Closed {
    /// This call closed the lease (it was open before).
    pub first: bool,
    /// Sections were open: a waiter was registered and is handed out by
    /// the last [`Lease::exit`].
    pub waiting: bool,
}

impl<W> Lease<W> {
    /// An open lease with no section open.
    pub(crate) fn new() -> Self {
        Lease {
            state: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// Opens an access section; false if the lease is closed. Every `true`
    /// must be matched by one [`Lease::exit`].
    pub(crate) fn enter(&self) -> bool {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            if cur & CLOSED != 0 {
                return false;
            }
            // The count is bounded by the number of threads in a section;
            // a wrap would need 2^63 of them.
            match self.state.compare_exchange_weak(
                cur,
                cur + SECTION,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Ends an access section. Returns the waiters to release when this
    /// was the last open section of a closed lease (otherwise an empty
    /// vector, which does not allocate).
    pub(crate) fn exit(&self) -> Vec<W> {
        let prev = self.state.fetch_sub(SECTION, Ordering::AcqRel);
        debug_assert!(prev >= SECTION, "exit without enter");
        if prev == CLOSED | SECTION {
            std::mem::take(&mut *lock(&self.waiters))
        } else {
            Vec::new()
        }
    }

    /// Closes the lease. If sections are open, `waiter()` is registered
    /// and handed out by the last exit; the caller must wait for it.
    pub(crate) fn close(&self, waiter: impl FnOnce() -> W) -> Closed {
        let mut waiters = lock(&self.waiters);
        let prev = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let waiting = prev >= SECTION;
        if waiting {
            waiters.push(waiter());
        }
        Closed {
            first: prev & CLOSED == 0,
            waiting,
        }
    }

    /// Whether the lease is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Number of open access sections (diagnostics).
    pub(crate) fn open_sections(&self) -> usize {
        self.state.load(Ordering::Acquire) / SECTION
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn closing_an_idle_lease_needs_no_wait() {
        let l: Lease<u32> = Lease::new();
        assert!(l.enter());
        assert!(l.exit().is_empty());
        let c = l.close(|| unreachable!("no section is open"));
        assert_eq!(
            c,
            Closed {
                first: true,
                waiting: false
            }
        );
        assert!(!l.enter(), "a closed lease never opens again");
        assert!(l.is_closed());
    }

    #[test]
    fn the_last_exit_hands_out_every_waiter_once() {
        let l: Lease<u32> = Lease::new();
        assert!(l.enter());
        assert!(l.enter());
        assert_eq!(l.open_sections(), 2);
        assert!(l.close(|| 1).waiting);
        let again = l.close(|| 2);
        assert!(!again.first && again.waiting);
        assert!(l.exit().is_empty(), "one section is still open");
        assert_eq!(l.exit(), vec![1, 2]);
        assert_eq!(l.open_sections(), 0);
        assert!(!l.close(|| 3).waiting);
    }
}
