//! Drains: an invalidation waiting for the DMA it removed.
//!
//! A [`Drain`] counts what still holds the removed translation: one for
//! every pin the tracker's scan collected (`Drain::add_blocker`), one for
//! every closed lease whose access sections were open (`Drain::hold`),
//! and one for the scan itself, dropped by `Drain::arm` when the scan
//! is over, so that the drain cannot complete while pins are still being
//! collected. Each release (`Drain::release_one`) decrements the count;
//! the release that reaches zero completes the drain: it records the
//! time, wakes the waiters and writes the notifier eventfd once.
//!
//! # Invariant
//!
//! A drain is complete only when every pin and lease section that held
//! the removed translation when the invalidation ran has been released:
//! the count starts at one, every collected holder adds one before the
//! scan ends, and only `Drain::arm` and the holders' releases take one
//! away. The invalidation's reply is published only once the drain is
//! complete (`crate::engine`).
//!
//! [`Drain::revoke`] asks the pins still held to end early (their revoke
//! hooks, each called at most once); it does not complete the drain.
//! `Drain::claim_fence` hands the pins still held to a fence
//! (`crate::fence`), once per drain; a fenced pin releases the drain when
//! the fence completes, not before.
//! The tracker (`crate::tracker`) decides what a drain waits for; this
//! module only counts, waits and revokes, through `Revocable`.

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::sync::{lock, Arc, AtomicUsize, Condvar, Mutex, Ordering};

/// A pin a drain waits for, which can be asked to end early or be fenced.
pub(crate) trait Revocable: Send + Sync {
    /// Calls the pin's revoke hook if it is still held and was not asked
    /// before; true if a hook was called.
    fn revoke(&self) -> bool;
    /// Claims the pin for a fence: the guest-physical ranges (address,
    /// length) its DMA may still write, if it is still held, was made
    /// revocable and no other fence claimed it. A claimed pin keeps
    /// holding every drain it holds.
    fn claim_fence(&self) -> Option<Vec<(u64, u64)>>;
    /// The claimed pin's pages are fenced: it stops holding any drain.
    fn fence_done(&self);
    /// The fence of the claimed pin failed: the claim ends, the pin keeps
    /// holding its drains.
    fn fence_failed(&self);
}

/// A pin claimed for a fence, with the ranges it covers.
pub(crate) type FenceClaim = (std::sync::Arc<dyn Revocable>, Vec<(u64, u64)>);

/// One invalidation waiting for in-flight DMA.
///
/// The count starts at one for the registration itself; `Drain::arm`
/// drops that reference once every overlapping pin has been collected, so
/// the drain cannot complete while collection is still running.
pub struct Drain {
    remaining: AtomicUsize,
    done: Mutex<bool>,
    cv: Condvar,
    notifier: Option<Arc<EventFd>>,
    /// The pins collected (a plain `Arc`: the list is not part of the
    /// protocol the loom models check, and loom's `Arc` holds no trait
    /// object).
    blockers: Mutex<Vec<std::sync::Arc<dyn Revocable>>>,
    started: Instant,
    finished: std::sync::Mutex<Option<Instant>>,
    /// Whether its pins were handed to a fence, and when a failed fence
    /// is tried again (not part of the protocol the loom models check: it
    /// only keeps a drain from being fenced twice at once).
    fence: std::sync::Mutex<FenceClaimState>,
}

/// A drain's standing with fences.
#[derive(Debug, Default)]
struct FenceClaimState {
    /// A fence holds its pins (or found none it could fence).
    claimed: bool,
    /// Fences of its pins that failed.
    failures: u32,
    /// When the next fence may be tried, after a failure.
    retry_at: Option<Instant>,
}

/// The longest wait before a failed fence is tried again.
const FENCE_RETRY_MAX: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drain {
    /// A new drain; `notifier` is written once when it completes.
    pub(crate) fn new(notifier: Option<Arc<EventFd>>) -> Arc<Drain> {
        Arc::new(Drain {
            remaining: AtomicUsize::new(1),
            done: Mutex::new(false),
            cv: Condvar::new(),
            notifier,
            blockers: Mutex::new(Vec::new()),
            started: Instant::now(),
            finished: std::sync::Mutex::new(None),
            fence: std::sync::Mutex::new(FenceClaimState::default()),
        })
    }

    /// Makes the drain wait for one more release (a closed lease's open
    /// sections), released with [`Drain::release_one`].
    pub(crate) fn hold(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// Makes the drain wait for one more pin, released with
    /// [`Drain::release_one`]; `pin` is asked to end early by
    /// [`Drain::revoke`].
    pub(crate) fn add_blocker(&self, pin: std::sync::Arc<dyn Revocable>) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
        lock(&self.blockers).push(pin);
    }

    /// Ends collection. Returns true when no pin blocks the drain.
    pub(crate) fn arm(&self) -> bool {
        // Completing here needs no wake-up: the caller sees the result.
        self.release(false)
    }

    /// Number of pins collected (whether released or not).
    pub fn blockers(&self) -> usize {
        lock(&self.blockers).len()
    }

    /// Releases one pin or lease hold; true if that completed the drain.
    pub(crate) fn release_one(&self) -> bool {
        self.release(true)
    }

    fn release(&self, notify: bool) -> bool {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return false;
        }
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        *lock(&self.done) = true;
        self.cv.notify_all();
        if let (Some(n), true) = (&self.notifier, notify) {
            // An eventfd write only fails when the counter would overflow,
            // which means a wake-up is already pending.
            let _ = n.write(1);
        }
        true
    }

    /// Pins and lease holds still waited for (model checks: a release
    /// counted twice would wrap it around).
    #[cfg(loom)]
    pub(crate) fn remaining(&self) -> usize {
        self.remaining.load(Ordering::Acquire)
    }

    /// Whether every collected pin has been released.
    pub fn is_complete(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// When the drain started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// How long the drain took, once complete.
    pub fn wait_time(&self) -> Option<Duration> {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.duration_since(self.started))
    }

    /// Blocks until the drain completes.
    pub fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the drain completes or `timeout` passes; true if complete.
    #[cfg(not(loom))]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = lock(&self.done);
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = self
                .cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Calls the revoke hook of every pin that still blocks this drain (each
    /// hook at most once per pin). Returns how many hooks were called.
    ///
    /// The reply still waits for the pins to be released: revocation only
    /// asks their holders to finish early.
    pub fn revoke(&self) -> usize {
        // Copied out: a hook may release its pin, which takes no lock of
        // this drain but must not find the list locked by its caller.
        let pending: Vec<std::sync::Arc<dyn Revocable>> = lock(&self.blockers).clone();
        pending.iter().filter(|pin| pin.revoke()).count()
    }

    /// Whether this drain's pins were handed to a fence.
    pub fn fence_claimed(&self) -> bool {
        self.fence_state().claimed
    }

    /// When a fence of this drain's pins may be tried again after one
    /// failed (`None`: none failed).
    pub fn fence_retry_at(&self) -> Option<Instant> {
        self.fence_state().retry_at
    }

    fn fence_state(&self) -> std::sync::MutexGuard<'_, FenceClaimState> {
        self.fence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims every pin that still blocks it and can be fenced (see
    /// `crate::fence`); `None` if a fence holds this drain already. A
    /// drain is claimed once, unless the fence fails
    /// ([`Drain::fence_failed`]).
    pub(crate) fn claim_fence(&self) -> Option<Vec<FenceClaim>> {
        {
            let mut st = self.fence_state();
            if st.claimed {
                return None;
            }
            st.claimed = true;
        }
        let pending: Vec<std::sync::Arc<dyn Revocable>> = lock(&self.blockers).clone();
        Some(
            pending
                .into_iter()
                .filter_map(|pin| pin.claim_fence().map(|ranges| (pin, ranges)))
                .collect(),
        )
    }

    /// The fence that claimed this drain failed: it may be claimed again
    /// from `base` after now, twice as long after each further failure
    /// (at most [`FENCE_RETRY_MAX`]), so that a VMM that cannot fence
    /// (its vCPUs do not stop) does not hold them again at once.
    pub(crate) fn fence_failed(&self, base: Duration) {
        let mut st = self.fence_state();
        st.claimed = false;
        st.failures = st.failures.saturating_add(1);
        let factor = 1u32 << (st.failures - 1).min(10);
        let wait = base.saturating_mul(factor).min(FENCE_RETRY_MAX);
        st.retry_at = Some(Instant::now() + wait);
    }
}

/// Blocks until `drain` completes, revoking the blockers after `grace`.
/// For VMM code that prefers a blocking wait to the event-driven path.
#[cfg(not(loom))]
pub fn wait_with_grace(drain: &Drain, grace: Duration) {
    if !drain.wait_timeout(grace) {
        drain.revoke();
        drain.wait();
    }
}
