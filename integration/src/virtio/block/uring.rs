//! The io_uring engine of one request queue (Cloud Hypervisor's default
//! for raw images): the queue thread submits each request's I/O to its own
//! ring and completes the request when the kernel posts the completion.
//!
//! The invariant is the device's: a request's buffers stay pinned (and the
//! request's memory referenced by the kernel stays alive) from parsing
//! until every operation submitted for it has completed and its used entry
//! is published. A slot is freed only when none of its operations is
//! outstanding, and the ring is never dropped with operations in flight
//! (dropping waits for them), so the kernel never writes guest memory
//! through a translation the device no longer holds.
//!
//! Revocation: when an invalidation has waited past the IOMMU's grace
//! period, the pins' revoke hook cancels the request and wakes the queue
//! thread (`Cancel::with_waker`), which submits `IORING_OP_ASYNC_CANCEL`
//! for the request's operations. An operation the kernel can still stop
//! (the injected delay, queued work) ends with -ECANCELED at once; one it
//! cannot ends when its I/O returns. Either way the request completes with
//! VIRTIO_BLK_S_IOERR, and its pins go only then.
//!
//! Fault injection: `delay_us` is an `IORING_OP_TIMEOUT` linked in front
//! of the I/O (`IORING_TIMEOUT_ETIME_SUCCESS` keeps the link), so the
//! delay is the kernel's and cancellable like the I/O itself.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, UringOp, UringPlan};
use super::host_io::MAX_IOVECS;
use super::request::{HostBuf, Request, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// What an operation's `user_data` says besides its slot.
const TAG_IO: u64 = 0;
const TAG_DELAY: u64 = 1;
const TAG_CANCEL: u64 = 2;

/// `user_data`: generation (32 bits), slot (16 bits), tag (2 bits). The
/// generation keeps a late cancel from reaching a slot's next request.
fn user_data(gen: u32, slot: u16, tag: u64) -> u64 {
    (u64::from(gen) << 32) | (u64::from(slot) << 2) | tag
}

fn decode(ud: u64) -> (u32, u16, u64) {
    ((ud >> 32) as u32, ((ud >> 2) & 0xffff) as u16, ud & 3)
}

/// Receives finished requests: the status byte and the bytes written into
/// the guest (the queue thread publishes the used entry).
pub(super) trait Finish {
    /// `req` is done; the device publishes its status and drops its pins.
    fn finish(&self, req: Request, status: u8, used: u64);
}

/// One request in the ring.
struct InFlight {
    req: Request,
    gen: u32,
    op: UringOp,
    fd: RawFd,
    /// The request's buffers as iovecs; `next` is the first not fully
    /// transferred. Read by the kernel while an I/O operation is out.
    iov: Vec<libc::iovec>,
    next: usize,
    offset: u64,
    /// The delay's timespec, read by the kernel while the delay is out.
    delay: Box<types::Timespec>,
    io_out: bool,
    delay_out: bool,
    /// Status decided before the I/O finished (injected failure, error).
    status: Option<u8>,
    cancel_sent: bool,
}

impl InFlight {
    /// Moves past `n` transferred bytes.
    fn advance(&mut self, mut n: usize) {
        self.offset += n as u64;
        while n > 0 && self.next < self.iov.len() {
            let v = &mut self.iov[self.next];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.next += 1;
            } else {
                // SAFETY: advancing inside the same buffer (n < iov_len).
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// The I/O operation for what is left (at most `MAX_IOVECS` iovecs).
    fn io_entry(&self, slot: u16) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let ud = user_data(self.gen, slot, TAG_IO);
        let rest = &self.iov[self.next..];
        let n = rest.len().min(MAX_IOVECS) as u32;
        match self.op {
            UringOp::Read => opcode::Readv::new(fd, rest.as_ptr(), n)
                .offset(self.offset)
                .build(),
            UringOp::Write => opcode::Writev::new(fd, rest.as_ptr(), n)
                .offset(self.offset)
                .build(),
            UringOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(ud)
    }
}

/// The ring of one queue and the requests in it.
pub(super) struct UringQueue {
    ring: IoUring,
    /// Registered with the ring: readable when completions are posted.
    completions: EventFd,
    /// Written by the revoke hooks of this queue's requests.
    cancels: Arc<EventFd>,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    gen: u32,
    in_flight: usize,
}

// SAFETY: the raw pointers inside (the iovecs of requests in flight) name
// guest memory that every device thread may access, as `HostBuf` does (see
// its `Send`), and only the thread that owns the queue touches them.
unsafe impl Send for UringQueue {}

/// The operations this engine submits.
const NEEDED_OPS: [u8; 5] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Timeout::CODE,
    opcode::AsyncCancel::CODE,
];

impl UringQueue {
    /// A ring for a queue of `queue_size` descriptors (at most that many
    /// requests in flight, each with up to three operations). Fails when
    /// the kernel has no usable io_uring (too old, disabled by sysctl or a
    /// seccomp filter): the device then uses its worker threads.
    pub fn new(queue_size: u16) -> std::io::Result<Self> {
        let entries = (4 * u32::from(queue_size))
            .next_power_of_two()
            .clamp(8, 4096);
        let ring = IoUring::new(entries)?;
        // IORING_TIMEOUT_ETIME_SUCCESS (5.16) has no probe bit; CQE_SKIP
        // came one release later, so it stands for "new enough".
        if !ring.params().is_feature_skip_cqe_on_success() {
            return Err(std::io::Error::other("io_uring: needs Linux 5.17 or later"));
        }
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if let Some(op) = NEEDED_OPS.iter().find(|&&op| !probe.is_supported(op)) {
            return Err(std::io::Error::other(format!(
                "io_uring: opcode {op} not supported"
            )));
        }
        let completions = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        let slots = usize::from(queue_size);
        Ok(UringQueue {
            ring,
            completions,
            cancels: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots as u16).rev().collect(),
            gen: 0,
            in_flight: 0,
        })
    }

    /// Readable when operations have completed (for the queue's epoll).
    pub fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Readable when a request was cancelled (for the queue's epoll).
    pub fn cancel_fd(&self) -> RawFd {
        self.cancels.as_raw_fd()
    }

    /// What the requests' cancellations write (see `Cancel::with_waker`).
    pub fn cancel_waker(&self) -> Arc<EventFd> {
        self.cancels.clone()
    }

    /// Requests submitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `req`: finishes it at once when there is nothing to submit,
    /// runs it on this thread when io_uring cannot take it, submits its
    /// operations otherwise (call [`UringQueue::submit`] after a batch).
    pub fn start(&mut self, backend: &Backend, req: Request, done: &dyn Finish) {
        let (plan, fail) = backend.uring_plan(&req);
        let (delay, fail, op, fd) = match plan {
            UringPlan::Done(status, used) => return done.finish(req, status, used),
            UringPlan::Blocking => {
                let (status, used) = backend.execute_admitted(&req, fail);
                return done.finish(req, status, used);
            }
            UringPlan::Submit {
                delay,
                fail,
                op,
                fd,
            } => (delay, fail, op, fd),
        };
        // At most queue_size requests are popped and not finished, one per
        // descriptor chain, so a slot is free.
        let Some(slot) = self.free.pop() else {
            log::error!("virtio-blk: io_uring: no free slot (more requests than descriptors)");
            return done.finish(req, VIRTIO_BLK_S_IOERR, 0);
        };
        self.gen = self.gen.wrapping_add(1);
        let iov = req
            .data
            .iter()
            .map(|b: &HostBuf| libc::iovec {
                iov_base: b.ptr.cast(),
                iov_len: b.len,
            })
            .collect();
        let f = InFlight {
            offset: req.sector * super::request::SECTOR,
            req,
            gen: self.gen,
            op,
            fd,
            iov,
            next: 0,
            delay: Box::new(types::Timespec::from(delay)),
            io_out: !fail,
            delay_out: !delay.is_zero(),
            status: fail.then_some(VIRTIO_BLK_S_IOERR),
            cancel_sent: false,
        };
        let mut entries = Vec::with_capacity(2);
        if f.delay_out {
            let mut e = opcode::Timeout::new(&*f.delay)
                .flags(types::TimeoutFlags::ETIME_SUCCESS)
                .build()
                .user_data(user_data(f.gen, slot, TAG_DELAY));
            if f.io_out {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            entries.push(e);
        }
        if f.io_out {
            entries.push(f.io_entry(slot));
        }
        self.slots[usize::from(slot)] = Some(f);
        self.in_flight += 1;
        self.push(&entries);
    }

    /// Queues `entries` in the submission ring, together (a link must not
    /// be split across two submissions), making room first if needed.
    fn push(&mut self, entries: &[squeue::Entry]) {
        loop {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                for e in entries {
                    // SAFETY: every pointer in the entries (iovecs and the
                    // buffers they name, the timespec) belongs to a slot
                    // that is freed only after the operation's completion
                    // is reaped, and the guest memory behind the buffers
                    // stays mapped and pinned until then (see `InFlight`).
                    unsafe { sq.push(e) }.expect("room was checked");
                }
                return;
            }
            drop(sq);
            self.submit();
        }
    }

    /// Hands the queued operations to the kernel.
    pub fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion ring is full: the kernel wants it read
                // first. Completions are posted there or in the kernel's
                // overflow list, never lost (IORING_FEAT_NODROP); the
                // entries stay queued and go with the next submit.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return;
                }
                Err(e) => {
                    log::error!("virtio-blk: io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// Submits `IORING_OP_ASYNC_CANCEL` for the operations of every
    /// cancelled request (their pins' revoke hook fired).
    pub fn cancel_revoked(&mut self) {
        let _ = self.cancels.read();
        let mut entries = Vec::new();
        for (slot, f) in self.slots.iter_mut().enumerate() {
            let Some(f) = f else { continue };
            if f.cancel_sent || !f.req.cancel.is_cancelled() {
                continue;
            }
            f.cancel_sent = true;
            let slot = slot as u16;
            for (out, tag) in [(f.delay_out, TAG_DELAY), (f.io_out, TAG_IO)] {
                if out {
                    entries.push(
                        opcode::AsyncCancel::new(user_data(f.gen, slot, tag))
                            .build()
                            .user_data(user_data(f.gen, slot, TAG_CANCEL)),
                    );
                }
            }
        }
        for e in entries {
            self.push(std::slice::from_ref(&e));
        }
        self.submit();
    }

    /// Reaps every posted completion, finishing the requests whose last
    /// operation it was and resubmitting the rest of short transfers.
    pub fn reap(&mut self, done: &dyn Finish) {
        let _ = self.completions.read();
        loop {
            let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
            if cqes.is_empty() {
                break;
            }
            for c in cqes {
                self.on_completion(c.user_data(), c.result(), done);
            }
            // Resubmissions of short transfers.
            self.submit();
        }
    }

    fn on_completion(&mut self, ud: u64, res: i32, done: &dyn Finish) {
        let (gen, slot, tag) = decode(ud);
        if tag == TAG_CANCEL {
            // -ENOENT/-EALREADY: the operation had finished or is running
            // and ends when its I/O returns; nothing to do either way.
            return;
        }
        let Some(f) = self
            .slots
            .get_mut(usize::from(slot))
            .and_then(|s| s.as_mut())
            .filter(|f| f.gen == gen)
        else {
            log::error!("virtio-blk: io_uring: completion for no request ({ud:#x})");
            return;
        };
        if tag == TAG_DELAY {
            f.delay_out = false;
        } else {
            f.io_out = false;
            let cancelled = f.req.cancel.is_cancelled();
            if res < 0 {
                let e = -res;
                if (e == libc::EAGAIN || e == libc::EINTR) && !cancelled {
                    f.io_out = true;
                    let e = f.io_entry(slot);
                    self.push(std::slice::from_ref(&e));
                    return;
                }
                if e != libc::ECANCELED {
                    log::warn!(
                        "virtio-blk: {:?} at sector {}: {}",
                        f.op,
                        f.req.sector,
                        std::io::Error::from_raw_os_error(e)
                    );
                }
                f.status.get_or_insert(VIRTIO_BLK_S_IOERR);
            } else if f.op != UringOp::Flush {
                f.advance(res as usize);
                if res == 0 {
                    // The parser checked the range against the capacity:
                    // the image shrank under the VMM.
                    log::warn!(
                        "virtio-blk: {:?} at sector {}: end of file",
                        f.op,
                        f.req.sector
                    );
                    f.status.get_or_insert(VIRTIO_BLK_S_IOERR);
                } else if f.next < f.iov.len() && !cancelled {
                    f.io_out = true;
                    let e = f.io_entry(slot);
                    self.push(std::slice::from_ref(&e));
                    return;
                }
            }
        }
        if f.io_out || f.delay_out {
            return;
        }
        let f = self.slots[usize::from(slot)].take().expect("checked above");
        self.free.push(slot);
        self.in_flight -= 1;
        let status = if f.req.cancel.is_cancelled() {
            VIRTIO_BLK_S_IOERR
        } else {
            f.status.unwrap_or(VIRTIO_BLK_S_OK)
        };
        let used = if status == VIRTIO_BLK_S_OK && f.op == UringOp::Read {
            f.req.data_len
        } else {
            0
        };
        done.finish(f.req, status, used);
    }

    /// Waits until every submitted request has finished (bounded by the
    /// I/O itself: revocations are still served, so a cancelled request
    /// ends as soon as the kernel lets its operations go).
    pub fn wait_all(&mut self, done: &dyn Finish) {
        self.submit();
        while self.in_flight > 0 {
            let mut fds =
                [self.completions.as_raw_fd(), self.cancels.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: poll on two live descriptors, writing only `revents`
            // in the array it is given.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if fds[1].revents != 0 {
                self.cancel_revoked();
            }
            self.reap(done);
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // Closing the ring would leave running operations writing into
        // buffers whose pins this drop releases: wait for them instead.
        struct Discard;
        impl Finish for Discard {
            fn finish(&self, _: Request, _: u8, _: u64) {}
        }
        log::warn!(
            "virtio-blk: io_uring dropped with {} requests in flight; waiting",
            self.in_flight
        );
        self.wait_all(&Discard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;
    use crate::virtio::block::request::{Cancel, Kind};
    use std::cell::RefCell;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Collect(RefCell<Vec<(u8, u64)>>);
    impl Finish for Collect {
        fn finish(&self, _: Request, status: u8, used: u64) {
            self.0.borrow_mut().push((status, used));
        }
    }

    fn image(name: &str, len: usize, extra: &str) -> (std::path::PathBuf, Backend) {
        let path = std::env::temp_dir().join(format!("vmm-uring-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let mut cfg = DiskConfig {
            path: path.clone(),
            ..Default::default()
        };
        for kv in extra.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap();
            match k {
                "delay_us" => cfg.delay_us = v.parse().unwrap(),
                "fail_every" => cfg.fail_every = v.parse().unwrap(),
                "stall_at" => cfg.stall_at = Some(v.parse().unwrap()),
                _ => unreachable!(),
            }
        }
        (path, Backend::open(&cfg).unwrap())
    }

    fn ring() -> Option<UringQueue> {
        match UringQueue::new(256) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("SKIP: io_uring unavailable here: {e}");
                None
            }
        }
    }

    fn request(kind: Kind, sector: u64, bufs: &mut [Vec<u8>], status: &mut u8) -> Request {
        let data = bufs.iter_mut().map(|b| HostBuf::over(b)).collect();
        let status = HostBuf::over(std::slice::from_mut(status));
        Request::unpinned(kind, sector, data, status, Arc::new(Cancel::default()))
    }

    fn run_until_idle(r: &mut UringQueue, done: &Collect) {
        r.wait_all(done);
    }

    #[test]
    fn writes_and_reads_back_more_iovecs_than_one_submission_takes() {
        let Some(mut r) = ring() else { return };
        let (path, be) = image("rw", 1 << 20, "");
        let done = Collect::default();
        let n = MAX_IOVECS + 300;
        let mut src: Vec<Vec<u8>> = (0..n).map(|i| vec![(i % 251) as u8; 512]).collect();
        let mut st = 0xff;
        r.start(&be, request(Kind::Out, 8, &mut src, &mut st), &done);
        run_until_idle(&mut r, &done);
        let mut dst: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 512]).collect();
        r.start(&be, request(Kind::In, 8, &mut dst, &mut st), &done);
        run_until_idle(&mut r, &done);
        let mut flush_st = 0xff;
        r.start(&be, request(Kind::Flush, 0, &mut [], &mut flush_st), &done);
        run_until_idle(&mut r, &done);
        assert_eq!(
            *done.0.borrow(),
            vec![
                (VIRTIO_BLK_S_OK, 0),
                (VIRTIO_BLK_S_OK, (n * 512) as u64),
                (VIRTIO_BLK_S_OK, 0)
            ]
        );
        assert_eq!(src, dst);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_injected_delay_holds_the_io_and_a_cancel_cuts_it_short() {
        let Some(mut r) = ring() else { return };
        // 100 ms: the linked timeout holds the read back that long.
        let (path, be) = image("delay", 1 << 16, "delay_us=100000");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let done = Collect::default();
        let mut buf = [vec![0u8; 4096]];
        let mut st = 0xff;
        let t = Instant::now();
        r.start(&be, request(Kind::In, 0, &mut buf, &mut st), &done);
        run_until_idle(&mut r, &done);
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(*done.0.borrow(), vec![(VIRTIO_BLK_S_OK, 4096)]);
        assert!(buf[0].iter().all(|&b| b == 7));

        // 60 s, revoked after 50 ms: ASYNC_CANCEL ends the delay and the
        // read linked to it; the request completes with IOERR and no data.
        let (path2, slow) = image("cancel", 1 << 16, "delay_us=60000000");
        std::fs::write(&path2, vec![9u8; 1 << 16]).unwrap();
        let mut buf = [vec![0u8; 4096]];
        let req = Request::unpinned(
            Kind::In,
            0,
            buf.iter_mut().map(|b| HostBuf::over(b)).collect(),
            HostBuf::over(std::slice::from_mut(&mut st)),
            Arc::new(Cancel::with_waker(Some(r.cancel_waker()))),
        );
        let cancel = req.cancel.clone();
        r.start(&slow, req, &done);
        r.submit();
        let t = Instant::now();
        let revoker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            cancel.cancel();
        });
        r.wait_all(&done);
        revoker.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert_eq!(done.0.borrow()[1], (VIRTIO_BLK_S_IOERR, 0));
        assert!(buf[0].iter().all(|&b| b == 0), "no data after a cancel");
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&path2).unwrap();
    }

    #[test]
    fn fail_every_fails_exactly_those_requests() {
        let Some(mut r) = ring() else { return };
        let (path, be) = image("fail", 1 << 16, "fail_every=3");
        let done = Collect::default();
        for i in 0..6u64 {
            let mut buf = vec![vec![0u8; 512]];
            let mut st = 0xff;
            r.start(&be, request(Kind::In, i, &mut buf, &mut st), &done);
            run_until_idle(&mut r, &done);
        }
        let statuses: Vec<u8> = done.0.borrow().iter().map(|s| s.0).collect();
        assert_eq!(statuses, [0, 0, 1, 0, 0, 1]);
        std::fs::remove_file(&path).unwrap();
    }
}
