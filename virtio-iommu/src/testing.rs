//! Test helpers (feature `test-utils`): a minimal split-virtqueue *driver*
//! over guest memory, and a harness that sends raw requests to a device.
//!
//! virtio-queue's own mock writes the available ring without wrapping, so
//! it cannot carry more than one queue's worth of requests; this driver
//! recycles descriptors and wraps the rings, so benchmarks and the fuzzer
//! can push millions of requests through the real device path.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::device::VirtioIommu;
use crate::protocol::{req_type, ReqTail, Status};
use crate::IommuConfig;

const DESC_SIZE: u64 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct TestDriver {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    used_idx: u16,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
}

impl TestDriver {
    /// Lays out a queue of `size` (a power of two) at `base`; needs
    /// `Self::footprint(size)` bytes.
    pub fn new<M: GuestMemory>(mem: &M, base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(base.0 + DESC_SIZE * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 4095) & !4095);
        mem.write_obj(0u16, avail).unwrap();
        mem.write_obj(0u16, GuestAddress(avail.0 + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used.0 + 2)).unwrap();
        TestDriver {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
        }
    }

    /// Bytes of guest memory a queue of `size` occupies.
    pub fn footprint(size: u16) -> u64 {
        let s = u64::from(size);
        ((DESC_SIZE * s + 6 + 2 * s + 4095) & !4095) + 6 + 8 * s
    }

    /// A device-side queue configured for this driver.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes a chain available; returns its head, or `None` when the
    /// descriptor table is full.
    pub fn add<M: GuestMemory>(&mut self, mem: &M, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let head = *self.free.last().expect("checked");
        let mut idx = std::mem::take(&mut self.chains[usize::from(head)]);
        idx.clear();
        idx.extend((0..bufs.len()).map(|_| self.free.pop().unwrap()));
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= NEXT;
                idx[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&b.addr.0.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            let at = self.desc.0 + DESC_SIZE * u64::from(idx[i]);
            mem.write_slice(&d, GuestAddress(at)).unwrap();
        }
        self.chains[usize::from(head)] = idx;
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
        Some(head)
    }

    /// Takes the next used entry: (head, used length).
    pub fn pop_used<M: GuestMemory>(&mut self, mem: &M) -> Option<(u16, u32)> {
        let dev_idx: u16 = mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap();
        if dev_idx == self.used_idx {
            return None;
        }
        let slot = u64::from(self.used_idx % self.size);
        let at = self.used.0 + 4 + 8 * slot;
        let elem: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let (id, len) = (elem as u32, (elem >> 32) as u32);
        self.used_idx = self.used_idx.wrapping_add(1);
        let head = id as u16;
        // Free the chain's descriptors (the driver remembers them).
        self.free
            .extend(self.chains[usize::from(head)].iter().rev().copied());
        Some((head, len))
    }
}

/// What the device did with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Used length reported by the device.
    pub used_len: u32,
    /// Status byte of the tail, when the device wrote one.
    pub status: Option<Status>,
    /// The device-writable bytes after the reply.
    pub written: Vec<u8>,
}

/// A device with a request queue and an event queue in 16 MiB of memory.
pub struct Harness {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device under test.
    pub dev: VirtioIommu,
    /// Request queue (device side).
    pub reqq: Queue,
    /// Request queue (driver side).
    pub req_driver: TestDriver,
    /// Event queue (device side).
    pub evq: Queue,
    /// Event queue (driver side).
    pub ev_driver: TestDriver,
}

/// Guest address where request buffers start.
pub const BUF_BASE: u64 = 0x10_0000;
/// Size of guest memory in a [`Harness`].
pub const MEM_SIZE: usize = 16 << 20;

impl Harness {
    /// A harness around a device with `config`, all features acknowledged.
    pub fn new(config: IommuConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut dev = VirtioIommu::new(config).unwrap();
        dev.ack_features(dev.device_features());
        let req_driver = TestDriver::new(&mem, GuestAddress(0), 256);
        let ev_driver = TestDriver::new(&mem, GuestAddress(0x8000), 64);
        let reqq = req_driver.queue();
        let evq = ev_driver.queue();
        Harness {
            mem,
            dev,
            reqq,
            req_driver,
            evq,
            ev_driver,
        }
    }

    /// Submits a chain and processes the queue; returns the reply if the
    /// device completed it (it may be parked).
    pub fn submit(&mut self, bufs: &[Buf]) -> Option<(u16, u32)> {
        self.req_driver.add(&self.mem, bufs).expect("queue full");
        self.dev
            .process_requests(&mut self.reqq, &self.mem)
            .unwrap();
        self.req_driver.pop_used(&self.mem)
    }

    /// Sends `readable` as the device-readable part and `writable_len`
    /// device-writable bytes (pre-filled with 0xee), and returns the reply.
    /// Panics if the request parks.
    pub fn request(&mut self, readable: &[u8], writable_len: u32) -> Reply {
        let r = GuestAddress(BUF_BASE);
        let w = GuestAddress(BUF_BASE + 0x10000);
        self.mem.write_slice(readable, r).unwrap();
        self.mem
            .write_slice(&vec![0xee; writable_len as usize], w)
            .unwrap();
        let mut bufs = Vec::new();
        if !readable.is_empty() {
            bufs.push(Buf {
                addr: r,
                len: readable.len() as u32,
                write: false,
            });
        }
        if writable_len > 0 {
            bufs.push(Buf {
                addr: w,
                len: writable_len,
                write: true,
            });
        }
        let (_, used_len) = self.submit(&bufs).expect("request parked");
        self.read_reply(used_len, writable_len)
    }

    /// Decodes the writable buffer of the last request.
    pub fn read_reply(&self, used_len: u32, writable_len: u32) -> Reply {
        let w = GuestAddress(BUF_BASE + 0x10000);
        let mut written = vec![0; writable_len as usize];
        self.mem.read_slice(&mut written, w).unwrap();
        let tail_at = used_len.checked_sub(std::mem::size_of::<ReqTail>() as u32);
        let status = tail_at.and_then(|t| Status::from_u8(written[t as usize]));
        Reply {
            used_len,
            status: if used_len == 0 { None } else { status },
            written,
        }
    }

    /// Sends a request of `type_` with `body` and a 4-byte tail; returns the status.
    pub fn simple(&mut self, type_: u8, body: &[u8]) -> Option<Status> {
        let mut r = vec![type_, 0, 0, 0];
        r.extend_from_slice(body);
        self.request(&r, 4).status
    }

    /// ATTACH.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Option<Status> {
        self.simple(req_type::ATTACH, &attach_body(domain, endpoint, flags))
    }

    /// DETACH.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Option<Status> {
        self.simple(req_type::DETACH, &detach_body(domain, endpoint))
    }

    /// MAP.
    pub fn map(
        &mut self,
        domain: u32,
        start: u64,
        end: u64,
        gpa: u64,
        flags: u32,
    ) -> Option<Status> {
        self.simple(req_type::MAP, &map_body(domain, start, end, gpa, flags))
    }

    /// UNMAP.
    pub fn unmap(&mut self, domain: u32, start: u64, end: u64) -> Option<Status> {
        self.simple(req_type::UNMAP, &unmap_body(domain, start, end))
    }

    /// Makes a request of `type_` with `body` available from slot `slot`
    /// (0..256; each slot has its own buffers) without processing the
    /// queue, for requests that may park. Its 4-byte tail starts as 0xee;
    /// [`Harness::posted_status`] reads it.
    pub fn post(&mut self, slot: u64, type_: u8, body: &[u8]) {
        assert!(slot < 256, "slot {slot} out of range");
        let r = GuestAddress(BUF_BASE + 0x2_0000 + slot * 0x100);
        let tail = Self::posted_tail(slot);
        let bufs = place_request(&self.mem, r, tail, type_, body);
        self.mem.write_slice(&[0xee; 4], tail).unwrap();
        self.req_driver.add(&self.mem, &bufs).expect("queue full");
    }

    fn posted_tail(slot: u64) -> GuestAddress {
        GuestAddress(BUF_BASE + 0x3_0000 + slot * 0x100)
    }

    /// The status byte of the request posted from `slot` (0xee until the
    /// device replied).
    pub fn posted_status(&self, slot: u64) -> u8 {
        self.mem.read_obj(Self::posted_tail(slot)).unwrap()
    }

    /// Runs the request queue until a reply is published, waiting for a
    /// parked request's drain (in steps of at most 100 ms); returns the
    /// used length. For a driver thread in a test that never gives up.
    pub fn wait_reply(&mut self) -> u32 {
        loop {
            self.dev
                .process_requests(&mut self.reqq, &self.mem)
                .unwrap();
            if let Some((_, len)) = self.req_driver.pop_used(&self.mem) {
                return len;
            }
            self.dev.wait_parked(std::time::Duration::from_millis(100));
        }
    }
}

/// Writes a request of `type_` with `body` at `at`, and returns the chain
/// that makes it: `at` (device-readable) and a 4-byte tail at `tail`
/// (device-writable, left as it is).
pub fn place_request<M: GuestMemory>(
    mem: &M,
    at: GuestAddress,
    tail: GuestAddress,
    type_: u8,
    body: &[u8],
) -> [Buf; 2] {
    let mut req = vec![type_, 0, 0, 0];
    req.extend_from_slice(body);
    mem.write_slice(&req, at).unwrap();
    [
        Buf {
            addr: at,
            len: req.len() as u32,
            write: false,
        },
        Buf {
            addr: tail,
            len: 4,
            write: true,
        },
    ]
}

/// The body of an ATTACH request (reserved bytes zero).
pub fn attach_body(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// The body of a DETACH request (reserved bytes zero).
pub fn detach_body(domain: u32, endpoint: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    b
}

/// The body of a MAP request.
pub fn map_body(domain: u32, start: u64, end: u64, gpa: u64, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&end.to_le_bytes());
    b.extend_from_slice(&gpa.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

/// The body of an UNMAP request.
pub fn unmap_body(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&end.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// An external mapper that records calls and fails MAP on demand.
#[derive(Debug, Default)]
pub struct RecordingMapper {
    /// Live (iova, gpa, size) mappings.
    pub mapped: std::sync::Mutex<Vec<(u64, u64, u64)>>,
    /// When set, MAP fails.
    pub fail: std::sync::atomic::AtomicBool,
}

impl crate::ExternalMapper for RecordingMapper {
    fn map(&self, iova: u64, gpa: u64, size: u64, _flags: crate::MapFlags) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected"));
        }
        self.mapped.lock().unwrap().push((iova, gpa, size));
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        let mut m = self.mapped.lock().unwrap();
        let before = m.len();
        m.retain(|&(i, _, s)| !(i == iova && s == size));
        if m.len() == before {
            return Err(std::io::Error::other("unmap of unknown range"));
        }
        Ok(())
    }
}
