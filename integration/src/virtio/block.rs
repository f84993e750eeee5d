//! virtio-blk over a raw image file, with DMA pinned through the IOMMU.
//!
//! One queue thread pops chains and parses them; a small worker pool does
//! the blocking file I/O (`preadv`/`pwritev`/`fdatasync`) straight into
//! guest memory, writes the status byte and publishes the used entry.
//!
//! Behind the IOMMU (`iommu=on`), every data buffer and the status byte
//! are pinned through the crate's [`EndpointHandle`] when the chain is
//! parsed, and the pins are dropped only after the used entry is
//! published. An UNMAP, DETACH or ATTACH-move that covers any of those
//! buffers therefore replies only after the request is complete: the
//! host pointers handed to the worker can never outlive the translation.
//! Each pin carries a revoke hook: if the invalidation waits longer than
//! the IOMMU's grace period, the request is cancelled (it completes with
//! VIRTIO_BLK_S_IOERR without starting its I/O, or as soon as the I/O in
//! progress returns).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_iommu::{EndpointHandle, Pin};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, IommuMemory, Permissions,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use crate::cli::DiskConfig;

/// Virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Worker threads per disk doing the file I/O.
pub const WORKERS: usize = 4;
const SECTOR: u64 = 512;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID string.
const ID_LEN: usize = 20;
/// Request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// `preadv`/`pwritev` take at most this many iovecs at once.
const MAX_IOVECS: usize = 1024;

/// Where the worker threads' DMA goes: guest memory, possibly through the
/// IOMMU. Implemented by [`GuestMemoryMmap`] (iommu=off) and by
/// `IommuMemory` over an [`EndpointHandle`] (iommu=on) for ring accesses.
trait RingMemory: GuestMemory + Send + Sync + 'static {}
impl<T: GuestMemory + Send + Sync + 'static> RingMemory for T {}

/// A host buffer inside guest memory.
#[derive(Clone, Copy, Debug)]
struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a HostBuf points into guest memory mapped by the GuestMemoryMmap
// that the device (and every worker) holds a clone of, so the mapping
// outlives it; concurrent guest access to the same bytes is inherent to DMA
// and only ever done through volatile/raw copies, never references.
unsafe impl Send for HostBuf {}

/// Cancellation of one request, set by its pins' revoke hook.
#[derive(Default)]
struct Cancel {
    cancelled: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Cancel {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Sleeps for `d` unless cancelled first.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_cancelled() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a parsed request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Unsupported,
}

/// A parsed request, its buffers resolved to host memory and pinned.
struct Request {
    head: u16,
    kind: Kind,
    sector: u64,
    data: Vec<HostBuf>,
    data_len: u64,
    status: HostBuf,
    /// Status decided at parse time (bad range, read-only), if any.
    early_status: Option<u8>,
    cancel: Arc<Cancel>,
    /// Held until the used entry is published; dropping them lets a
    /// waiting invalidation reply.
    _pins: Vec<Pin>,
}

/// Why a chain could not become a request.
#[derive(Debug)]
enum ParseError {
    /// No room for a status byte: the chain is returned with used length 0.
    NoStatus,
    /// The header or a buffer could not be translated or is outside RAM.
    BadBuffer,
}

/// Settings that do not change while the device runs.
struct Backend {
    file: File,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_LEN],
    delay: Duration,
    fail_every: u64,
    requests: AtomicU64,
    /// Used-ring writes that failed (ring unmapped by the guest).
    ring_errors: AtomicU64,
    /// Requests handed to the workers and not yet completed.
    in_flight: AtomicU64,
    /// Whether the last completion asked for an interrupt (stall report).
    last_signalled: AtomicBool,
    /// Interrupts sent for completions.
    interrupts: AtomicU64,
}

/// A running device: its queue, the memory views and the interrupt.
struct Running<M: RingMemory> {
    backend: Arc<Backend>,
    /// Guest-physical memory, for host pointers of pinned buffers.
    phys: GuestMemoryMmap,
    /// What the rings are read and written through.
    ring_mem: M,
    endpoint: Option<EndpointHandle>,
    queue: Mutex<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M: RingMemory> Running<M> {
    /// Translates (and pins, behind the IOMMU) `[addr, addr + len)` for
    /// `access`; returns the host buffers covering it.
    fn resolve(
        &self,
        addr: u64,
        len: u64,
        access: Permissions,
        cancel: &Arc<Cancel>,
        pins: &mut Vec<Pin>,
        out: &mut Vec<HostBuf>,
    ) -> Result<(), ParseError> {
        if len == 0 {
            return Ok(());
        }
        let gpas: Vec<(u64, u64)> = match &self.endpoint {
            None => vec![(addr, len)],
            Some(ep) => {
                let c = cancel.clone();
                let pin = ep
                    .pin_revocable(addr, len, access, Arc::new(move || c.cancel()))
                    .map_err(|_| ParseError::BadBuffer)?;
                let r = pin.ranges().iter().map(|r| (r.gpa, r.len)).collect();
                pins.push(pin);
                r
            }
        };
        for (gpa, len) in gpas {
            let len = usize::try_from(len).map_err(|_| ParseError::BadBuffer)?;
            let mut covered = 0;
            for s in GuestMemoryBackend::get_slices(&self.phys, GuestAddress(gpa), len) {
                let s = s.map_err(|_| ParseError::BadBuffer)?;
                covered += s.len();
                out.push(HostBuf {
                    ptr: s.ptr_guard_mut().as_ptr(),
                    len: s.len(),
                });
            }
            if covered != len {
                return Err(ParseError::BadBuffer);
            }
        }
        Ok(())
    }

    /// Turns a chain into a request: reads the header, pins the buffers.
    fn parse<D>(
        &self,
        chain: virtio_queue::DescriptorChain<D>,
    ) -> Result<Request, (u16, ParseError)>
    where
        D: std::ops::Deref + Clone,
        D::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut readable: Vec<(u64, u64)> = Vec::new();
        let mut writable: Vec<(u64, u64)> = Vec::new();
        for d in chain {
            if d.len() == 0 {
                continue;
            }
            if d.is_write_only() {
                writable.push((d.addr().0, u64::from(d.len())));
            } else {
                readable.push((d.addr().0, u64::from(d.len())));
            }
        }
        // The status byte is the last writable byte (any framing is fine).
        let Some(last) = writable.last_mut() else {
            return Err((head, ParseError::NoStatus));
        };
        let status_addr = last.0 + last.1 - 1;
        last.1 -= 1;
        if last.1 == 0 {
            writable.pop();
        }

        // The header: the first 16 readable bytes, read through the IOMMU.
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let Some(first) = readable.first_mut() else {
                return Err((head, ParseError::BadBuffer));
            };
            let n = (HEADER_LEN - got).min(first.1 as usize);
            self.ring_mem
                .read_slice(&mut header[got..got + n], GuestAddress(first.0))
                .map_err(|_| (head, ParseError::BadBuffer))?;
            got += n;
            first.0 += n as u64;
            first.1 -= n as u64;
            if first.1 == 0 {
                readable.remove(0);
            }
        }
        let type_ = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let kind = match type_ {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            _ => Kind::Unsupported,
        };

        let cancel = Arc::new(Cancel::default());
        let mut pins = Vec::new();
        let mut status = Vec::with_capacity(1);
        self.resolve(
            status_addr,
            1,
            Permissions::Write,
            &cancel,
            &mut pins,
            &mut status,
        )
        .map_err(|e| (head, e))?;
        let status = status[0];

        let (segments, access) = match kind {
            Kind::In | Kind::GetId => (&writable, Permissions::Write),
            Kind::Out => (&readable, Permissions::Read),
            Kind::Flush | Kind::Unsupported => (&writable, Permissions::Write),
        };
        let mut data = Vec::new();
        let mut data_len = 0u64;
        let mut early_status = None;
        if matches!(kind, Kind::In | Kind::Out | Kind::GetId) {
            for &(addr, len) in segments {
                data_len += len;
                if self
                    .resolve(addr, len, access, &cancel, &mut pins, &mut data)
                    .is_err()
                {
                    // The status byte is still reachable: report the error
                    // to the driver instead of dropping the chain.
                    early_status = Some(VIRTIO_BLK_S_IOERR);
                    data.clear();
                    break;
                }
            }
        }
        if matches!(kind, Kind::In | Kind::Out) && early_status.is_none() {
            let end = sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(data_len));
            if !data_len.is_multiple_of(SECTOR) || end.is_none_or(|e| e > self.backend.capacity) {
                early_status = Some(VIRTIO_BLK_S_IOERR);
            }
            if kind == Kind::Out && self.backend.readonly {
                early_status = Some(VIRTIO_BLK_S_IOERR);
            }
        }
        Ok(Request {
            head,
            kind,
            sector,
            data,
            data_len,
            status,
            early_status,
            cancel,
            _pins: pins,
        })
    }

    /// Pops every available chain and hands the requests to the workers,
    /// or, for a lone request on an idle device, runs it right here.
    ///
    /// A lone request (queue depth 1) gains nothing from a worker but pays
    /// a thread wake-up before its I/O starts; running it on this thread
    /// saves that. The ring's notifications are back on while it runs, so
    /// requests made available meanwhile are kicked and popped next.
    fn drain_queue(&self, jobs: &Sender<Request>) {
        loop {
            let mut batch = Vec::new();
            let more = {
                let mut q = lock(&self.queue);
                if let Err(e) = q.disable_notification(&self.ring_mem) {
                    log::warn!("virtio-blk: {e}");
                    return;
                }
                let mut returned = false;
                while let Some(chain) = q.pop_descriptor_chain(&self.ring_mem) {
                    match self.parse(chain) {
                        Ok(req) => {
                            crate::trace::record(
                                crate::trace::Event::BlkQueued,
                                u64::from(req.head),
                            );
                            batch.push(req);
                        }
                        Err((head, e)) => {
                            log::warn!("virtio-blk: chain {head}: {e:?}");
                            // Nothing of the chain is used; give it back.
                            if q.add_used(&self.ring_mem, head, 0).is_ok() {
                                returned = true;
                            }
                        }
                    }
                }
                if returned && q.needs_notification(&self.ring_mem).unwrap_or(true) {
                    self.interrupt.signal_queue(0);
                }
                match q.enable_notification(&self.ring_mem) {
                    Ok(more) => more,
                    Err(e) => {
                        log::warn!("virtio-blk: {e}");
                        false
                    }
                }
            };
            let inline =
                batch.len() == 1 && !more && self.backend.in_flight.load(Ordering::Acquire) == 0;
            for req in batch {
                self.backend.in_flight.fetch_add(1, Ordering::AcqRel);
                if inline {
                    self.complete(req);
                } else if jobs.send(req).is_err() {
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
        let b = &self.backend;
        crate::trace::record(crate::trace::Event::BlkStart, u64::from(req.head));
        let n = b.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut used = 0u64;
        let status = if let Some(s) = req.early_status {
            s
        } else {
            if !b.delay.is_zero() {
                req.cancel.sleep(b.delay);
            }
            if req.cancel.is_cancelled() || (b.fail_every > 0 && n.is_multiple_of(b.fail_every)) {
                VIRTIO_BLK_S_IOERR
            } else {
                match req.kind {
                    Kind::In => match rw(&b.file, &req.data, req.sector * SECTOR, false) {
                        Ok(()) => {
                            used = req.data_len;
                            VIRTIO_BLK_S_OK
                        }
                        Err(e) => {
                            log::warn!("virtio-blk: read at sector {}: {e}", req.sector);
                            VIRTIO_BLK_S_IOERR
                        }
                    },
                    Kind::Out => match rw(&b.file, &req.data, req.sector * SECTOR, true) {
                        Ok(()) => VIRTIO_BLK_S_OK,
                        Err(e) => {
                            log::warn!("virtio-blk: write at sector {}: {e}", req.sector);
                            VIRTIO_BLK_S_IOERR
                        }
                    },
                    Kind::Flush => match b.file.sync_data() {
                        Ok(()) => VIRTIO_BLK_S_OK,
                        Err(_) => VIRTIO_BLK_S_IOERR,
                    },
                    Kind::GetId => {
                        used = copy_to_bufs(&b.id, &req.data) as u64;
                        VIRTIO_BLK_S_OK
                    }
                    Kind::Unsupported => VIRTIO_BLK_S_UNSUPP,
                }
            }
        };
        // SAFETY: `status` is one byte of guest memory, pinned (behind the
        // IOMMU) until `req` is dropped below, inside the mapping that
        // `self.phys` keeps alive.
        unsafe { std::ptr::write_volatile(req.status.ptr, status) };
        let used_len = u32::try_from(used + 1).unwrap_or(u32::MAX);
        let notify = {
            let mut q = lock(&self.queue);
            if let Err(e) = q.add_used(&self.ring_mem, req.head, used_len) {
                // The guest took the used ring away (e.g. detached the
                // device from its domain) with the request in flight; the
                // IOMMU reports the fault to the guest. Guest-caused:
                // keep the log bounded.
                let n = self.backend.ring_errors.fetch_add(1, Ordering::Relaxed);
                if n < 3 || n.is_power_of_two() {
                    log::warn!("virtio-blk: add_used: {e} ({} so far)", n + 1);
                }
            }
            q.needs_notification(&self.ring_mem).unwrap_or(true)
        };
        // The used entry is out and the device is done with the buffers:
        // the invalidations covering them may reply from now on. Unpin
        // before the interrupt, so that the driver's UNMAP, which follows
        // the interrupt closely, finds nothing to wait for.
        let head = req.head;
        drop(req);
        crate::trace::record(
            crate::trace::Event::BlkDone,
            (u64::from(head) << 1) | u64::from(notify),
        );
        self.backend.last_signalled.store(notify, Ordering::Relaxed);
        if notify {
            self.backend.interrupts.fetch_add(1, Ordering::Relaxed);
            self.interrupt.signal_queue(0);
        }
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<M: RingMemory> Running<M> {
    /// What the queue looks like, for the stall report: (avail index in
    /// the ring, next to pop, next used, used_event, requests in flight).
    fn queue_state(&self) -> (u16, u16, u16, Option<u16>, u64) {
        let q = lock(&self.queue);
        let avail = q
            .avail_idx(&self.ring_mem, std::sync::atomic::Ordering::Acquire)
            .map(|w| w.0)
            .unwrap_or(u16::MAX);
        let used_event = q.event_idx_enabled().then(|| {
            let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
            self.ring_mem
                .read_obj::<u16>(GuestAddress(at))
                .unwrap_or(u16::MAX)
        });
        (
            avail,
            q.next_avail(),
            q.next_used(),
            used_event,
            self.backend.in_flight.load(Ordering::Relaxed),
        )
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

/// Copies `src` into the buffers; returns the bytes copied.
fn copy_to_bufs(src: &[u8], bufs: &[HostBuf]) -> usize {
    let mut done = 0;
    for b in bufs {
        if done == src.len() {
            break;
        }
        let n = b.len.min(src.len() - done);
        // SAFETY: `b` covers `b.len` bytes of pinned guest memory (see
        // HostBuf); `src` is a separate host buffer.
        unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), b.ptr, n) };
        done += n;
    }
    done
}

/// Reads (`write == false`) or writes the whole of `bufs` at `offset`.
fn rw(file: &File, bufs: &[HostBuf], mut offset: u64, write: bool) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr.cast(),
            iov_len: b.len,
        })
        .collect();
    let mut start = 0;
    while start < iov.len() {
        let end = (start + MAX_IOVECS).min(iov.len());
        let chunk = &iov[start..end];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec covers pinned guest memory that stays mapped
        // (see HostBuf); the kernel only accesses those bytes.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        offset += n as u64;
        // Skip what was transferred, trimming a partly done iovec.
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            if n >= iov[start].iov_len {
                n -= iov[start].iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n) }.cast();
                iov[start].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// The queue thread: waits for notifies and feeds the workers.
fn queue_loop<M: RingMemory>(
    run: Arc<Running<M>>,
    notify: EventFd,
    stop: EventFd,
    jobs: Sender<Request>,
) {
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
                if let Some(msg) = stall.tick(run.queue_state()) {
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
            crate::trace::record(crate::trace::Event::BlkKick, 0);
            run.drain_queue(&jobs);
        }
    }
}

/// A worker: runs requests until the queue thread goes away.
fn worker_loop<M: RingMemory>(run: Arc<Running<M>>, jobs: Arc<Mutex<Receiver<Request>>>) {
    loop {
        let req = match lock(&jobs).recv() {
            Ok(r) => r,
            Err(_) => return,
        };
        run.complete(req);
    }
}

/// Threads of an activated device.
struct Threads {
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
}

/// A virtio-blk device over a raw image file.
pub struct Block {
    phys: GuestMemoryMmap,
    endpoint: Option<EndpointHandle>,
    backend: Arc<Backend>,
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
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)?;
        let len = file.metadata()?.len();
        let mut id = [0u8; ID_LEN];
        let name = cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            phys: mem,
            endpoint,
            backend: Arc::new(Backend {
                file,
                capacity: len / SECTOR * SECTOR,
                readonly: cfg.readonly,
                id,
                delay: Duration::from_micros(cfg.delay_us),
                fail_every: cfg.fail_every,
                requests: AtomicU64::new(0),
                ring_errors: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                last_signalled: AtomicBool::new(false),
                interrupts: AtomicU64::new(0),
            }),
            acked: 0,
            threads: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.backend.capacity / SECTOR
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&self.sectors().to_le_bytes());
        // size_max (0: no limit offered), seg_max.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }

    fn spawn<M: RingMemory>(
        &mut self,
        ring_mem: M,
        queue: ActiveQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let err = |e: std::io::Error| ActivateError(e.to_string());
        let notify = queue
            .notify
            .ok_or_else(|| ActivateError("virtio-blk needs a notify eventfd".into()))?;
        let run = Arc::new(Running {
            backend: self.backend.clone(),
            phys: self.phys.clone(),
            ring_mem,
            endpoint: self.endpoint.clone(),
            queue: Mutex::new(queue.queue),
            interrupt,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(err)?;
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..WORKERS {
            let run = run.clone();
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blk-worker{i}"))
                    .spawn(move || {
                        worker_loop(run, rx);
                        crate::trace::thread_exit();
                    })
                    .map_err(err)?,
            );
        }
        let stop2 = stop.try_clone().map_err(err)?;
        threads.push(
            std::thread::Builder::new()
                .name("blk-queue".into())
                .spawn(move || {
                    queue_loop(run, notify, stop2, tx);
                    crate::trace::thread_exit();
                })
                .map_err(err)?,
        );
        self.threads = Some(Threads { stop, threads });
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_EVENT_IDX;
        if self.backend.readonly {
            f |= VIRTIO_BLK_F_RO;
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
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_threads();
        let q = match queues.len() {
            1 => queues.remove(0),
            n => return Err(ActivateError(format!("expected 1 queue, got {n}"))),
        };
        match self.endpoint.clone() {
            Some(ep) if self.acked & VIRTIO_F_ACCESS_PLATFORM != 0 => {
                let mem = IommuMemory::new(self.phys.clone(), ep, true, ());
                self.spawn(mem, q, interrupt)
            }
            // A driver that refused ACCESS_PLATFORM would hand us
            // guest-physical addresses and so reach all of guest memory
            // around the IOMMU (a userspace VFIO driver could do that on
            // purpose): the device does not operate (virtio 1.2, 6.1).
            Some(_) => Err(ActivateError(
                "iommu=on: the driver did not accept VIRTIO_F_ACCESS_PLATFORM".into(),
            )),
            None => {
                let mem = self.phys.clone();
                self.spawn(mem, q, interrupt)
            }
        }
    }

    fn reset(&mut self) {
        self.stop_threads();
        self.acked = 0;
    }
}

impl Block {
    /// Stops the queue thread and waits for the workers, which finish what
    /// they hold (publishing, then unpinning) first.
    fn stop_threads(&mut self) {
        if let Some(t) = self.threads.take() {
            let _ = t.stop.write(1);
            // The queue thread exits and drops the job sender; workers
            // finish what they hold (publishing, then unpinning) and exit.
            for h in t.threads {
                let _ = h.join();
            }
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
    fn cancel_cuts_the_delay_short() {
        let c = Arc::new(Cancel::default());
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.cancel();
        });
        let start = Instant::now();
        c.sleep(Duration::from_secs(30));
        assert!(c.is_cancelled());
        assert!(start.elapsed() < Duration::from_secs(10));
        t.join().unwrap();
    }

    #[test]
    fn rw_handles_many_buffers() {
        let dir = std::env::temp_dir().join(format!("vmm-blk-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        let mut src: Vec<Vec<u8>> = (0..2000u32).map(|i| vec![i as u8; 2]).collect();
        let bufs: Vec<HostBuf> = src
            .iter_mut()
            .map(|v| HostBuf {
                ptr: v.as_mut_ptr(),
                len: v.len(),
            })
            .collect();
        rw(&f, &bufs, 512, true).unwrap();
        let mut dst = vec![0u8; 4000];
        let one = [HostBuf {
            ptr: dst.as_mut_ptr(),
            len: dst.len(),
        }];
        rw(&f, &one, 512, false).unwrap();
        for i in 0..2000usize {
            assert_eq!(&dst[2 * i..2 * i + 2], &[i as u8; 2]);
        }
        let mut big = vec![0u8; 9000];
        let past = [HostBuf {
            ptr: big.as_mut_ptr(),
            len: big.len(),
        }];
        assert!(rw(&f, &past, 0, false).is_err(), "EOF is an error");
        std::fs::remove_file(&dir).unwrap();
    }

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

    #[test]
    fn copy_to_bufs_spans_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 30];
        let bufs = [
            HostBuf {
                ptr: a.as_mut_ptr(),
                len: 3,
            },
            HostBuf {
                ptr: b.as_mut_ptr(),
                len: 30,
            },
        ];
        assert_eq!(copy_to_bufs(b"abcdefghij0123456789", &bufs), 20);
        assert_eq!(&a, b"abc");
        assert_eq!(&b[..17], b"defghij0123456789");
    }
}
