//! virtio-blk request parsing: a descriptor chain becomes a [`Request`]
//! whose buffers are resolved to host memory and, behind the IOMMU,
//! pinned until the request is complete.
//!
//! Every (address, length) in a chain is the guest's: each is checked for
//! wrap-around before any arithmetic, and the header is read through the
//! queue's memory view (pinned for the read when the disk is behind the
//! IOMMU).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_iommu::{EndpointHandle, Pin, PinWrite};
use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::lock;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Request header: type, reserved, sector.
const HEADER_LEN: usize = 16;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// A host buffer: guest memory behind a request, or a bounce buffer.
#[derive(Clone, Copy, Debug)]
pub struct HostBuf {
    /// Host address.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a HostBuf points into guest memory mapped by the GuestMemoryMmap
// that the device (and every worker) holds a clone of, so the mapping
// outlives it; concurrent guest access to the same bytes is inherent to DMA
// and only ever done through volatile/raw copies, never references.
unsafe impl Send for HostBuf {}

impl HostBuf {
    /// A buffer over host-owned `bytes` (a bounce buffer, a test's
    /// vector); the caller keeps them alive while the buffer is used.
    pub fn over(bytes: &mut [u8]) -> Self {
        HostBuf {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
        }
    }
}

/// Cancellation of one request, set by its pins' revoke hook.
#[derive(Default)]
pub struct Cancel {
    cancelled: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    /// Told when the request is cancelled: the io_uring queue thread,
    /// which then cancels the request's operations in the kernel.
    waker: Option<Arc<EventFd>>,
}

impl Cancel {
    /// A cancellation that also writes `waker` when it happens.
    pub fn with_waker(waker: Option<Arc<EventFd>>) -> Self {
        Cancel {
            waker,
            ..Default::default()
        }
    }

    /// Cancels the request (the IOMMU waited past its grace period).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
        if let Some(w) = &self.waker {
            // An eventfd write fails only when its counter would overflow,
            // and then the reader is already due to wake.
            let _ = w.write(1);
        }
    }

    /// Whether the request was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Sleeps for `d` unless cancelled first.
    pub fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        let mut g = lock(&self.lock);
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
pub enum Kind {
    /// Read from the disk.
    In,
    /// Write to the disk.
    Out,
    /// Flush.
    Flush,
    /// Device ID string.
    GetId,
    /// Anything else.
    Unsupported,
}

/// A parsed request, its buffers resolved to host memory and pinned.
pub struct Request {
    /// Head of its chain.
    pub head: u16,
    /// What it asks for.
    pub kind: Kind,
    /// First sector.
    pub sector: u64,
    /// Data buffers.
    pub data: Vec<HostBuf>,
    /// Their total length.
    pub data_len: u64,
    /// The status byte.
    pub status: HostBuf,
    /// Status decided at parse time (bad range, read-only), if any.
    pub early_status: Option<u8>,
    /// Set by the pins' revoke hook.
    pub cancel: Arc<Cancel>,
    /// Held until the used entry is published; dropping them lets a
    /// waiting invalidation reply.
    _pins: Vec<Pin>,
}

impl Request {
    /// Opens the write section in which the status byte may be written:
    /// `Some` holding the status pin's section (nothing to hold for a
    /// request outside the IOMMU), or `None` once a fence has claimed or
    /// marked that pin (`virtio_iommu::Pin::write_section`): the page at
    /// the status byte's address is no longer the one the device pinned,
    /// and the device must not write the status byte, nor publish a used
    /// entry whose status the guest cannot see.
    pub fn status_section(&self) -> Option<Option<PinWrite<'_>>> {
        // The status byte is resolved (and pinned) first.
        match self._pins.first() {
            None => Some(None),
            Some(p) => p.write_section().map(Some),
        }
    }

    /// Runs `copy` (a write into the request's buffers through the guest's
    /// address space) inside a write section of every pin, so that a fence
    /// waits for it or it does not run at all (`None`: a fence claimed or
    /// marked one of the pins).
    pub fn write_sections<R>(&self, copy: impl FnOnce() -> R) -> Option<R> {
        let sections: Option<Vec<PinWrite<'_>>> =
            self._pins.iter().map(Pin::write_section).collect();
        sections.map(|_open| copy())
    }

    /// Whether a fence took pages of any of the request's buffers: its data
    /// went (or goes) to pages the guest no longer sees, so the request can
    /// only fail.
    pub fn any_fenced(&self) -> bool {
        self._pins.iter().any(Pin::fenced)
    }
}

#[cfg(test)]
impl Request {
    /// A request over host buffers, with nothing pinned (unit tests of
    /// the backends).
    pub fn unpinned(
        kind: Kind,
        sector: u64,
        data: Vec<HostBuf>,
        status: HostBuf,
        cancel: Arc<Cancel>,
    ) -> Self {
        let data_len = data.iter().map(|b| b.len as u64).sum();
        Request {
            head: 0,
            kind,
            sector,
            data,
            data_len,
            status,
            early_status: None,
            cancel,
            _pins: Vec::new(),
        }
    }
}

/// Why a chain could not become a request (it is returned with used
/// length 0).
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No room for a status byte.
    NoStatus,
    /// A descriptor wraps around the address space.
    Wraps,
    /// The header or the status byte could not be translated or is
    /// outside RAM.
    BadBuffer,
}

/// What parsing needs to know about the disk.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Writes are refused.
    pub readonly: bool,
}

/// Where a request's buffers live: guest-physical memory, reached through
/// the IOMMU endpoint when the disk is behind it.
pub struct Buffers<'a> {
    /// Guest-physical memory (host pointers come from here).
    pub phys: &'a GuestMemoryMmap,
    /// The IOMMU endpoint, for `iommu=on` disks.
    pub endpoint: Option<&'a EndpointHandle>,
    /// Written when a request is cancelled (see [`Cancel::with_waker`]).
    pub cancel_waker: Option<&'a Arc<EventFd>>,
}

impl Buffers<'_> {
    /// Translates (and pins, behind the IOMMU) `[addr, addr + len)` for
    /// `access`; appends the host buffers covering it.
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
        let gpas: Vec<(u64, u64)> = match self.endpoint {
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
            for s in GuestMemoryBackend::get_slices(self.phys, GuestAddress(gpa), len) {
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
}

/// Turns a chain into a request: reads the header through `mem` (the
/// queue's view of memory), pins the buffers through `bufs`.
pub fn parse<D>(
    chain: DescriptorChain<D>,
    bufs: &Buffers<'_>,
    disk: Geometry,
) -> Result<Request, (u16, ParseError)>
where
    D: std::ops::Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    // The memory the chain was popped through (kept by a clone: the
    // chain itself is consumed by the walk).
    let view = chain.clone();
    let mem = view.memory();
    let mut readable: Vec<(u64, u64)> = Vec::new();
    let mut writable: Vec<(u64, u64)> = Vec::new();
    for d in chain {
        let len = u64::from(d.len());
        if len == 0 {
            continue;
        }
        // Guest-chosen: no descriptor may wrap (all later arithmetic on
        // these ranges stays inside them).
        if d.addr().0.checked_add(len - 1).is_none() {
            return Err((head, ParseError::Wraps));
        }
        if d.is_write_only() {
            writable.push((d.addr().0, len));
        } else {
            readable.push((d.addr().0, len));
        }
    }
    // The status byte is the last writable byte (any framing is fine).
    let Some(last) = writable.last_mut() else {
        return Err((head, ParseError::NoStatus));
    };
    let status_addr = last.0 + (last.1 - 1);
    last.1 -= 1;
    if last.1 == 0 {
        writable.pop();
    }

    // The header: the first 16 readable bytes.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let Some(first) = readable.first_mut() else {
            return Err((head, ParseError::BadBuffer));
        };
        let n = (HEADER_LEN - got).min(first.1 as usize);
        mem.read_slice(&mut header[got..got + n], GuestAddress(first.0))
            .map_err(|_| (head, ParseError::BadBuffer))?;
        got += n;
        first.0 += n as u64;
        first.1 -= n as u64;
        if first.1 == 0 {
            readable.remove(0);
        }
    }
    let type_ = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let kind = match type_ {
        VIRTIO_BLK_T_IN => Kind::In,
        VIRTIO_BLK_T_OUT => Kind::Out,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        _ => Kind::Unsupported,
    };

    let cancel = Arc::new(Cancel::with_waker(bufs.cancel_waker.cloned()));
    let mut pins = Vec::new();
    let mut status = Vec::with_capacity(1);
    bufs.resolve(
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
            data_len = data_len.saturating_add(len);
            if bufs
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
        if !data_len.is_multiple_of(SECTOR) || end.is_none_or(|e| e > disk.capacity) {
            early_status = Some(VIRTIO_BLK_S_IOERR);
        }
        if kind == Kind::Out && disk.readonly {
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
}
