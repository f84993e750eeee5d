//! Idle-priority polling with a starvation guard.
//!
//! A device thread that polls a ring while nothing arrives should use only
//! CPU time nobody else wants. Under `SCHED_IDLE` it does: the thread runs
//! only on a CPU with nothing else to run, is preempted at once when a
//! normal thread wakes there, and the scheduler counts its CPU as idle when
//! it places a waking thread. So the threads the guest is actually waiting
//! for (a block thread starting I/O, a vCPU taking an interrupt) never
//! queue behind the poller.
//!
//! The catch: when every CPU is busy with normal threads, an idle-priority
//! thread gets almost nothing (measured on this kind of host: runs three
//! times in three seconds, gaps up to 1.4 s), and a guest spinning for an
//! IOMMU reply would spin that long. So a [`IdlePoller`] comes with a
//! watchdog thread at normal priority that, while the poller is at idle
//! priority, checks every [`WATCHDOG_PERIOD`] that the poller's loop made
//! progress, and if it did not, moves it back to normal priority until the
//! poller has served a request. A starved poller thus waits at most about
//! two periods, like a normal thread sharing a CPU.
//!
//! Opt-in (`--iommu idle_poll=on`): on the nested test bed it lowered the
//! poller's cost for other threads but not the strict-mode latency ratio
//! (see integration/README.md).
//!
//! Linux lets a thread leave `SCHED_IDLE` only with `CAP_SYS_NICE` or an
//! `RLIMIT_NICE` that allows its nice value; without either the poller
//! could never come back, so it then polls at normal priority throughout.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::lock;

/// How often the watchdog checks an idle-priority poller's progress.
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(10);

/// The poller runs at normal priority.
const NORMAL: u8 = 0;
/// The poller runs at idle priority; the watchdog is watching.
const IDLE: u8 = 1;
/// The watchdog found the poller starved and moved it back to normal
/// priority; it stays there until it next serves a request.
const BOOSTED: u8 = 2;

struct Shared {
    state: AtomicU8,
    /// Poll loop iterations, the poller's heartbeat.
    beats: AtomicU64,
    /// The poller's thread ID.
    tid: i32,
    /// Times the watchdog had to step in.
    boosts: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn new(tid: i32) -> Arc<Self> {
        Arc::new(Shared {
            state: AtomicU8::new(NORMAL),
            beats: AtomicU64::new(0),
            tid,
            boosts: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        })
    }
}

/// The polling thread's side: switches the calling thread between normal
/// and idle priority, with a watchdog against starvation.
pub struct IdlePoller {
    shared: Arc<Shared>,
    enabled: bool,
    watchdog: Option<JoinHandle<()>>,
}

fn set_policy(tid: i32, idle: bool) -> std::io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for both policies (whose only
    // priority is 0); `tid` is a thread of this process (0: the caller).
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl IdlePoller {
    /// Sets up idle-priority polling for the calling thread (the poller),
    /// with its watchdog thread, if the thread could come back from
    /// `SCHED_IDLE`; otherwise every call is a no-op.
    pub fn new() -> Self {
        // SAFETY: gettid has no preconditions.
        let shared = Shared::new(unsafe { libc::gettid() });
        let mut enabled = can_leave_sched_idle();
        let mut watchdog = None;
        if enabled {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name("iommu-watchdog".into())
                .spawn(move || {
                    watch(&s);
                    crate::trace::thread_exit();
                }) {
                Ok(h) => watchdog = Some(h),
                Err(e) => {
                    log::warn!("virtio-iommu: watchdog thread: {e}; polling at normal priority");
                    enabled = false;
                }
            }
        } else {
            log::info!(
                "virtio-iommu: polling at normal priority (leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE)"
            );
        }
        IdlePoller {
            shared,
            enabled,
            watchdog,
        }
    }

    /// A poller that stays at normal priority (for a thread that does not
    /// poll): no watchdog thread.
    pub fn disabled() -> Self {
        IdlePoller {
            shared: Shared::new(0),
            enabled: false,
            watchdog: None,
        }
    }

    /// Whether idle-priority polling is used at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the poller currently runs at idle priority.
    pub fn is_idle(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == IDLE
    }

    /// Times the watchdog found the poller starved.
    pub fn boosts(&self) -> u64 {
        self.shared.boosts.load(Ordering::Relaxed)
    }

    /// One iteration of the poll loop: the heartbeat the watchdog checks
    /// (nothing to count without one).
    pub fn beat(&self) {
        if self.enabled {
            self.shared.beats.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The poller served requests. After the watchdog stepped in, this is
    /// where the poller may later go idle again: each starvation costs at
    /// most one request about two watchdog periods.
    pub fn served(&mut self) {
        let _ = self.shared.state.compare_exchange(
            BOOSTED,
            NORMAL,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// The ring has been quiet for a while: poll on at idle priority,
    /// unless the watchdog stepped in and no request was served since.
    ///
    /// The state changes before the policy here and after it in
    /// [`IdlePoller::leave_idle`], so that the watchdog is watching
    /// whenever the thread may be at idle priority.
    pub fn enter_idle(&mut self) {
        if !self.enabled || self.shared.state.load(Ordering::Acquire) != NORMAL {
            return;
        }
        self.shared.state.store(IDLE, Ordering::Release);
        {
            let _g = lock(&self.shared.stop);
            self.shared.wake.notify_one();
        }
        if let Err(e) = set_policy(0, true) {
            self.shared.state.store(NORMAL, Ordering::Release);
            self.disable(e);
        }
    }

    /// The poller is about to sleep: back to normal priority, so that its
    /// wake-up (the one a guest is spinning for) is not at idle priority.
    pub fn leave_idle(&mut self) {
        if !self.enabled {
            return;
        }
        // BOOSTED: the watchdog already moved the thread back.
        if self.shared.state.load(Ordering::Acquire) == IDLE {
            if let Err(e) = set_policy(0, false) {
                self.disable(e);
                return;
            }
        }
        self.shared.state.store(NORMAL, Ordering::Release);
    }

    fn disable(&mut self, e: std::io::Error) {
        self.enabled = false;
        log::warn!("virtio-iommu: sched_setscheduler: {e}; idle-priority polling off");
    }
}

impl Default for IdlePoller {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for IdlePoller {
    fn drop(&mut self) {
        let boosts = self.boosts();
        if boosts > 0 {
            log::info!(
                "virtio-iommu: the watchdog moved a starved poller back to normal priority {boosts} times"
            );
        }
        *lock(&self.shared.stop) = true;
        self.shared.wake.notify_one();
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
    }
}

/// The watchdog: sleeps while the poller is at normal priority; otherwise
/// moves it to normal priority whenever a period passes without a
/// heartbeat (again if need be: the poller may have set itself idle just
/// after a boost).
fn watch(s: &Shared) {
    let mut stop = lock(&s.stop);
    loop {
        while !*stop && s.state.load(Ordering::Acquire) == NORMAL {
            stop = s.wake.wait(stop).unwrap_or_else(|e| e.into_inner());
        }
        if *stop {
            return;
        }
        let before = s.beats.load(Ordering::Relaxed);
        stop = s
            .wake
            .wait_timeout(stop, WATCHDOG_PERIOD)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *stop {
            return;
        }
        if s.beats.load(Ordering::Relaxed) != before || s.state.load(Ordering::Acquire) == NORMAL {
            continue;
        }
        // Policy first: BOOSTED must imply normal priority.
        if let Err(e) = set_policy(s.tid, false) {
            log::warn!("virtio-iommu: watchdog: sched_setscheduler: {e}");
        }
        if s.state
            .compare_exchange(IDLE, BOOSTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            s.boosts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether the calling thread may switch from `SCHED_IDLE` back to
/// `SCHED_OTHER`: it has `CAP_SYS_NICE`, or `RLIMIT_NICE` permits its nice
/// value (the kernel's `can_nice`: `20 - nice <= RLIMIT_NICE`).
pub fn can_leave_sched_idle() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let cap_eff = crate::procfs::status_field(&status, "CapEff")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_NICE) != 0 {
        return true;
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let nice: i64 = crate::procfs::stat_field(&stat, 19)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } != 0 {
        return false;
    }
    lim.rlim_cur == libc::RLIM_INFINITY || (20 - nice) as u64 <= lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    /// The calling thread's scheduling policy.
    fn policy() -> i32 {
        // SAFETY: no preconditions; pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// The lowest CPU this process may run on.
    fn first_allowed_cpu() -> usize {
        // SAFETY: a zeroed cpu_set_t is valid for sched_getaffinity to
        // fill; CPU_ISSET stays in bounds.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &set))
                .expect("no CPU allowed")
        }
    }

    /// Pins the calling thread to `cpu`.
    fn pin_to(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
    }

    fn skip_without_permission() -> bool {
        if can_leave_sched_idle() {
            return false;
        }
        eprintln!("SKIP: no CAP_SYS_NICE or RLIMIT_NICE: idle-priority polling is off here");
        true
    }

    #[test]
    fn poller_moves_to_idle_and_back() {
        if skip_without_permission() {
            return;
        }
        // A thread of its own: the policy must not leak into other tests.
        std::thread::spawn(|| {
            assert_eq!(policy(), libc::SCHED_OTHER);
            let mut p = IdlePoller::new();
            assert!(p.enabled());
            p.enter_idle();
            assert!(p.is_idle());
            assert_eq!(policy(), libc::SCHED_IDLE);
            p.enter_idle();
            assert_eq!(policy(), libc::SCHED_IDLE);
            p.leave_idle();
            assert!(!p.is_idle());
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    /// The starvation the watchdog exists for: an idle-priority poller
    /// pinned to the same CPU as a busy normal thread gets no CPU time
    /// until the watchdog moves it back to normal priority.
    #[test]
    fn watchdog_rescues_a_starved_poller() {
        if skip_without_permission() {
            return;
        }
        let cpu = first_allowed_cpu();
        let spin = Arc::new(AtomicBool::new(true));
        let hog_done = Arc::new(AtomicBool::new(false));
        let hog = {
            let (spin, done) = (spin.clone(), hog_done.clone());
            std::thread::spawn(move || {
                pin_to(cpu);
                while spin.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                done.store(true, Ordering::Release);
            })
        };
        let spin2 = spin.clone();
        let poller = std::thread::spawn(move || {
            pin_to(cpu);
            let mut p = IdlePoller::new();
            p.enter_idle();
            // Poll for at least 300 ms and until boosted (at most 2 s);
            // record the longest gap between iterations.
            let start = Instant::now();
            let mut last = start;
            let mut longest = Duration::ZERO;
            while start.elapsed() < Duration::from_millis(300) || p.is_idle() {
                p.beat();
                let now = Instant::now();
                longest = longest.max(now - last);
                last = now;
                if start.elapsed() > Duration::from_secs(2) {
                    break;
                }
                std::hint::spin_loop();
            }
            let (boosts, still_idle, pol) = (p.boosts(), p.is_idle(), policy());
            // Without the hog: boosted, the poller stays at normal priority
            // until it serves a request; then it may go idle again. (The
            // heartbeat keeps the watchdog from stepping in meanwhile.)
            spin2.store(false, Ordering::Relaxed);
            while !hog_done.load(Ordering::Acquire) {
                p.beat();
                std::thread::yield_now();
            }
            p.beat();
            p.enter_idle();
            let idle_before_serving = p.is_idle();
            p.served();
            p.enter_idle();
            let idle_after_serving = p.is_idle();
            p.leave_idle();
            assert!(!idle_before_serving, "went idle again before serving");
            assert!(idle_after_serving, "never idle again");
            (boosts, still_idle, pol, longest)
        });
        let (boosts, still_idle, pol, longest) = poller.join().unwrap();
        spin.store(false, Ordering::Relaxed);
        hog.join().unwrap();
        assert!(boosts >= 1, "the watchdog never stepped in");
        assert!(!still_idle, "still at idle priority after 2 s");
        assert_eq!(pol, libc::SCHED_OTHER);
        // Bounded: a few periods and a time slice, not the seconds an idle
        // thread waits behind a busy one.
        assert!(
            longest < Duration::from_millis(200),
            "longest gap {longest:?}"
        );
    }
}
