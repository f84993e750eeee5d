//! Holding every vCPU outside `KVM_RUN` for a short critical section.
//!
//! A fence (`crate::fence`) replaces guest pages while no vCPU can touch
//! them: the holder asks, kicks each vCPU thread out of `KVM_RUN` with the
//! VMM's kick signal, and waits until every vCPU has parked at its
//! checkpoint (the top of its run loop, before it enters the guest again).
//! The section ends when the [`Held`] guard is dropped.
//!
//! # Invariant
//!
//! While a [`Held`] lives, no registered vCPU is inside `KVM_RUN` or handling
//! an exit: each is parked in [`VcpuSlot::checkpoint`] or its thread has
//! ended. A vCPU checks for a request before each `KVM_RUN`; a kick sent
//! just before it enters the ioctl can be lost (the signal handler does
//! nothing), so the holder kicks again every millisecond until all have
//! parked, and gives up after its timeout (a vCPU blocked in an exit
//! handler), releasing the ones that did park.
//!
//! Only one holder at a time (holders queue on a mutex). A vCPU never
//! waits for anything but the holder's guard, which the holder drops after
//! a bounded copy: vCPUs are held for the copy and remap only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a holder kicks the vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Default)]
struct State {
    /// A holder wants (or has) the vCPUs parked.
    held: bool,
    /// vCPUs registered and not ended.
    live: usize,
    /// Of those, how many parked at their checkpoint for the current hold
    /// (reset when it ends: a vCPU it released counts again only once it
    /// parks for the next one).
    parked: usize,
    /// Holds ended so far: a vCPU released by one hold runs before the
    /// next one parks it again.
    released: u64,
    /// Threads of the live vCPUs, for the kick.
    threads: Vec<(u64, libc::pthread_t)>,
    next_id: u64,
}

/// The vCPUs' hold point; see the [module documentation](self).
pub struct VcpuHold {
    state: Mutex<State>,
    cv: Condvar,
    /// Mirrors `State::held`, read by the vCPUs before each `KVM_RUN`.
    requested: AtomicBool,
    /// One holder at a time.
    holder: Mutex<()>,
    /// The signal that interrupts `KVM_RUN` (its handler does nothing).
    kick: libc::c_int,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuHold {
    /// A hold point whose kick is `signal` (a handler must be installed
    /// for it, or the kick kills the process).
    pub fn new(signal: libc::c_int) -> Arc<Self> {
        Arc::new(VcpuHold {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            requested: AtomicBool::new(false),
            holder: Mutex::new(()),
            kick: signal,
        })
    }

    /// Registers the calling thread as a vCPU; it calls
    /// [`VcpuSlot::checkpoint`] before each `KVM_RUN` and drops the slot
    /// when it ends.
    pub fn register(self: &Arc<Self>) -> VcpuSlot {
        let mut st = lock(&self.state);
        let id = st.next_id;
        st.next_id += 1;
        st.live += 1;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        st.threads.push((id, me));
        VcpuSlot {
            hold: self.clone(),
            id,
        }
    }

    /// Parks every registered vCPU; fails after `timeout` if one does not
    /// reach its checkpoint (the others resume).
    pub fn hold(&self, timeout: Duration) -> Result<Held<'_>, String> {
        let only_one = lock(&self.holder);
        let start = Instant::now();
        let mut st = lock(&self.state);
        st.held = true;
        self.requested.store(true, Ordering::SeqCst);
        while st.parked < st.live {
            if start.elapsed() >= timeout {
                let (parked, live) = (st.parked, st.live);
                drop(st);
                self.release();
                return Err(format!(
                    "{} of {live} vCPUs did not stop within {timeout:?} ({parked} did)",
                    live - parked
                ));
            }
            for &(_, t) in &st.threads {
                // SAFETY: `t` is a live thread: a vCPU removes itself from
                // `threads` (under this lock) before its thread ends.
                unsafe { libc::pthread_kill(t, self.kick) };
            }
            st = self
                .cv
                .wait_timeout(st, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(Held {
            hold: self,
            _only_one: only_one,
            took: start.elapsed(),
        })
    }

    fn release(&self) {
        let mut st = lock(&self.state);
        st.held = false;
        st.released += 1;
        st.parked = 0;
        self.requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// A vCPU thread's registration; see [`VcpuHold::register`].
pub struct VcpuSlot {
    hold: Arc<VcpuHold>,
    id: u64,
}

impl VcpuSlot {
    /// Parks here while a holder holds the vCPUs (called before each
    /// `KVM_RUN`; costs one atomic load otherwise).
    pub fn checkpoint(&self) {
        if !self.hold.requested.load(Ordering::SeqCst) {
            return;
        }
        let h = &self.hold;
        let mut st = lock(&h.state);
        if !st.held {
            return;
        }
        st.parked += 1;
        h.cv.notify_all();
        let hold = st.released;
        while st.held && st.released == hold {
            st = h.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for VcpuSlot {
    fn drop(&mut self) {
        let h = &self.hold;
        let mut st = lock(&h.state);
        st.live -= 1;
        st.threads.retain(|&(id, _)| id != self.id);
        h.cv.notify_all();
    }
}

/// vCPUs held; dropping it lets them run.
pub struct Held<'a> {
    hold: &'a VcpuHold,
    _only_one: MutexGuard<'a, ()>,
    took: Duration,
}

impl Held<'_> {
    /// How long the vCPUs took to stop.
    pub fn took(&self) -> Duration {
        self.took
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.hold.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::thread;

    use super::*;

    extern "C" fn noop(_: libc::c_int) {}

    fn signal() -> libc::c_int {
        let sig = libc::SIGRTMIN() + 1;
        // SAFETY: installs a handler that does nothing.
        unsafe { libc::signal(sig, noop as *const () as libc::sighandler_t) };
        sig
    }

    /// Threads standing in for vCPUs: each counts "guest" steps between
    /// checkpoints, and blocks in a sleep (as a vCPU blocks in KVM_RUN)
    /// until the kick interrupts it.
    fn vcpus(hold: &Arc<VcpuHold>, n: usize, stop: &Arc<AtomicBool>) -> Vec<Arc<AtomicU64>> {
        (0..n)
            .map(|_| {
                let steps = Arc::new(AtomicU64::new(0));
                let (hold, stop, s) = (hold.clone(), stop.clone(), steps.clone());
                thread::spawn(move || {
                    let slot = hold.register();
                    while !stop.load(Ordering::SeqCst) {
                        slot.checkpoint();
                        s.fetch_add(1, Ordering::SeqCst);
                        // Interrupted early by the kick (EINTR).
                        // SAFETY: plain nanosleep on a local timespec.
                        unsafe {
                            let ts = libc::timespec {
                                tv_sec: 5,
                                tv_nsec: 0,
                            };
                            libc::nanosleep(&ts, std::ptr::null_mut());
                        }
                    }
                });
                steps
            })
            .collect()
    }

    #[test]
    fn held_vcpus_make_no_step_until_released() {
        let hold = VcpuHold::new(signal());
        let stop = Arc::new(AtomicBool::new(false));
        let steps = vcpus(&hold, 2, &stop);
        while lock(&hold.state).live < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..20 {
            let held = hold.hold(Duration::from_secs(5)).expect("vCPUs stop");
            let at: Vec<u64> = steps.iter().map(|s| s.load(Ordering::SeqCst)).collect();
            thread::sleep(Duration::from_millis(5));
            let now: Vec<u64> = steps.iter().map(|s| s.load(Ordering::SeqCst)).collect();
            assert_eq!(at, now, "a held vCPU ran");
            drop(held);
        }
        // Released: they run again (each kick of the next hold is a step).
        let before = steps[0].load(Ordering::SeqCst);
        drop(hold.hold(Duration::from_secs(5)).unwrap());
        drop(hold.hold(Duration::from_secs(5)).unwrap());
        assert!(steps[0].load(Ordering::SeqCst) > before);
        stop.store(true, Ordering::SeqCst);
        drop(hold.hold(Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn a_vcpu_that_never_comes_back_fails_the_hold_and_the_others_resume() {
        let hold = VcpuHold::new(signal());
        let stop = Arc::new(AtomicBool::new(false));
        let steps = vcpus(&hold, 1, &stop);
        // A registered vCPU stuck outside its checkpoint (an exit handler
        // that blocks): its thread ignores kicks.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let stuck = {
            let hold = hold.clone();
            thread::spawn(move || {
                let _slot = hold.register();
                let _ = rx.recv();
            })
        };
        while lock(&hold.state).live < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        let e = hold.hold(Duration::from_millis(50)).err().expect("fails");
        assert!(e.contains("1 of 2 vCPUs did not stop"), "{e}");
        // The stuck one leaves; holds work again, and the vCPU runs
        // between them.
        drop(tx);
        stuck.join().unwrap();
        let before = steps[0].load(Ordering::SeqCst);
        drop(hold.hold(Duration::from_secs(5)).unwrap());
        drop(hold.hold(Duration::from_secs(5)).unwrap());
        assert!(steps[0].load(Ordering::SeqCst) > before);
        stop.store(true, Ordering::SeqCst);
        drop(hold.hold(Duration::from_secs(5)).unwrap());
    }
}
