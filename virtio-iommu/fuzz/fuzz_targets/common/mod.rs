//! Shared by the fuzz targets: a byte reader that turns the input into
//! decisions, and a device "world" (device, guest memory, virtqueues) that
//! is built once per process and reset between inputs instead of rebuilt.
//!
//! # Why and how the world is reused
//!
//! Building a world per input cost more than the input itself: a 16 MiB
//! mmap and munmap, two eventfds, the queue drivers' tables, and page
//! faults on every page touched. [`World::reset`] brings the world back to
//! the state [`World::new`] left it in, so that an input behaves the same
//! whether it runs first in a fresh process (as when a crash is reproduced
//! from its file alone) or after a million others:
//!
//! - the device gets a system reset (every endpoint detached, every domain
//!   and mapping removed, the parked request forgotten, the fault queue
//!   emptied, `bypass` back to its configured value), which must complete
//!   at once: the caller has dropped every pin and lease first, so no
//!   drain can still wait; then all features are acknowledged again;
//! - guest memory is zeroed where it was written: it carries a dirty
//!   bitmap (vm-memory's `AtomicBitmap`, one bit per 4 KiB page), which
//!   every write through vm-memory marks, the device's and the driver's
//!   alike, so a reset costs only the pages an input wrote (`new` checks
//!   once that a reset leaves all of memory zero);
//! - both virtqueues are emptied: the driver side in place, the device
//!   side rebuilt;
//! - both eventfds are read to zero.
//!
//! What a reset does not return to its initial value, none of it visible
//! to the guest or to a translation:
//!
//! - the metrics counters (monotonic; nothing reads them back to decide);
//! - internal serial numbers (domain `uid`s, pin and lease serials), which
//!   only need to be unique;
//! - the capacity (not the contents) of internal tables, and which slot of
//!   an endpoint's pin table a pin gets;
//! - each endpoint's "IOTLB was used" flag, which lets an invalidation skip
//!   an IOTLB that was never filled. [`World::new`] fills every endpoint's
//!   IOTLB once before the first input, so the flag is set for every
//!   input, the first one included;
//! - each endpoint's count of IOTLB fills, after 4096 of which the IOTLB
//!   (the `vm_memory::Iommu` path's cache, empty after a reset) is emptied
//!   and refilled on demand: the same translations, but an input may see
//!   that happen at another of its fills than in a fresh process.

#![allow(dead_code)]

use virtio_iommu::protocol::CONFIG_BYPASS_OFFSET;
use virtio_iommu::testing::{Buf, BUF_BASE, MEM_SIZE};
use virtio_iommu::{EndpointHandle, EndpointOptions, IommuConfig, ReservedRegion, VirtioIommu};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion, Permissions,
};

/// Guest memory with a dirty bitmap, so that a reset zeroes only what an
/// input wrote.
pub type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Reads decisions from the fuzzer's bytes; `None` once they run out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    pub fn bool(&mut self) -> Option<bool> {
        Some(self.u8()? & 1 != 0)
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | u32::from(self.u16()?) << 16)
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from(self.u32()?) | u64::from(self.u32()?) << 32)
    }
    /// An address: low, or within 64 KiB of the top of the space.
    pub fn addr(&mut self) -> Option<u64> {
        let v = u64::from(self.u16()?);
        Some(if self.u8()? & 1 == 0 {
            v << 8
        } else {
            u64::MAX - v
        })
    }
    /// A length: small, or any 64-bit value.
    pub fn len(&mut self) -> Option<u64> {
        Some(if self.u8()? & 1 == 0 {
            u64::from(self.u16()?)
        } else {
            self.u64()?
        })
    }
    /// Read, Write or ReadWrite.
    pub fn access(&mut self) -> Option<Permissions> {
        Some(match self.u8()? % 3 {
            0 => Permissions::Read,
            1 => Permissions::Write,
            _ => Permissions::ReadWrite,
        })
    }
    /// Up to `n` bytes (fewer when the input runs out).
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Guest address of the request queue (256 entries).
pub const REQ_QUEUE: u64 = 0;
/// Guest address of the event queue (64 entries).
pub const EV_QUEUE: u64 = 0x8000;
/// First guest address of the request slots of [`World::post`].
pub const SLOTS: u64 = BUF_BASE + 0x2_0000;
/// Number of request slots.
pub const NUM_SLOTS: u64 = 64;
/// End of what the harness uses in guest memory: rings, seed buffers,
/// request slots.
pub const BUF_END: u64 = SLOTS + NUM_SLOTS * 0x200;
/// Most buffers in one chain a [`Driver`] makes available.
pub const MAX_CHAIN: usize = 8;

/// The driver side of a split virtqueue, like `virtio_iommu::testing::
/// TestDriver` (same layout, same descriptor recycling, so the same inputs
/// make the same rings), but reset in place without allocating, and
/// writing its rings directly instead of through a guest memory lookup per
/// access (those lookups were a tenth of `request_queue`'s time).
///
/// It lives inside a [`World`], which owns the memory its pointer points
/// into; only the world's methods reach it.
pub struct Driver {
    size: u16,
    /// Host address of the descriptor table; the available and used rings
    /// follow at `avail` and `used` bytes from it.
    host: *mut u8,
    /// Bytes from the descriptor table to the end of the used ring.
    footprint: usize,
    avail: usize,
    used: usize,
    desc_gpa: u64,
    avail_idx: u16,
    used_idx: u16,
    free: Vec<u16>,
    chains: Vec<(u8, [u16; MAX_CHAIN])>,
}

impl Driver {
    /// A queue of `size` (a power of two) at guest address `base` of
    /// `mem`, whose rings must be zero.
    ///
    /// # Safety
    ///
    /// The driver must not be used after `mem` is dropped: it keeps a
    /// pointer into `mem`'s mapping.
    unsafe fn new(mem: &Mem, base: u64, size: u16) -> Self {
        let avail = 16 * usize::from(size);
        let used = (avail + 6 + 2 * usize::from(size) + 4095) & !4095;
        let footprint = used + 6 + 8 * usize::from(size);
        // One slice over the whole queue: it lies in one region.
        let host = mem
            .get_slice(GuestAddress(base), footprint)
            .expect("the queue lies in one region")
            .ptr_guard_mut()
            .as_ptr();
        let mut d = Driver {
            size,
            host,
            footprint,
            avail,
            used,
            desc_gpa: base,
            avail_idx: 0,
            used_idx: 0,
            free: Vec::with_capacity(usize::from(size)),
            chains: vec![(0, [0; MAX_CHAIN]); usize::from(size)],
        };
        d.reset();
        d
    }

    /// Zeroes the rings and empties the queue.
    fn reset(&mut self) {
        // SAFETY: `host..host + footprint` is inside the mapping that `new`
        // took it from, which outlives `self` (`new`'s contract). Nothing
        // else runs on the rings while the harness runs this.
        unsafe { std::ptr::write_bytes(self.host, 0, self.footprint) };
        self.avail_idx = 0;
        self.used_idx = 0;
        self.free.clear();
        self.free.extend((0..self.size).rev());
    }

    /// Copies `bytes` to `offset` in the queue's memory.
    fn put(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.footprint, "outside the queue");
        // SAFETY: in bounds of the queue's memory (checked above), which
        // outlives `self` (`new`'s contract); the device only touches the
        // rings while the harness waits in `process_requests`, so nothing
        // writes them concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host.add(offset), bytes.len())
        };
    }

    /// Reads `N` bytes at `offset` in the queue's memory.
    fn get<const N: usize>(&self, offset: usize) -> [u8; N] {
        assert!(offset + N <= self.footprint, "outside the queue");
        let mut out = [0u8; N];
        // SAFETY: as in `put`.
        unsafe { std::ptr::copy_nonoverlapping(self.host.add(offset), out.as_mut_ptr(), N) };
        out
    }

    /// A device-side queue configured for this driver.
    fn queue(&self) -> Queue {
        let (desc, avail, used) = (
            self.desc_gpa,
            self.desc_gpa + self.avail as u64,
            self.desc_gpa + self.used as u64,
        );
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes a chain of 1..=MAX_CHAIN buffers available; returns its head,
    /// or `None` when the descriptor table is full.
    fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        assert!(bufs.len() <= MAX_CHAIN, "chain too long for the driver");
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let mut idx = [0u16; MAX_CHAIN];
        for i in idx.iter_mut().take(bufs.len()) {
            *i = self.free.pop().expect("checked");
        }
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { 2u16 } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= 1;
                idx[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&b.addr.0.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.put(16 * usize::from(idx[i]), &d);
        }
        let head = idx[0];
        self.chains[usize::from(head)] = (bufs.len() as u8, idx);
        let slot = usize::from(self.avail_idx % self.size);
        self.put(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index after the entry, as a driver must publish it (the
        // device reads the ring only inside `process_requests`).
        self.put(self.avail + 2, &self.avail_idx.to_le_bytes());
        Some(head)
    }

    /// Takes the next used entry: (head, used length).
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        let dev_idx = u16::from_le_bytes(self.get(self.used + 2));
        if dev_idx == self.used_idx {
            return None;
        }
        let slot = usize::from(self.used_idx % self.size);
        let elem = u64::from_le_bytes(self.get(self.used + 4 + 8 * slot));
        let (head, len) = (elem as u16, (elem >> 32) as u32);
        self.used_idx = self.used_idx.wrapping_add(1);
        let (n, idx) = self.chains[usize::from(head)];
        self.free.extend(idx[..usize::from(n)].iter().rev());
        Some((head, len))
    }
}

/// A device with its guest memory and virtqueues, reused across inputs.
pub struct World {
    /// Guest memory (`MEM_SIZE` bytes at 0).
    pub mem: Mem,
    /// The device under test, all features acknowledged.
    pub dev: VirtioIommu,
    /// Request queue, device side.
    pub reqq: Queue,
    /// Request queue, driver side ([`World::add_req`], [`World::pop_req`]).
    req: Driver,
    /// Event queue, device side.
    pub evq: Queue,
    /// Event queue, driver side ([`World::add_ev`], [`World::pop_ev`]).
    ev: Driver,
    /// Handles of the registered endpoints, in registration order.
    pub eps: Vec<EndpointHandle>,
}

impl World {
    /// Builds a device with `config` and registers `endpoints` (ID and
    /// endpoint-specific reserved regions).
    pub fn new(config: IommuConfig, endpoints: &[(u32, Vec<ReservedRegion>)]) -> Self {
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut dev = VirtioIommu::new(config).unwrap();
        dev.ack_features(dev.device_features());
        let eps = endpoints
            .iter()
            .map(|(id, regions)| {
                dev.add_endpoint_with(
                    *id,
                    EndpointOptions {
                        mapper: None,
                        reserved_regions: regions.clone(),
                    },
                )
                .expect("endpoint registers")
            })
            .collect::<Vec<_>>();
        // Fill every IOTLB once, through the global bypass (see the module
        // documentation); the reset below empties them again.
        dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
        for ep in &eps {
            vm_memory::Iommu::translate(ep, GuestAddress(0), 1, Permissions::Read)
                .expect("identity translation through the global bypass");
        }
        dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
        // SAFETY: the drivers live in the world beside `mem`, are reached
        // only through its methods, and never outlive it.
        let (req, ev) = unsafe {
            (
                Driver::new(&mem, REQ_QUEUE, 256),
                Driver::new(&mem, EV_QUEUE, 64),
            )
        };
        assert!(
            REQ_QUEUE + req.footprint as u64 <= EV_QUEUE,
            "the request queue's rings end before the event queue's"
        );
        let mut w = World {
            reqq: req.queue(),
            evq: ev.queue(),
            mem,
            dev,
            req,
            ev,
            eps,
        };
        // The reset zeroes what the dirty bitmap says was written: check
        // once that it leaves all of memory zero.
        for at in [0, BUF_BASE + 5, MEM_SIZE as u64 - 1] {
            w.mem.write_obj(0xa5u8, GuestAddress(at)).unwrap();
        }
        w.reset();
        let mut page = vec![0u8; PAGE];
        for at in (0..MEM_SIZE).step_by(PAGE) {
            w.mem
                .read_slice(&mut page, GuestAddress(at as u64))
                .unwrap();
            assert!(page[..] == ZERO_PAGE[..], "page {at:#x} not zeroed");
        }
        w
    }

    /// Returns the world to the state `new` left it in. The caller must
    /// have dropped every pin and lease it took: the reset must complete
    /// at once.
    pub fn reset(&mut self) {
        let dev = &mut self.dev;
        assert!(
            dev.system_reset(),
            "a reset with no pins or leases held completes at once"
        );
        dev.ack_features(dev.device_features());
        let _ = dev.drain_eventfd().read();
        let _ = dev.fault_eventfd().read();
        assert_eq!(dev.address_space().domain_count(), 0);
        assert_eq!(dev.address_space().mapping_count(), 0);
        assert_eq!(dev.pending_faults(), 0);
        assert!(dev.parked_drain().is_none());
        for ep in &self.eps {
            assert_eq!(ep.pins_in_flight(), 0);
        }
        zero(&self.mem);
        self.reset_queues();
    }

    /// Empties both virtqueues, as a driver does after a device reset:
    /// zeroes their rings and rebuilds both sides.
    pub fn reset_queues(&mut self) {
        self.req.reset();
        self.ev.reset();
        self.reqq = self.req.queue();
        self.evq = self.ev.queue();
    }

    /// Makes a chain available on the request queue (without processing
    /// it); returns its head, or `None` when the descriptor table is full.
    pub fn add_req(&mut self, bufs: &[Buf]) -> Option<u16> {
        self.req.add(bufs)
    }

    /// Takes the request queue's next used entry: (head, used length).
    pub fn pop_req(&mut self) -> Option<(u16, u32)> {
        self.req.pop_used()
    }

    /// Makes a chain available on the event queue.
    pub fn add_ev(&mut self, bufs: &[Buf]) -> Option<u16> {
        self.ev.add(bufs)
    }

    /// Takes the event queue's next used entry: (head, used length).
    pub fn pop_ev(&mut self) -> Option<(u16, u32)> {
        self.ev.pop_used()
    }

    /// Writes a request (`req`: head and body) and a 4-byte tail (0xee
    /// until the device replies) into slot `slot % NUM_SLOTS` and makes
    /// the chain available without processing the queue. Returns the
    /// chain's head, or `None` when the descriptor table is full.
    pub fn post(&mut self, slot: u64, req: &[u8]) -> Option<u16> {
        let r = GuestAddress(SLOTS + (slot % NUM_SLOTS) * 0x200);
        let w = Self::tail(slot);
        self.mem.write_slice(req, r).unwrap();
        self.mem.write_slice(&[0xee; 4], w).unwrap();
        self.req.add(&[
            Buf {
                addr: r,
                len: req.len() as u32,
                write: false,
            },
            Buf {
                addr: w,
                len: 4,
                write: true,
            },
        ])
    }

    /// Whether `[addr, addr + len)` overlaps what the harness keeps in
    /// guest memory for itself: both queues' rings and the request slots.
    pub fn overlaps_harness(&self, addr: u64, len: u32) -> bool {
        let end = addr.saturating_add(u64::from(len));
        let overlaps = |from: u64, to: u64| addr < to && from < end;
        [&self.req, &self.ev]
            .iter()
            .any(|d| overlaps(d.desc_gpa, d.desc_gpa + d.footprint as u64))
            || overlaps(SLOTS, BUF_END)
    }

    /// Where the tail of slot `slot`'s request is.
    pub fn tail(slot: u64) -> GuestAddress {
        GuestAddress(SLOTS + (slot % NUM_SLOTS) * 0x200 + 0x100)
    }

    /// The status byte of slot `slot`'s request (0xee until replied).
    pub fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(Self::tail(slot)).unwrap()
    }

    /// Runs the request queue once.
    pub fn process(&mut self) {
        self.dev
            .process_requests(&mut self.reqq, &self.mem)
            .unwrap();
    }
}

const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Zeroes the pages of `mem` written since the last call, and forgets them.
fn zero(mem: &Mem) {
    for region in mem.iter() {
        let mmap: &MmapRegion<AtomicBitmap> = region;
        let dirty = mmap.bitmap().get_and_reset();
        let base = region.start_addr().0;
        for (w, &word) in dirty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let at = base + (page * PAGE) as u64;
                let n = (region.len() - (page * PAGE) as u64).min(PAGE as u64);
                mem.write_slice(&ZERO_PAGE[..n as usize], GuestAddress(at))
                    .unwrap();
            }
        }
        // The zeroing itself marked the pages again.
        mmap.bitmap().reset();
    }
}

/// A request (head and body) built on the stack, in the wire layout of
/// `virtio_iommu::protocol` (little-endian, packed).
pub struct Req {
    buf: [u8; 64],
    len: usize,
}

impl Req {
    /// A request of `type_` with an empty body.
    pub fn new(type_: u8) -> Self {
        let mut buf = [0; 64];
        buf[0] = type_;
        Req { buf, len: 4 }
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.buf[self.len..self.len + 4].copy_from_slice(&v.to_le_bytes());
        self.len += 4;
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.buf[self.len..self.len + 8].copy_from_slice(&v.to_le_bytes());
        self.len += 8;
        self
    }
    /// ATTACH (reserved bytes zero).
    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> Self {
        Req::new(1).u32(domain).u32(endpoint).u32(flags).u32(0)
    }
    /// DETACH (reserved bytes zero).
    pub fn detach(domain: u32, endpoint: u32) -> Self {
        Req::new(2).u32(domain).u32(endpoint).u64(0)
    }
    /// MAP.
    pub fn map(domain: u32, start: u64, end: u64, gpa: u64, flags: u32) -> Self {
        Req::new(3)
            .u32(domain)
            .u64(start)
            .u64(end)
            .u64(gpa)
            .u32(flags)
    }
    /// UNMAP (reserved bytes zero).
    pub fn unmap(domain: u32, start: u64, end: u64) -> Self {
        Req::new(4).u32(domain).u64(start).u64(end).u32(0)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
