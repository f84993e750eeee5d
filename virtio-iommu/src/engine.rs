//! The request engine: pops chains from the request queue, parses them
//! (never trusting a length or a field), executes them on the
//! [`AddressSpace`] and writes the tail.
//!
//! # Ordering
//!
//! Requests are executed and completed strictly in the order they were
//! made available. An invalidating request that has to wait for in-flight
//! DMA is *parked*: its effects on translation are already visible, its
//! reply is written only when its drain completes, and no later request is
//! popped before that reply is in the used ring. The Linux driver waits for
//! each reply anyway, so nothing is lost; in exchange a driver never sees a
//! later request overtake an UNMAP whose DMA is still draining.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::endian::{Le16, Le64};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use crate::address_space::{AddressSpace, Outcome};
use crate::drain::Drain;
use crate::mapping::MapFlags;
use crate::protocol::{
    features::*, req_type, ProbeProperty, ProbeResvMem, ReqAttach, ReqDetach, ReqHead, ReqMap,
    ReqProbe, ReqTail, ReqUnmap, Status, VIRTIO_IOMMU_ATTACH_F_BYPASS, VIRTIO_IOMMU_MAP_F_MMIO,
    VIRTIO_IOMMU_PROBE_T_RESV_MEM,
};
use crate::sync::Arc;

/// Largest device-readable part the engine looks at: the PROBE request.
const MAX_READABLE: usize = std::mem::size_of::<ReqHead>() + std::mem::size_of::<ReqProbe>();
const TAIL_LEN: u64 = std::mem::size_of::<ReqTail>() as u64;
/// Longest chain the engine reads: more than any request needs (the
/// queue size bounds direct chains, but an indirect table may hold 64k
/// descriptors); longer chains are returned unread.
const MAX_CHAIN_DESCRIPTORS: usize = 512;

/// A request whose reply waits for a drain.
struct Parked {
    head: u16,
    type_: u8,
    status: Status,
    tail_offset: u64,
    used_len: u32,
    drain: Arc<Drain>,
}

/// How a chain was handled.
enum Handled {
    /// Reply now with this used length.
    Done(u32),
    /// Reply later.
    Park(Parked),
}

/// Executes requests from the request queue.
#[derive(Default)]
pub struct RequestEngine {
    parked: Option<Parked>,
    writable: Vec<(GuestAddress, u32)>,
    probe_buf: Vec<u8>,
}

impl std::fmt::Debug for RequestEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestEngine")
            .field("parked", &self.parked.as_ref().map(|p| p.type_))
            .finish()
    }
}

/// Where the request's fields were found.
struct Chain {
    readable: [u8; MAX_READABLE],
    readable_len: u64,
    writable_len: u64,
}

impl RequestEngine {
    /// Whether a request is waiting for its drain.
    pub fn parked_drain(&self) -> Option<&Arc<Drain>> {
        self.parked.as_ref().map(|p| &p.drain)
    }

    /// Forgets the parked request (device reset).
    pub fn reset(&mut self) {
        self.parked = None;
        self.writable.clear();
    }

    /// Publishes the parked reply if its drain completed, then executes
    /// available requests until the queue is empty or one must park.
    /// Returns whether any used entry was added.
    pub fn process<Q: QueueT, M: GuestMemory>(
        &mut self,
        space: &mut AddressSpace,
        features: u64,
        queue: &mut Q,
        mem: &M,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        if let Some(p) = &self.parked {
            if !p.drain.is_complete() {
                return Ok(false);
            }
            let p = self.parked.take().expect("checked");
            if let Some(t) = p.drain.wait_time() {
                space.shared.metrics.drain_wait.record(t);
            }
            self.write_tail(mem, p.tail_offset, p.status);
            queue.add_used(mem, p.head, p.used_len)?;
            space.shared.metrics.count_request(p.type_, p.status);
            used = true;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match self.handle(space, features, mem, chain) {
                Handled::Done(len) => {
                    queue.add_used(mem, head, len)?;
                    used = true;
                }
                Handled::Park(mut p) => {
                    p.head = head;
                    self.parked = Some(p);
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Reads the chain: device-readable bytes (up to what any request
    /// needs) into a stack buffer, device-writable descriptors into a list.
    /// `None` when the chain is malformed (readable after writable, or
    /// unreadable memory).
    fn gather<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> Option<Chain> {
        let mut c = Chain {
            readable: [0; MAX_READABLE],
            readable_len: 0,
            writable_len: 0,
        };
        self.writable.clear();
        for (n, desc) in chain.enumerate() {
            if n >= MAX_CHAIN_DESCRIPTORS {
                return None;
            }
            let len = u64::from(desc.len());
            if desc.is_write_only() {
                self.writable.push((desc.addr(), desc.len()));
                c.writable_len += len;
            } else {
                if !self.writable.is_empty() {
                    return None;
                }
                let have = c.readable_len.min(MAX_READABLE as u64) as usize;
                let n = (MAX_READABLE - have).min(desc.len() as usize);
                if n > 0 {
                    mem.read_slice(&mut c.readable[have..have + n], desc.addr())
                        .ok()?;
                }
                c.readable_len += len;
            }
        }
        Some(c)
    }

    /// Writes `data` at `offset` of the chain's device-writable part.
    fn write_at<M: GuestMemory>(&self, mem: &M, mut offset: u64, mut data: &[u8]) -> bool {
        for &(addr, len) in &self.writable {
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len());
            let Some(a) = addr.0.checked_add(offset) else {
                return false;
            };
            if mem.write_slice(&data[..n], GuestAddress(a)).is_err() {
                return false;
            }
            data = &data[n..];
            offset = 0;
            if data.is_empty() {
                return true;
            }
        }
        data.is_empty()
    }

    fn write_tail<M: GuestMemory>(&self, mem: &M, offset: u64, status: Status) {
        let tail = ReqTail {
            status: status as u8,
            reserved: [0; 3],
        };
        if !self.write_at(mem, offset, tail.as_slice()) {
            log::warn!("virtio-iommu: cannot write request tail at offset {offset}");
        }
    }

    fn handle<M: GuestMemory>(
        &mut self,
        space: &mut AddressSpace,
        features: u64,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Handled {
        let metrics = space.shared.metrics.clone();
        let malformed = || {
            metrics.malformed.fetch_add(1, Ordering::Relaxed);
            Handled::Done(0)
        };
        let Some(c) = self.gather(mem, chain) else {
            return malformed();
        };
        // Without room for a tail the device cannot answer at all.
        if c.writable_len < TAIL_LEN {
            return malformed();
        }
        let head_len = std::mem::size_of::<ReqHead>() as u64;
        if c.readable_len < head_len {
            self.write_tail(mem, 0, Status::Inval);
            metrics.count_request(0, Status::Inval);
            return Handled::Done(TAIL_LEN as u32);
        }
        let type_ = c.readable[0];
        let body = &c.readable[head_len as usize..];
        let body_len = c.readable_len - head_len;
        let need = match type_ {
            req_type::ATTACH => std::mem::size_of::<ReqAttach>(),
            req_type::DETACH => std::mem::size_of::<ReqDetach>(),
            req_type::MAP => std::mem::size_of::<ReqMap>(),
            req_type::UNMAP => std::mem::size_of::<ReqUnmap>(),
            req_type::PROBE if space.config.offer_probe => std::mem::size_of::<ReqProbe>(),
            // Unknown type (or PROBE not offered): "SHOULD NOT write the
            // buffer and SHOULD set the used length to zero".
            _ => {
                metrics.count_request(0, Status::Unsupp);
                return malformed();
            }
        };
        if type_ == req_type::PROBE {
            return self.probe(space, mem, &c, body, body_len);
        }
        let outcome: Outcome = if body_len < need as u64 {
            Status::Inval.into()
        } else {
            let neg = |bit: u32| features & (1u64 << bit) != 0;
            match type_ {
                req_type::ATTACH => {
                    let r = ReqAttach::from_slice(&body[..need]).expect("sized");
                    let known = if neg(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
                        VIRTIO_IOMMU_ATTACH_F_BYPASS
                    } else {
                        0
                    };
                    let flags = r.flags.to_native();
                    if r.reserved != [0; 4] || flags & !known != 0 {
                        Status::Inval.into()
                    } else {
                        space.attach(
                            r.domain.to_native(),
                            r.endpoint.to_native(),
                            flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0,
                        )
                    }
                }
                req_type::DETACH => {
                    let r = ReqDetach::from_slice(&body[..need]).expect("sized");
                    space.detach(r.domain.to_native(), r.endpoint.to_native())
                }
                req_type::MAP if !neg(VIRTIO_IOMMU_F_MAP_UNMAP) => Status::Unsupp.into(),
                req_type::MAP => {
                    let r = ReqMap::from_slice(&body[..need]).expect("sized");
                    let bits = r.flags.to_native();
                    match MapFlags::from_bits(bits) {
                        Some(f)
                            if bits & VIRTIO_IOMMU_MAP_F_MMIO == 0 || neg(VIRTIO_IOMMU_F_MMIO) =>
                        {
                            space
                                .map(
                                    r.domain.to_native(),
                                    r.virt_start.to_native(),
                                    r.virt_end.to_native(),
                                    r.phys_start.to_native(),
                                    f,
                                )
                                .into()
                        }
                        _ => Status::Inval.into(),
                    }
                }
                req_type::UNMAP if !neg(VIRTIO_IOMMU_F_MAP_UNMAP) => Status::Unsupp.into(),
                req_type::UNMAP => {
                    let r = ReqUnmap::from_slice(&body[..need]).expect("sized");
                    if r.reserved != [0; 4] {
                        // "MAY set S_INVAL, in which case MAY perform": we don't.
                        Status::Inval.into()
                    } else {
                        space.unmap(
                            r.domain.to_native(),
                            r.virt_start.to_native(),
                            r.virt_end.to_native(),
                        )
                    }
                }
                _ => unreachable!("filtered above"),
            }
        };
        match outcome.drain {
            Some(drain) => Handled::Park(Parked {
                head: 0,
                type_,
                status: outcome.status,
                tail_offset: 0,
                used_len: TAIL_LEN as u32,
                drain,
            }),
            None => {
                self.write_tail(mem, 0, outcome.status);
                metrics.count_request(type_, outcome.status);
                Handled::Done(TAIL_LEN as u32)
            }
        }
    }

    fn probe<M: GuestMemory>(
        &mut self,
        space: &AddressSpace,
        mem: &M,
        c: &Chain,
        body: &[u8],
        body_len: u64,
    ) -> Handled {
        let metrics = &space.shared.metrics;
        let probe_size = u64::from(space.config.probe_size);
        let need = std::mem::size_of::<ReqProbe>() as u64;
        // A writable part of any other size than properties + tail is
        // refused without writing properties; its last four bytes are the
        // tail. (The size is bounded: larger parts are ignored beyond that.)
        if c.writable_len != probe_size + TAIL_LEN || body_len < need {
            let tail_at = if c.writable_len < probe_size + TAIL_LEN {
                c.writable_len - TAIL_LEN
            } else {
                probe_size
            };
            self.probe_buf.clear();
            self.probe_buf.resize(tail_at as usize, 0);
            let zeros = std::mem::take(&mut self.probe_buf);
            self.write_at(mem, 0, &zeros);
            self.probe_buf = zeros;
            self.write_tail(mem, tail_at, Status::Inval);
            metrics.count_request(req_type::PROBE, Status::Inval);
            return Handled::Done((tail_at + TAIL_LEN) as u32);
        }
        let r = ReqProbe::from_slice(&body[..need as usize]).expect("sized");
        let Some(regions) = space.regions_of(r.endpoint.to_native()) else {
            self.write_tail(mem, probe_size, Status::NoEnt);
            metrics.count_request(req_type::PROBE, Status::NoEnt);
            return Handled::Done((probe_size + TAIL_LEN) as u32);
        };
        self.probe_buf.clear();
        self.probe_buf.resize(probe_size as usize, 0);
        let prop_len = std::mem::size_of::<ProbeResvMem>();
        let mut off = 0;
        for reg in regions {
            if off + prop_len > self.probe_buf.len() {
                log::warn!("virtio-iommu: probe_size too small for every reserved region");
                break;
            }
            let p = ProbeResvMem {
                head: ProbeProperty {
                    type_: Le16::from(VIRTIO_IOMMU_PROBE_T_RESV_MEM),
                    length: Le16::from((prop_len - std::mem::size_of::<ProbeProperty>()) as u16),
                },
                subtype: reg.kind.subtype(),
                reserved: [0; 3],
                start: Le64::from(reg.start),
                end: Le64::from(reg.end),
            };
            self.probe_buf[off..off + prop_len].copy_from_slice(p.as_slice());
            off += prop_len;
        }
        let props = std::mem::take(&mut self.probe_buf);
        let ok = self.write_at(mem, 0, &props);
        self.probe_buf = props;
        let status = if ok { Status::Ok } else { Status::DevErr };
        self.write_tail(mem, probe_size, status);
        metrics.count_request(req_type::PROBE, status);
        Handled::Done((probe_size + TAIL_LEN) as u32)
    }
}
