//! virtio-blk over a raw image file, with DMA pinned through the IOMMU.
//!
//! One thread per queue pops chains and parses them (`request.rs`) and
//! runs them against the image (`backend.rs`) through its own io_uring
//! (`uring.rs`), writing the status byte and publishing the used entry as
//! completions come back. Where io_uring is unavailable (an old kernel, a
//! sysctl or seccomp filter) or `_disable_io_uring=on`, a small worker
//! pool runs the requests with blocking system calls instead.
//!
//! Behind the IOMMU (`iommu=on`):
//! - every data buffer and the status byte are pinned through the crate's
//!   [`EndpointHandle`] when the chain is parsed, and the pins are dropped
//!   only after the used entry is published: an UNMAP, DETACH or
//!   ATTACH-move that covers any of them replies only after the request
//!   is complete. Each pin carries a revoke hook: if the invalidation
//!   waits longer than the IOMMU's grace period, the request is cancelled
//!   (IOERR without starting its I/O, or as soon as the I/O returns; on
//!   io_uring its operations are cancelled in the kernel with
//!   IORING_OP_ASYNC_CANCEL where they can still be stopped);
//! - the rings are translated once, at activation, as leased queue areas
//!   (`virtio_iommu::QueueAreas`); every ring access (pop, descriptor walk, used entry,
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
mod direct;
mod host_io;
mod queue;
mod request;
mod uring;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_iommu::{AreaSpec, EndpointHandle};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::Backend;
pub use self::queue::STALL_SEEN;
use self::queue::{queue_loop, worker_loop, Engine, Rings, Running};
use self::uring::UringQueue;
use super::{
    ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use crate::config::DiskConfig;

/// Virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered unless `--disk queue_size=` says otherwise.
pub const QUEUE_SIZE: u16 = crate::config::DEFAULT_QUEUE_SIZE;
/// Worker threads per disk doing the file I/O.
pub const WORKERS: usize = 4;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

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

/// A disk's counters, printed at exit (`virtio-blk NAME: engine=...`).
pub struct DiskReport(Arc<Backend>);

impl std::fmt::Display for DiskReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.report())
    }
}

/// A virtio-blk device over a raw image file.
pub struct Block {
    phys: GuestMemoryMmap,
    endpoint: Option<EndpointHandle>,
    backend: Arc<Backend>,
    queue_size: u16,
    num_queues: u16,
    /// Worker threads instead of io_uring (`_disable_io_uring=on`, or
    /// io_uring found unusable at an earlier activation).
    workers_only: bool,
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
            workers_only: cfg.disable_io_uring,
            acked: 0,
            threads: None,
        })
    }

    /// The disk's line in the VMM's exit report.
    pub fn report(&self) -> DiskReport {
        DiskReport(self.backend.clone())
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

    /// One io_uring per queue, or `None` (worker threads) when io_uring is
    /// disabled or unusable here (said once, then remembered).
    fn urings(&mut self, n: usize) -> Option<Vec<UringQueue>> {
        if self.workers_only {
            return None;
        }
        match (0..n).map(|_| UringQueue::new(self.queue_size)).collect() {
            Ok(rings) => Some(rings),
            Err(e) => {
                log::warn!("virtio-blk: {e}; using worker threads instead of io_uring");
                self.workers_only = true;
                None
            }
        }
    }

    /// Starts one queue thread per queue (each with its own ring lease
    /// and io_uring) and, without io_uring, the workers they share.
    fn spawn(
        &mut self,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let err = |e: std::io::Error| ActivateError(e.to_string());
        let stopping = Arc::new(AtomicBool::new(false));
        let mut urings = self.urings(queues.len()).map(Vec::into_iter);
        let engine = if urings.is_some() {
            backend::Engine::IoUring
        } else {
            backend::Engine::Workers
        };
        self.backend.engine.store(engine as u8, Ordering::Relaxed);
        let mut runs = Vec::with_capacity(queues.len());
        for queue in queues {
            let notify = queue
                .notify
                .ok_or_else(|| ActivateError("virtio-blk needs a notify eventfd".into()))?;
            let rings = self.rings(&queue.queue, &interrupt)?;
            let uring = urings.as_mut().and_then(|u| u.next());
            let run = Arc::new(Running {
                index: queue.index,
                backend: self.backend.clone(),
                phys: self.phys.clone(),
                rings,
                // Each queue pins through a shard of its own: queues served
                // by different threads do not share the endpoint's lock.
                endpoint: self.endpoint.as_ref().map(|e| e.on_queue(queue.index)),
                queue: Mutex::new(queue.queue),
                interrupt: interrupt.clone(),
                stopping: stopping.clone(),
                cancel_waker: uring.as_ref().map(UringQueue::cancel_waker),
            });
            runs.push((run, notify, uring));
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(err)?;
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        let workers = if urings.is_some() { 0 } else { WORKERS };
        for i in 0..workers {
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
        for (run, notify, uring) in runs {
            let stop = stop.try_clone().map_err(err)?;
            let engine = match uring {
                Some(u) => Engine::Uring(Box::new(u)),
                None => Engine::Workers(tx.clone()),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blk-queue{}", run.index))
                    .spawn(move || {
                        queue_loop(run, notify, stop, engine);
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

    /// Tells the threads to stop and joins them if they have finished;
    /// returns false, leaving them running, if they still hold I/O. Never
    /// waits: activation runs on a vCPU thread, and a backend that never
    /// completes must not hold it (nor the VMM's exit).
    fn retire_threads(&mut self) -> bool {
        if let Some(t) = &self.threads {
            t.signal_stop();
        }
        self.reset_done()
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
        // The transport activates only after a reset has completed, so the
        // threads of an earlier activation are gone; a driver that skips
        // the reset gets an error rather than a vCPU waiting for old I/O.
        if !self.retire_threads() {
            return Err(ActivateError(
                "virtio-blk: requests of the previous activation are still in flight; \
                 reset the device first"
                    .into(),
            ));
        }
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
    /// Stops the threads; those still holding I/O (a backend that never
    /// completes) are left to finish on their own rather than waited for:
    /// they keep the guest memory they use mapped, and the VMM is exiting.
    fn drop(&mut self) {
        if !self.retire_threads() {
            log::warn!(
                "virtio-blk {}: {} requests still in flight; not waiting for them",
                self.backend.name,
                self.backend.in_flight.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

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
}
