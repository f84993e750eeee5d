//! One request queue of a virtio-blk device at work: its queue thread
//! pops and parses chains inside ring-lease sections and runs the requests
//! through its io_uring (`uring.rs`), or hands them to the device's
//! workers when io_uring is unavailable; whoever completes a request
//! publishes its used entry.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use virtio_iommu::{EndpointHandle, QueueAreas};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::request::{parse, Buffers, Request};
use super::uring::{Finish, UringQueue};
use crate::virtio::{lock, VirtioInterrupt};

/// How the device reaches its rings.
pub(super) enum Rings {
    /// Guest-physical addresses (`iommu=off`).
    Direct,
    /// IOVAs, through a lease on their translation (`iommu=on`).
    Leased(QueueAreas),
}

/// Runs `$body` with `$mem` bound to the memory the rings are accessed
/// through: guest-physical memory, or an access section on the leased
/// areas. `None` when the lease was revoked (the queue is stopped).
macro_rules! with_rings {
    ($run:expr, $mem:ident => $body:expr) => {
        match &$run.rings {
            Rings::Direct => {
                let $mem = &$run.phys;
                Some($body)
            }
            Rings::Leased(areas) => areas.memory(&$run.phys).map(|section| {
                let $mem = &section;
                $body
            }),
        }
    };
}

/// One running queue of the device: the queue, its rings, the memory and
/// the interrupt. Each queue has its own ring lease; the backend, the
/// workers and the stop flag are the device's.
pub(super) struct Running {
    /// Queue index (for its interrupt).
    pub index: u16,
    pub backend: Arc<Backend>,
    /// Guest-physical memory, for host pointers of pinned buffers.
    pub phys: GuestMemoryMmap,
    pub rings: Rings,
    pub endpoint: Option<EndpointHandle>,
    pub queue: Mutex<Queue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver reset the device: finish what is held, publish nothing.
    pub stopping: Arc<AtomicBool>,
    /// Written when a request of this queue is cancelled (io_uring only).
    pub cancel_waker: Option<Arc<EventFd>>,
}

/// A request for the workers, with the queue it came from.
pub(super) type Job = (Arc<Running>, Request);

/// How a queue runs its requests' I/O.
pub(super) enum Engine {
    /// Its own io_uring, driven by the queue thread.
    Uring(Box<UringQueue>),
    /// The device's worker threads (no io_uring here, or
    /// `_disable_io_uring=on`); a lone request runs on the queue thread.
    Workers(Sender<Job>),
}

/// What one pass over the available ring found.
#[derive(Default)]
struct Popped {
    requests: Vec<Request>,
    /// Chains given back unused (their used entries need an interrupt).
    returned: bool,
    /// More buffers arrived while notifications were re-enabled.
    more: bool,
}

impl Running {
    /// Records a block event for `head`, tagged with whether the disk is
    /// behind the IOMMU.
    fn trace(&self, event: crate::trace::Event, arg: u64) {
        let tag = match self.rings {
            Rings::Direct => 0,
            Rings::Leased(_) => crate::trace::BLK_IOMMU,
        };
        crate::trace::record(event, tag | arg);
    }

    /// Pops and parses every available chain, inside one access section:
    /// only ring accesses and pinning happen here, never I/O.
    fn pop_all<G: GuestMemory>(&self, q: &mut Queue, mem: &G) -> Popped {
        let mut p = Popped::default();
        if let Err(e) = q.disable_notification(mem) {
            log::warn!("virtio-blk: {e}");
            return p;
        }
        let bufs = Buffers {
            phys: &self.phys,
            endpoint: self.endpoint.as_ref(),
            cancel_waker: self.cancel_waker.as_ref(),
        };
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            self.trace(
                crate::trace::Event::BlkPopped,
                u64::from(chain.head_index()),
            );
            match parse(chain, &bufs, self.backend.geometry()) {
                Ok(req) => {
                    self.trace(crate::trace::Event::BlkQueued, u64::from(req.head));
                    p.requests.push(req);
                }
                Err((head, e)) => {
                    // Guest-caused: keep the log bounded.
                    let n = self.backend.parse_errors.fetch_add(1, Ordering::Relaxed);
                    if n < 3 || n.is_power_of_two() {
                        log::warn!("virtio-blk: chain {head}: {e:?} ({} so far)", n + 1);
                    }
                    // Nothing of the chain is used; give it back.
                    if q.add_used(mem, head, 0).is_ok() {
                        p.returned = true;
                    }
                }
            }
        }
        if p.returned && q.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.index);
            p.returned = false;
        }
        p.more = match q.enable_notification(mem) {
            Ok(more) => more,
            Err(e) => {
                log::warn!("virtio-blk: {e}");
                false
            }
        };
        p
    }

    /// Pops every available chain and starts the requests: on the io_uring
    /// (completions already posted are reaped at once: a read served from
    /// the page cache completes during the submit), or on the workers, or,
    /// for a lone request on an idle device, right here.
    ///
    /// A lone request (queue depth 1) gains nothing from a worker but pays
    /// a thread wake-up before its I/O starts; running it on this thread
    /// saves that. The ring's notifications are back on while it runs, so
    /// requests made available meanwhile are kicked and popped next.
    fn drain_queue(self: &Arc<Self>, engine: &mut Engine) {
        loop {
            let popped = {
                let mut q = lock(&self.queue);
                with_rings!(self, mem => self.pop_all(&mut q, mem))
            };
            // A revoked ring: the device stopped (NEEDS_RESET is raised).
            let Some(Popped { requests, more, .. }) = popped else {
                return;
            };
            let inline =
                requests.len() == 1 && !more && self.backend.in_flight.load(Ordering::Acquire) == 0;
            for req in requests {
                self.backend.in_flight.fetch_add(1, Ordering::AcqRel);
                match engine {
                    Engine::Uring(ring) => {
                        self.trace(crate::trace::Event::BlkStart, u64::from(req.head));
                        ring.start(&self.backend, req, &**self);
                    }
                    Engine::Workers(_) if inline => self.complete(req),
                    Engine::Workers(jobs) => {
                        if jobs.send((self.clone(), req)).is_err() {
                            return;
                        }
                    }
                }
            }
            if let Engine::Uring(ring) = engine {
                ring.submit();
                ring.reap(&**self);
            }
            if !more {
                return;
            }
        }
    }

    /// Runs one request to completion on this thread: I/O, status byte,
    /// used entry; the pins go last.
    fn complete(&self, req: Request) {
        self.trace(crate::trace::Event::BlkStart, u64::from(req.head));
        let (status, used) = self.backend.execute(&req);
        self.finish(req, status, used);
    }
}

impl Finish for Running {
    /// Publishes a request whose I/O is done: status byte, used entry,
    /// then the pins go, then the interrupt.
    fn finish(&self, req: Request, status: u8, used: u64) {
        let head = req.head;
        self.trace(crate::trace::Event::BlkIoDone, u64::from(head));
        // The status byte is written in its pin's write section: a fence
        // waits for the write (and copies it with the page), or has taken
        // the page already and the section does not open.
        let Some(status_section) = req.status_section() else {
            // The status byte's page was taken from the guest (a fence): a
            // used entry would report a status the guest cannot see. The
            // device stops instead; the driver resets it.
            log::warn!("virtio-blk: request {head} ended after its status byte was fenced");
            self.backend.io_errors.fetch_add(1, Ordering::Relaxed);
            drop(req);
            self.interrupt.needs_reset();
            self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        // Data that went to fenced pages never reached the guest.
        let status = if req.any_fenced() {
            super::request::VIRTIO_BLK_S_IOERR
        } else {
            status
        };
        if status == super::request::VIRTIO_BLK_S_IOERR {
            self.backend.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        if req.cancel.is_cancelled() {
            self.backend.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let mut notify = false;
        if self.stopping.load(Ordering::Acquire) {
            drop(status_section);
        } else {
            // SAFETY: `status` is one byte of guest memory, pinned (behind
            // the IOMMU) until `req` is dropped below, inside the mapping
            // that `self.phys` keeps alive.
            unsafe { std::ptr::write_volatile(req.status.ptr, status) };
            drop(status_section);
            let used_len = u32::try_from(used + 1).unwrap_or(u32::MAX);
            let mut q = lock(&self.queue);
            let published = with_rings!(self, mem => {
                let r = q.add_used(mem, head, used_len);
                (r, q.needs_notification(mem).unwrap_or(true))
            });
            match published {
                Some((Ok(()), n)) => notify = n,
                // The used ring is unreachable although its lease stands:
                // the guest handed the device a ring outside RAM.
                Some((Err(e), _)) => self.ring_error(&e.to_string()),
                // Revoked: the device stopped; the driver resets it.
                None => self.ring_error("used ring revoked"),
            }
        }
        // The used entry is out and the device is done with the buffers:
        // the invalidations covering them may reply from now on. Unpin
        // before the interrupt, so that the driver's UNMAP, which follows
        // the interrupt closely, finds nothing to wait for.
        drop(req);
        self.trace(
            crate::trace::Event::BlkDone,
            (u64::from(head) << 1) | u64::from(notify),
        );
        self.backend.last_signalled.store(notify, Ordering::Relaxed);
        if notify {
            self.backend.interrupts.fetch_add(1, Ordering::Relaxed);
            self.interrupt.signal_queue(self.index);
        }
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Running {
    /// A used entry could not be written (guest-caused: the log stays
    /// bounded).
    fn ring_error(&self, what: &str) {
        let n = self.backend.ring_errors.fetch_add(1, Ordering::Relaxed);
        if n < 3 || n.is_power_of_two() {
            log::warn!("virtio-blk: add_used: {what} ({} so far)", n + 1);
        }
    }

    /// What the queue looks like, for the stall report: (avail index in
    /// the ring, next to pop, next used, used_event, requests in flight);
    /// `None` once the rings are revoked.
    fn queue_state(&self) -> Option<(u16, u16, u16, Option<u16>, u64)> {
        let q = lock(&self.queue);
        with_rings!(self, mem => {
            let avail = q
                .avail_idx(mem, Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(u16::MAX);
            let used_event = q.event_idx_enabled().then(|| {
                let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
                mem.read_obj::<u16>(GuestAddress(at)).unwrap_or(u16::MAX)
            });
            (
                avail,
                q.next_avail(),
                q.next_used(),
                used_event,
                self.backend.in_flight.load(Ordering::Relaxed),
            )
        })
    }
}

/// Set once any disk has reported a stall; the VMM then reports where
/// its vCPUs are.
pub static STALL_SEEN: AtomicBool = AtomicBool::new(false);

/// Reports a queue that stopped moving while work is outstanding (buffers
/// not popped, requests not completed, or used entries the driver has not
/// been told about): the signature of a lost notification or interrupt.
#[derive(Default)]
struct StallCheck {
    last: Option<(u16, u16, u16, Option<u16>, u64)>,
    still: u32,
    reported: bool,
}

impl StallCheck {
    const TICKS: u32 = 5;

    fn tick(&mut self, state: (u16, u16, u16, Option<u16>, u64)) -> Option<String> {
        let (avail, next_avail, next_used, used_event, in_flight) = state;
        let idle =
            avail == next_avail && in_flight == 0 && used_event.is_none_or(|e| e == next_used);
        if idle || self.last != Some(state) {
            self.last = Some(state);
            self.still = 0;
            self.reported = false;
            return None;
        }
        self.still += 1;
        if self.still < Self::TICKS || self.reported {
            return None;
        }
        self.reported = true;
        Some(format!(
            "virtio-blk: queue stalled for {}s: avail_idx={avail} next_avail={next_avail} \
             next_used={next_used} used_event={used_event:?} in_flight={in_flight}",
            self.still
        ))
    }
}

/// The queue thread: waits for notifies (and, with io_uring, for
/// completions and cancellations) and runs the requests. Told to stop, it
/// pops nothing more and returns once its own requests have finished.
pub(super) fn queue_loop(run: Arc<Running>, notify: EventFd, stop: EventFd, mut engine: Engine) {
    const NOTIFY: u64 = 0;
    const STOP: u64 = 1;
    const COMPLETIONS: u64 = 2;
    const CANCELS: u64 = 3;
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("virtio-blk: epoll: {e}");
            return;
        }
    };
    let mut fds = vec![(notify.as_raw_fd(), NOTIFY), (stop.as_raw_fd(), STOP)];
    if let Engine::Uring(ring) = &engine {
        fds.push((ring.completion_fd(), COMPLETIONS));
        fds.push((ring.cancel_fd(), CANCELS));
    }
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::error!("virtio-blk: epoll_ctl: {e}");
            return;
        }
    }
    // Buffers made available before activation.
    run.drain_queue(&mut engine);
    let mut events = [EpollEvent::default(); 4];
    let mut stall = StallCheck::default();
    let mut stopping = false;
    loop {
        if stopping {
            match &engine {
                Engine::Uring(ring) if ring.in_flight() > 0 => {}
                _ => return,
            }
        }
        let n = match epoll.wait(1000, &mut events) {
            Ok(0) => {
                let msg = run.queue_state().and_then(|s| stall.tick(s));
                if let Some(msg) = msg {
                    STALL_SEEN.store(true, Ordering::Relaxed);
                    log::warn!(
                        "{msg}; last completion signalled={} interrupts={}",
                        run.backend.last_signalled.load(Ordering::Relaxed),
                        run.backend.interrupts.load(Ordering::Relaxed)
                    );
                }
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-blk: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match (ev.data(), &mut engine) {
                (STOP, _) => stopping = true,
                (NOTIFY, _) => {
                    let _ = notify.read();
                    if !stopping {
                        run.trace(crate::trace::Event::BlkKick, 0);
                        run.drain_queue(&mut engine);
                    }
                }
                (CANCELS, Engine::Uring(ring)) => ring.cancel_revoked(),
                (COMPLETIONS, Engine::Uring(ring)) => ring.reap(&*run),
                _ => {}
            }
        }
    }
}

/// A worker: runs requests of any queue until the queue threads go away.
pub(super) fn worker_loop(jobs: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let (run, req) = match lock(&jobs).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        run.complete(req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_check_reports_outstanding_work_once() {
        let mut c = StallCheck::default();
        // Idle: everything popped, completed and seen by the driver.
        for _ in 0..20 {
            assert!(c.tick((5, 5, 5, Some(5), 0)).is_none());
        }
        // A completion the driver has not been told about, not moving.
        let stuck = (6, 6, 6, Some(5), 0);
        let reports: Vec<_> = (0..20).filter_map(|_| c.tick(stuck)).collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].contains("used_event=Some(5)"));
        // Progress resets the episode.
        assert!(c.tick((7, 7, 7, Some(7), 0)).is_none());
        let popped_not_done = (8, 8, 7, Some(7), 1);
        assert_eq!((0..20).filter_map(|_| c.tick(popped_not_done)).count(), 1);
    }
}
