//! Whether polling pays on this host right now.
//!
//! The IOMMU's poller saves each request a VM exit and a thread wake-up,
//! but only while it has a CPU of its own. On a host with no free core,
//! the poller and the vCPU that makes the requests share one: every hand-off
//! from one to the other waits for a scheduler time slice (milliseconds),
//! and a 4 KiB read, six requests, becomes tens of milliseconds. Serving
//! each request on the vCPU that kicked (inline) needs no hand-off at all.
//!
//! So the device serves the kick inline first, and only then wakes the
//! poller for the rest of the burst ([`PollHealth::polling_allowed`]). The
//! poller watches its own loop ([`PreemptionDetector`]): consecutive looks
//! at the ring are microseconds apart while it runs, so a stretch longer
//! than [`PREEMPTED`] between two of them is time it lost its CPU. Losing
//! it now and then is normal (another thread needed the core for a
//! moment); when more than half of [`EVAL_PERIOD`] of polling is lost that
//! way, the poller is sharing its core, and polling backs off: the poller
//! stops, kicks stay on, and the vCPUs serve every request inline until
//! the backoff ends; the next kick after it wakes the poller again, as a
//! probe. A probe that fails again soon doubles the backoff (up to
//! [`MAX_BACKOFF`]); one much later starts again from [`MIN_BACKOFF`],
//! the way KVM's halt-polling window shrinks and grows.
//!
//! Invariant: this only decides where requests are served (which thread),
//! never whether or how: strictness does not depend on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A stretch between two looks at the ring longer than this: the poller
/// was not running (its loop takes microseconds; a time slice is
/// milliseconds).
pub const PREEMPTED: Duration = Duration::from_millis(1);
/// Polling time over which the share lost to preemption is judged.
pub const EVAL_PERIOD: Duration = Duration::from_millis(50);
/// The first backoff.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the vCPU threads read: until when polling is off.
#[derive(Debug)]
pub struct PollHealth {
    base: Instant,
    /// Nanoseconds after `base` before which a kick does not wake the
    /// poller.
    resume_at: AtomicU64,
    /// Backoffs started so far.
    backoffs: AtomicU64,
}

impl PollHealth {
    /// Polling allowed from now on.
    pub fn new() -> Arc<Self> {
        Arc::new(PollHealth {
            base: Instant::now(),
            resume_at: AtomicU64::new(0),
            backoffs: AtomicU64::new(0),
        })
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a kick at `now` should wake the poller.
    pub fn polling_allowed(&self, now: Instant) -> bool {
        self.nanos(now) >= self.resume_at.load(Ordering::Relaxed)
    }

    /// Number of backoffs so far.
    pub fn backoffs(&self) -> u64 {
        self.backoffs.load(Ordering::Relaxed)
    }

    fn back_off_until(&self, until: Instant) {
        self.resume_at.store(self.nanos(until), Ordering::Relaxed);
        self.backoffs.fetch_add(1, Ordering::Relaxed);
    }
}

/// The poller's side: time polled and lost, and the current backoff.
#[derive(Debug)]
pub struct PreemptionDetector {
    health: Arc<PollHealth>,
    /// Polling time since the last judgement...
    polled: Duration,
    /// ...and how much of it the poller was not running.
    lost: Duration,
    /// The backoff the next failed judgement gets.
    backoff: Duration,
    /// When the last backoff started, and how long it was.
    last: Option<(Instant, Duration)>,
    /// The poller's previous look at the ring.
    last_look: Option<Instant>,
}

impl PreemptionDetector {
    /// A detector that reports to `health`.
    pub fn new(health: Arc<PollHealth>) -> Self {
        PreemptionDetector {
            health,
            polled: Duration::ZERO,
            lost: Duration::ZERO,
            backoff: MIN_BACKOFF,
            last: None,
            last_look: None,
        }
    }

    /// Backoffs this device's poller has started so far.
    pub fn backoffs(&self) -> u64 {
        self.health.backoffs()
    }

    /// Whether polling is allowed at `now` (the poller may have been woken
    /// just before a backoff started).
    pub fn polling_allowed(&self, now: Instant) -> bool {
        self.health.polling_allowed(now)
    }

    /// The poller starts polling at `now` (the time asleep before does not
    /// count).
    pub fn start(&mut self, now: Instant) {
        self.last_look = Some(now);
    }

    /// The poller looked at the ring at `now`. Returns true when this
    /// starts a backoff: the poller must stop polling now.
    pub fn looked(&mut self, now: Instant) -> bool {
        let Some(prev) = self.last_look.replace(now) else {
            return false;
        };
        let stretch = now.saturating_duration_since(prev);
        self.polled += stretch;
        if stretch > PREEMPTED {
            self.lost += stretch;
        }
        if self.polled < EVAL_PERIOD {
            return false;
        }
        let sharing = self.lost * 2 > self.polled;
        self.polled = Duration::ZERO;
        self.lost = Duration::ZERO;
        if !sharing {
            return false;
        }
        // Failing again soon after the last backoff ended: the host is
        // still busy, so wait longer before the next probe.
        let again = self.last.is_some_and(|(at, len)| {
            now.saturating_duration_since(at) <= len + Duration::from_secs(1)
        });
        self.backoff = if again {
            (self.backoff * 2).min(MAX_BACKOFF)
        } else {
            MIN_BACKOFF
        };
        self.last = Some((now, self.backoff));
        self.health.back_off_until(now + self.backoff);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);
    const MS: Duration = Duration::from_millis(1);

    /// Looks every `step` from `t` for `n` looks; returns the time after
    /// and whether any look started a backoff.
    fn polls(
        d: &mut PreemptionDetector,
        mut t: Instant,
        step: Duration,
        n: u32,
    ) -> (Instant, bool) {
        let mut backed_off = false;
        for _ in 0..n {
            t += step;
            backed_off |= d.looked(t);
        }
        (t, backed_off)
    }

    /// A poller that runs for `run` and then loses its CPU for `lost`,
    /// `cycles` times; returns the time after and whether it backed off.
    fn sharing(
        d: &mut PreemptionDetector,
        mut t: Instant,
        run: Duration,
        lost: Duration,
        cycles: u32,
    ) -> (Instant, bool) {
        let mut backed_off = false;
        for _ in 0..cycles {
            let (t2, b) = polls(d, t, 5 * US, (run.as_micros() / 5) as u32);
            t = t2 + lost;
            backed_off |= b | d.looked(t);
            if backed_off {
                break;
            }
        }
        (t, backed_off)
    }

    #[test]
    fn a_poller_that_keeps_its_cpu_never_backs_off() {
        let h = PollHealth::new();
        let mut d = PreemptionDetector::new(h.clone());
        let t = Instant::now();
        d.start(t);
        let (t, b) = polls(&mut d, t, 5 * US, 200_000);
        assert!(!b);
        assert!(h.polling_allowed(t));
        assert_eq!(h.backoffs(), 0);
    }

    #[test]
    fn losing_the_cpu_now_and_then_is_not_sharing_it() {
        // 4 ms lost every 20 ms of running: 17% of the time.
        let h = PollHealth::new();
        let mut d = PreemptionDetector::new(h.clone());
        let t = Instant::now();
        d.start(t);
        let (_, b) = sharing(&mut d, t, 20 * MS, 4 * MS, 100);
        assert!(!b);
        assert_eq!(h.backoffs(), 0);
    }

    #[test]
    fn sharing_the_cpu_backs_off_and_failed_probes_double_the_backoff() {
        // Time slices of 4 ms taken turn about with another thread.
        let h = PollHealth::new();
        let mut d = PreemptionDetector::new(h.clone());
        let t = Instant::now();
        d.start(t);
        let (t, b) = sharing(&mut d, t, 4 * MS, 4 * MS, 100);
        assert!(b, "half the time lost and more backs off");
        assert!(!h.polling_allowed(t + MIN_BACKOFF / 2));
        assert!(h.polling_allowed(t + MIN_BACKOFF));
        // The probe after the backoff fails at once: twice as long.
        let t2 = t + MIN_BACKOFF;
        d.start(t2);
        let (t2, b) = sharing(&mut d, t2, 4 * MS, 4 * MS, 100);
        assert!(b);
        assert!(!h.polling_allowed(t2 + MIN_BACKOFF));
        assert!(h.polling_allowed(t2 + 2 * MIN_BACKOFF));
        assert_eq!(h.backoffs(), 2);
        // Much later, a new failure starts from the minimum again.
        let t3 = t2 + Duration::from_secs(30);
        d.start(t3);
        let (t3, b) = sharing(&mut d, t3, 4 * MS, 4 * MS, 100);
        assert!(b);
        assert!(h.polling_allowed(t3 + MIN_BACKOFF));
    }

    #[test]
    fn the_backoff_stops_growing_at_its_maximum() {
        let h = PollHealth::new();
        let mut d = PreemptionDetector::new(h.clone());
        let mut t = Instant::now();
        for _ in 0..20 {
            d.start(t);
            let (t2, b) = sharing(&mut d, t, 2 * MS, 8 * MS, 100);
            assert!(b);
            t = t2;
            // Probe as soon as the backoff ends.
            while !h.polling_allowed(t) {
                t += 50 * MS;
            }
        }
        assert_eq!(d.backoff, MAX_BACKOFF);
    }

    #[test]
    fn time_asleep_before_polling_is_not_lost() {
        let h = PollHealth::new();
        let mut d = PreemptionDetector::new(h.clone());
        let mut t = Instant::now();
        for _ in 0..1000 {
            t += Duration::from_secs(1);
            d.start(t);
            let (t2, b) = polls(&mut d, t, 5 * US, 100);
            assert!(!b);
            t = t2;
        }
        assert_eq!(h.backoffs(), 0);
    }
}
