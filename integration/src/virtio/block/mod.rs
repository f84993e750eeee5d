//! virtio-blk over a raw image file, with DMA pinned through the IOMMU.
//!
//! One queue thread pops chains and parses them (`request.rs`); a small
//! worker pool runs them against the image (`backend.rs`), writes the
//! status byte and publishes the used entry.
//!
//! Behind the IOMMU (`iommu=on`):
//! - every data buffer and the status byte are pinned through the crate's
//!   [`EndpointHandle`] when the chain is parsed, and the pins are dropped
//!   only after the used entry is published: an UNMAP, DETACH or
//!   ATTACH-move that covers any of them replies only after the request
//!   is complete. Each pin carries a revoke hook: if the invalidation
//!   waits longer than the IOMMU's grace period, the request is cancelled
//!   (IOERR without starting its I/O, or as soon as the I/O returns);
//! - the rings are translated once, at activation, as leased queue areas
//!   ([`QueueAreas`]); every ring access (pop, descriptor walk, used entry,
//!   notification suppression) happens inside a short access section on
//!   the cached translation. An invalidation that removes any part of a
//!   ring revokes the lease: the device stops touching the queue, reports
//!   DEVICE_NEEDS_RESET with a configuration interrupt, and the IOMMU
//!   reports an R_MAPPING fault; the invalidation's reply waits for the
//!   sections open at that moment. The driver recovers with a reset.
//!
//! A reset never blocks the vCPU that writes it: the threads are told to
//! stop, finish what they hold (so a reset with I/O in flight completes
//! after that I/O, and nothing is written after it), and the transport
//! reads the status back as non-zero until they have.

mod backend;
mod request;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_iommu::{AreaSpec, EndpointHandle, QueueAreas};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::Backend;
use self::request::{parse, Buffers, Request};
use super::{
    ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use crate::cli::DiskConfig;

/// Virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered unless `--disk queue_size=` says otherwise.
pub const QUEUE_SIZE: u16 = crate::cli::DEFAULT_QUEUE_SIZE;
/// Worker threads per disk doing the file I/O.
pub const WORKERS: usize = 4;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// How the device reaches its rings.
enum Rings {
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
struct Running {
    /// Queue index (for its interrupt).
    index: u16,
    backend: Arc<Backend>,
    /// Guest-physical memory, for host pointers of pinned buffers.
    phys: GuestMemoryMmap,
    rings: Rings,
    endpoint: Option<EndpointHandle>,
    queue: Mutex<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver reset the device: finish what is held, publish nothing.
    stopping: Arc<AtomicBool>,
}

/// A request for the workers, with the queue it came from.
type Job = (Arc<Running>, Request);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Pops every available chain and hands the requests to the workers,
    /// or, for a lone request on an idle device, runs it right here.
    ///
    /// A lone request (queue depth 1) gains nothing from a worker but pays
    /// a thread wake-up before its I/O starts; running it on this thread
    /// saves that. The ring's notifications are back on while it runs, so
    /// requests made available meanwhile are kicked and popped next.
    fn drain_queue(self: &Arc<Self>, jobs: &Sender<Job>) {
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
                if inline {
                    self.complete(req);
                } else if jobs.send((self.clone(), req)).is_err() {
                    return;
                }
            }
            if !more {
                return;
            }
        }
    }

    /// Runs one request to completion: I/O, status byte, used entry; the
    /// pins go last.
    fn complete(&self, req: Request) {
        self.trace(crate::trace::Event::BlkStart, u64::from(req.head));
        let (status, used) = self.backend.execute(&req);
        let head = req.head;
        self.trace(crate::trace::Event::BlkIoDone, u64::from(head));
        let mut notify = false;
        if !self.stopping.load(Ordering::Acquire) {
            // SAFETY: `status` is one byte of guest memory, pinned (behind
            // the IOMMU) until `req` is dropped below, inside the mapping
            // that `self.phys` keeps alive.
            unsafe { std::ptr::write_volatile(req.status.ptr, status) };
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

/// The queue thread: waits for notifies and feeds the workers.
fn queue_loop(run: Arc<Running>, notify: EventFd, stop: EventFd, jobs: Sender<Job>) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("virtio-blk: epoll: {e}");
            return;
        }
    };
    for (fd, token) in [(notify.as_raw_fd(), 0u64), (stop.as_raw_fd(), 1)] {
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
    run.drain_queue(&jobs);
    let mut events = [EpollEvent::default(); 2];
    let mut stall = StallCheck::default();
    loop {
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
            if ev.data() == 1 {
                return;
            }
            let _ = notify.read();
            run.trace(crate::trace::Event::BlkKick, 0);
            run.drain_queue(&jobs);
        }
    }
}

/// A worker: runs requests of any queue until the queue threads go away.
fn worker_loop(jobs: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let (run, req) = match lock(&jobs).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        run.complete(req);
    }
}

/// Threads of an activated device.
struct Threads {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Threads {
    /// Tells the threads to stop: the queue threads leave, the workers
    /// finish what they hold without publishing it.
    fn signal_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
    }

    fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    fn join(self) {
        for h in self.threads {
            let _ = h.join();
        }
    }
}

/// A virtio-blk device over a raw image file.
pub struct Block {
    phys: GuestMemoryMmap,
    endpoint: Option<EndpointHandle>,
    backend: Arc<Backend>,
    queue_size: u16,
    num_queues: u16,
    acked: u64,
    threads: Option<Threads>,
}

impl Block {
    /// Opens `cfg.path`. `endpoint` is the IOMMU endpoint when the disk is
    /// `iommu=on`; its DMA is then translated and pinned through it.
    pub fn new(
        cfg: &DiskConfig,
        mem: GuestMemoryMmap,
        endpoint: Option<EndpointHandle>,
    ) -> std::io::Result<Self> {
        Ok(Block {
            phys: mem,
            endpoint,
            backend: Arc::new(Backend::open(cfg)?),
            queue_size: cfg.queue_size,
            num_queues: cfg.num_queues,
            acked: 0,
            threads: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.backend.capacity / request::SECTOR
    }

    /// `struct virtio_blk_config` up to `num_queues` (virtio 1.2, 5.2.4):
    /// capacity, size_max (0: none offered), seg_max, ..., num_queues at
    /// offset 34 (read only with VIRTIO_BLK_F_MQ).
    fn config_bytes(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        c[0..8].copy_from_slice(&self.sectors().to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(self.queue_size - 2).to_le_bytes());
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c
    }

    /// How the rings are reached: directly, or through a lease on their
    /// translation whose revocation raises DEVICE_NEEDS_RESET.
    fn rings(
        &self,
        q: &Queue,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<Rings, ActivateError> {
        match &self.endpoint {
            Some(ep) if self.acked & VIRTIO_F_ACCESS_PLATFORM != 0 => {
                let specs =
                    AreaSpec::split_queue(q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
                let irq = interrupt.clone();
                ep.lease_queue_areas(&specs, Arc::new(move || irq.needs_reset()))
                    .map(Rings::Leased)
                    .map_err(|e| ActivateError(format!("iommu=on: queue rings: {e}")))
            }
            // A driver that refused ACCESS_PLATFORM would hand us
            // guest-physical addresses and so reach all of guest memory
            // around the IOMMU (a userspace VFIO driver could do that on
            // purpose): the device does not operate (virtio 1.2, 6.1).
            Some(_) => Err(ActivateError(
                "iommu=on: the driver did not accept VIRTIO_F_ACCESS_PLATFORM".into(),
            )),
            None => Ok(Rings::Direct),
        }
    }

    /// Starts one queue thread per queue (each with its own ring lease)
    /// and the workers they share.
    fn spawn(
        &mut self,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let err = |e: std::io::Error| ActivateError(e.to_string());
        let stopping = Arc::new(AtomicBool::new(false));
        let mut runs = Vec::with_capacity(queues.len());
        for queue in queues {
            let notify = queue
                .notify
                .ok_or_else(|| ActivateError("virtio-blk needs a notify eventfd".into()))?;
            let rings = self.rings(&queue.queue, &interrupt)?;
            let run = Arc::new(Running {
                index: queue.index,
                backend: self.backend.clone(),
                phys: self.phys.clone(),
                rings,
                endpoint: self.endpoint.clone(),
                queue: Mutex::new(queue.queue),
                interrupt: interrupt.clone(),
                stopping: stopping.clone(),
            });
            runs.push((run, notify));
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(err)?;
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..WORKERS {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blk-worker{i}"))
                    .spawn(move || {
                        worker_loop(rx);
                        crate::trace::thread_exit();
                    })
                    .map_err(err)?,
            );
        }
        for (run, notify) in runs {
            let stop = stop.try_clone().map_err(err)?;
            let tx = tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blk-queue{}", run.index))
                    .spawn(move || {
                        queue_loop(run, notify, stop, tx);
                        crate::trace::thread_exit();
                    })
                    .map_err(err)?,
            );
        }
        // The workers end when the last queue thread drops its sender.
        drop(tx);
        self.threads = Some(Threads {
            stop,
            stopping,
            threads,
        });
        Ok(())
    }

    /// Stops the threads and waits for them (activation, VMM exit; never
    /// on a vCPU thread's reset path).
    fn stop_threads(&mut self) {
        if let Some(t) = self.threads.take() {
            t.signal_stop();
            t.join();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_EVENT_IDX;
        if self.backend.readonly {
            f |= VIRTIO_BLK_F_RO;
        }
        if self.num_queues > 1 {
            f |= VIRTIO_BLK_F_MQ;
        }
        if self.endpoint.is_some() {
            f |= VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (no WCE, no config-writable features).
    }

    fn activate(
        &mut self,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_threads();
        // A driver may use fewer queues than offered (Linux: one per CPU).
        if queues.is_empty() || queues.len() > usize::from(self.num_queues) {
            return Err(ActivateError(format!(
                "expected 1 to {} queues, got {}",
                self.num_queues,
                queues.len()
            )));
        }
        self.spawn(queues, interrupt)
    }

    fn reset(&mut self) -> bool {
        self.acked = 0;
        if let Some(t) = &self.threads {
            t.signal_stop();
        }
        self.reset_done()
    }

    fn reset_done(&mut self) -> bool {
        // Done once every thread has finished what it held; joining is then
        // immediate, and the last `Running` goes with them (the ring lease
        // with it).
        match self.threads.take() {
            Some(t) if !t.finished() => {
                self.threads = Some(t);
                false
            }
            Some(t) => {
                t.join();
                true
            }
            None => true,
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iommu_disk_refuses_a_driver_without_access_platform() {
        let path = std::env::temp_dir().join(format!("vmm-blk-ap-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut iommu = virtio_iommu::VirtioIommu::new(Default::default()).unwrap();
        let ep = iommu.add_endpoint(8).unwrap();
        let cfg = DiskConfig {
            path: path.clone(),
            iommu: true,
            ..Default::default()
        };
        let mut blk = Block::new(&cfg, mem, Some(ep)).unwrap();
        blk.ack_features(VIRTIO_F_VERSION_1);
        struct NoInterrupt;
        impl VirtioInterrupt for NoInterrupt {
            fn signal_queue(&self, _: u16) {}
            fn signal_config(&self) {}
            fn needs_reset(&self) {}
        }
        let q = ActiveQueue {
            index: 0,
            queue: Queue::new(QUEUE_SIZE).unwrap(),
            notify: Some(EventFd::new(EFD_NONBLOCK).unwrap()),
        };
        let e = blk.activate(vec![q], Arc::new(NoInterrupt)).err();
        assert!(e.is_some_and(|e| e.0.contains("ACCESS_PLATFORM")));
        std::fs::remove_file(&path).unwrap();
    }

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
