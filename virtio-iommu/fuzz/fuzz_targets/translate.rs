//! The translation entry points a VMM's endpoint devices call —
//! `vm_memory::Iommu::translate` on an `EndpointHandle`,
//! `EndpointHandle::translate`, `EndpointHandle::pin` and
//! `EndpointHandle::lease_queue_areas` (and accesses through a lease) —
//! with arbitrary 64-bit (address, length) pairs and permissions, near
//! 2^64 and around every mapping's edges too, after arbitrary ATTACH /
//! DETACH / MAP / UNMAP requests, `bypass` writes and device resets.
//!
//! Every answer is checked against a model of the mappings built from the
//! device's replies (whose own consistency with the specification is
//! asserted as they come, and which is compared with the device's snapshot
//! at the end of each input):
//!
//! - nothing panics;
//! - a translation succeeds exactly when the model translates the whole
//!   range (`vm_memory::Iommu` also refuses ranges that reach the last
//!   byte of the space, which its end-exclusive IOTLB cannot describe),
//!   into exactly the model's guest-physical ranges, in full: never in
//!   part, never an `Ok` with zero bytes (identity ranges given to
//!   `vm_memory::Iommu` are kept to 8 GiB, see `iommu_translate`);
//! - a refusal is an error with the model's reason (the first address
//!   that is unmapped or not permitted), and is reported as exactly one
//!   fault record (none for an empty range or a resource limit); an
//!   acceptance reports none;
//! - a queue-area lease that was not revoked still translates as the model
//!   does (an invalidation that changed its translation must have revoked
//!   it), and a write through it lands at the model's guest-physical
//!   address;
//! - once every pin and lease is dropped, nothing is parked or pending.
//!
//! Three device configurations are fuzzed (the input's first byte picks
//! one): 64-bit input range with 4 KiB pages and the x86 MSI region; a
//! 48-bit range, bypass on at reset and a narrow domain range; a 39-bit
//! range with 64 KiB pages and the non-draining control mode. Each has its
//! own world (device, memory, queues), built once and reset between
//! inputs (see `common`).

#![no_main]

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use common::{Input, Req, World, BUF_END};
use libfuzzer_sys::fuzz_target;
use virtio_iommu::protocol::CONFIG_BYPASS_OFFSET;
use virtio_iommu::testing::MEM_SIZE;
use virtio_iommu::{
    AreaSpec, GpaRange, IommuConfig, Limits, Pin, QueueAreas, ReservedKind, ReservedRegion,
    RevokeHook, Status, TranslateError,
};
use vm_memory::{Bytes, GuestAddress, Permissions};

/// Endpoints 0..NUM_EPS are registered; ID NUM_EPS is not.
const NUM_EPS: usize = 4;
/// The last endpoint's own reserved region.
const EP_REGION: ReservedRegion = ReservedRegion {
    start: 0x4000_0000,
    end: 0x4000_ffff,
    kind: ReservedKind::Reserved,
};
const MAX_PER_DOMAIN: usize = 16;
const MAX_PINS: usize = 8;
/// Longest identity range given to `vm_memory::Iommu::translate`.
const MAX_IDENTITY_LEN: u64 = 8 << 30;
const CONFIGS: usize = 3;

fn config(variant: usize) -> IommuConfig {
    let limits = Limits {
        max_domains: 6,
        max_mappings_per_domain: MAX_PER_DOMAIN,
        max_mappings_total: 40,
        max_pins_per_endpoint: MAX_PINS,
        max_pending_faults: 8,
        ..Default::default()
    };
    match variant {
        0 => IommuConfig {
            limits,
            ..Default::default()
        },
        1 => IommuConfig {
            limits,
            address_width_bits: 48,
            page_size_mask: 0x1000 | 0x20_0000,
            bypass: true,
            domain_start: 1,
            domain_end: 4,
            reserved_regions: Vec::new(),
            ..Default::default()
        },
        _ => IommuConfig {
            limits,
            address_width_bits: 39,
            page_size_mask: 0x1_0000,
            drain: false,
            reserved_regions: vec![
                ReservedRegion {
                    start: 0x8000_0000,
                    end: 0x8fff_ffff,
                    kind: ReservedKind::Reserved,
                },
                ReservedRegion::x86_msi(),
            ],
            ..Default::default()
        },
    }
}

fn endpoints() -> Vec<(u32, Vec<ReservedRegion>)> {
    (0..NUM_EPS as u32)
        .map(|i| {
            let regions = if i as usize == NUM_EPS - 1 {
                vec![EP_REGION]
            } else {
                Vec::new()
            };
            (i, regions)
        })
        .collect()
}

fn allows(flags: u32, access: Permissions) -> bool {
    let need = match access {
        Permissions::No => 0,
        Permissions::Read => 1,
        Permissions::Write => 2,
        Permissions::ReadWrite => 3,
    };
    flags & need == need
}

/// The last byte of `[iova, iova + len)`: `None` when empty or wrapping.
fn last_byte(iova: u64, len: u64) -> Option<u64> {
    iova.checked_add(len.checked_sub(1)?)
}

#[derive(Clone, Copy, Debug)]
struct MMap {
    end: u64,
    gpa: u64,
    flags: u32,
}

struct MDomain {
    bypass: bool,
    maps: BTreeMap<u64, MMap>,
    /// Attached endpoints, one bit each.
    eps: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Blocked,
    Identity,
    Domain(u32),
}

/// What the guest configured, as the device's replies said.
struct Model {
    config: IommuConfig,
    bypass: bool,
    attached: [Option<u32>; NUM_EPS],
    domains: BTreeMap<u32, MDomain>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Attach {
        domain: u32,
        ep: u32,
        flags: u32,
    },
    Detach {
        domain: u32,
        ep: u32,
    },
    Map {
        domain: u32,
        start: u64,
        end: u64,
        gpa: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        start: u64,
        end: u64,
    },
}

impl Op {
    fn domain(&self) -> u32 {
        match *self {
            Op::Attach { domain, .. }
            | Op::Detach { domain, .. }
            | Op::Map { domain, .. }
            | Op::Unmap { domain, .. } => domain,
        }
    }
}

impl Model {
    fn new(config: IommuConfig) -> Self {
        Model {
            bypass: config.bypass,
            config,
            attached: [None; NUM_EPS],
            domains: BTreeMap::new(),
        }
    }

    fn granule(&self) -> u64 {
        self.config.granule()
    }

    fn route(&self, ep: usize) -> Route {
        match self.attached[ep] {
            Some(d) if self.domains[&d].bypass => Route::Identity,
            Some(d) => Route::Domain(d),
            None if self.bypass => Route::Identity,
            None => Route::Blocked,
        }
    }

    /// The mapping of domain `d` containing `iova`.
    fn lookup(&self, d: u32, iova: u64) -> Option<(u64, MMap)> {
        let (&start, &m) = self.domains[&d].maps.range(..=iova).next_back()?;
        (m.end >= iova).then_some((start, m))
    }

    /// What `EndpointHandle::translate` must answer.
    fn translate(
        &self,
        ep: usize,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Vec<GpaRange>, TranslateError> {
        if len == 0 {
            return Err(TranslateError::BadRange);
        }
        let d = match self.route(ep) {
            Route::Blocked => return Err(TranslateError::NotAttached),
            Route::Identity => {
                let last = last_byte(iova, len).ok_or(TranslateError::BadRange)?;
                if last > self.config.input_end() {
                    return Err(TranslateError::BadRange);
                }
                return Ok(vec![GpaRange { gpa: iova, len }]);
            }
            Route::Domain(d) => d,
        };
        let last = last_byte(iova, len).ok_or(TranslateError::BadRange)?;
        let mut out: Vec<GpaRange> = Vec::new();
        let mut cur = iova;
        loop {
            let (start, m) = self.lookup(d, cur).ok_or(TranslateError::NotMapped(cur))?;
            if !allows(m.flags, access) {
                return Err(TranslateError::Permission(cur));
            }
            let piece_end = m.end.min(last);
            let gpa = m.gpa + (cur - start);
            let len = piece_end - cur + 1;
            // Pieces merge when guest-physically contiguous; a range never
            // wraps around the guest-physical space.
            match out.last_mut() {
                Some(r) if r.gpa.checked_add(r.len) == Some(gpa) => r.len += len,
                _ => out.push(GpaRange { gpa, len }),
            }
            if piece_end == last {
                return Ok(out);
            }
            cur = piece_end + 1;
        }
    }

    /// What leasing one area must answer (the range is checked before the
    /// route).
    fn lease(&self, ep: usize, s: &AreaSpec) -> Result<Vec<GpaRange>, TranslateError> {
        last_byte(s.iova, s.len).ok_or(TranslateError::BadRange)?;
        self.translate(ep, s.iova, s.len, s.access)
    }

    /// Reserved regions of endpoint `ep`.
    fn regions(&self, ep: usize) -> impl Iterator<Item = &ReservedRegion> {
        let own = (ep == NUM_EPS - 1).then_some(&EP_REGION);
        self.config.reserved_regions.iter().chain(own)
    }

    fn total(&self) -> usize {
        self.domains.values().map(|d| d.maps.len()).sum()
    }

    fn leave(&mut self, ep: usize, d: u32) {
        let dom = self.domains.get_mut(&d).expect("attached to a live domain");
        dom.eps &= !(1 << ep);
        if dom.eps == 0 {
            self.domains.remove(&d);
        }
        self.attached[ep] = None;
    }

    fn reset(&mut self) {
        self.attached = [None; NUM_EPS];
        self.domains.clear();
    }

    /// Applies a request the device answered with `status`, asserting
    /// that a success was allowed by the specification.
    fn apply(&mut self, op: Op, status: u8) {
        if status != Status::Ok as u8 {
            return;
        }
        let (c, max_domains) = (&self.config, self.config.limits.max_domains);
        let in_range = (c.domain_start..=c.domain_end).contains(&op.domain());
        assert!(in_range, "{op:?} succeeded with its domain out of range");
        match op {
            Op::Attach { domain, ep, flags } => {
                let ep = ep as usize;
                assert!(ep < NUM_EPS, "ATTACH of an unknown endpoint succeeded");
                assert_eq!(flags & !1, 0, "ATTACH with unknown flags succeeded");
                let bypass = flags & 1 != 0;
                if let Some(d) = self.domains.get(&domain) {
                    assert_eq!(d.bypass, bypass, "ATTACH changed a domain's kind");
                }
                if self.attached[ep] == Some(domain) {
                    return;
                }
                if let Some(old) = self.attached[ep] {
                    self.leave(ep, old);
                }
                assert!(
                    self.domains.contains_key(&domain) || self.domains.len() < max_domains,
                    "ATTACH beyond the domain limit"
                );
                let d = self.domains.entry(domain).or_insert(MDomain {
                    bypass,
                    maps: BTreeMap::new(),
                    eps: 0,
                });
                d.eps |= 1 << ep;
                self.attached[ep] = Some(domain);
            }
            Op::Detach { domain, ep } => {
                let ep = ep as usize;
                assert!(ep < NUM_EPS && self.attached[ep] == Some(domain));
                self.leave(ep, domain);
            }
            Op::Map {
                domain,
                start,
                end,
                gpa,
                flags,
            } => {
                let g = self.granule() - 1;
                let input_end = self.config.input_end();
                let total = self.total();
                let max_total = self.config.limits.max_mappings_total;
                let d = self.domains.get(&domain).expect("MAP into no domain");
                assert!(!d.bypass, "MAP into a bypass domain");
                assert!(start <= end && end <= input_end, "MAP {start:#x}-{end:#x}");
                assert!(
                    start & g == 0 && gpa & g == 0 && end.wrapping_add(1) & g == 0,
                    "MAP not aligned to the granule"
                );
                assert!(gpa.checked_add(end - start).is_some(), "MAP wraps its GPA");
                assert_eq!(flags & !7, 0, "MAP with unknown flags");
                assert!(
                    d.maps
                        .range(..=end)
                        .next_back()
                        .is_none_or(|(_, m)| m.end < start),
                    "MAP over an existing mapping"
                );
                assert!(d.maps.len() < MAX_PER_DOMAIN && total < max_total);
                for ep in 0..NUM_EPS {
                    if d.eps & (1 << ep) != 0 {
                        assert!(
                            !self.regions(ep).any(|r| r.overlaps(start, end)),
                            "MAP over a reserved region"
                        );
                    }
                }
                let d = self.domains.get_mut(&domain).expect("checked");
                d.maps.insert(start, MMap { end, gpa, flags });
            }
            Op::Unmap { domain, start, end } => {
                let d = self.domains.get_mut(&domain).expect("UNMAP in no domain");
                assert!(!d.bypass && start <= end);
                // Everything overlapping the range lies inside it (no split).
                let first = d
                    .maps
                    .range(..=start)
                    .next_back()
                    .filter(|(_, m)| m.end >= start);
                assert!(
                    first.is_none_or(|(&s, _)| s == start),
                    "UNMAP split a mapping"
                );
                let inside: Vec<u64> = d.maps.range(start..=end).map(|(&s, _)| s).collect();
                for s in inside {
                    let m = d.maps.remove(&s).expect("listed");
                    assert!(m.end <= end, "UNMAP split a mapping");
                }
            }
        }
    }
}

/// A request made available and not yet replied to.
struct Pending {
    head: u16,
    slot: u64,
    op: Op,
    /// Set when the request parked: its effects are visible, its status
    /// (always OK: only a removal that must wait parks) comes later.
    applied: bool,
}

struct Lease {
    ep: usize,
    areas: QueueAreas,
    specs: Vec<AreaSpec>,
    gpas: Vec<Vec<GpaRange>>,
}

struct Fuzz {
    w: World,
    model: Model,
    pending: VecDeque<Pending>,
    slot: u64,
    pins: Vec<(usize, Pin)>,
    leases: Vec<Lease>,
    hook: RevokeHook,
    /// A device reset waits for DMA (pins held through what it removed).
    resetting: bool,
}

fn faults(w: &World) -> u64 {
    let m = w.dev.metrics();
    m.faults_reported.load(std::sync::atomic::Ordering::Relaxed)
        + m.faults_dropped.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether refusing with `e` reports a fault (resource limits and empty
/// ranges do not).
fn reports(e: TranslateError, len: u64) -> bool {
    match e {
        TranslateError::BadRange => len > 0,
        TranslateError::TooFragmented
        | TranslateError::TooManyPins
        | TranslateError::TooManyAreas => false,
        _ => true,
    }
}

impl Fuzz {
    fn new(variant: usize) -> Self {
        let config = config(variant);
        Fuzz {
            w: World::new(config.clone(), &endpoints()),
            model: Model::new(config),
            pending: VecDeque::new(),
            slot: 0,
            pins: Vec::new(),
            leases: Vec::new(),
            hook: Arc::new(|| {}),
            resetting: false,
        }
    }

    /// An interesting address: an edge of a mapping or of a reserved
    /// region, the end of the input range, the top of the space.
    fn point(&self, sel: u8) -> u64 {
        let n = self
            .model
            .domains
            .values()
            .map(|d| d.maps.len())
            .sum::<usize>();
        if n > 0 && sel & 0x80 == 0 {
            let i = usize::from(sel) % n;
            let (start, m) = self
                .model
                .domains
                .values()
                .flat_map(|d| d.maps.iter())
                .nth(i)
                .expect("counted");
            return if sel & 0x40 == 0 {
                *start
            } else {
                m.end.wrapping_add(1)
            };
        }
        match sel % 8 {
            0 => 0,
            1 => self.model.config.input_end(),
            2 => u64::MAX,
            3 => EP_REGION.start,
            4 => EP_REGION.end.wrapping_add(1),
            5 => 0xfee0_0000,
            6 => 1 << 32,
            _ => self.model.config.input_end().wrapping_add(1),
        }
    }

    fn delta(input: &mut Input) -> Option<u64> {
        Some(i64::from(input.u8()? as i8) as u64)
    }

    fn addr(&self, input: &mut Input) -> Option<u64> {
        Some(match input.u8()? % 5 {
            0 => self.point(input.u8()?).wrapping_add(Self::delta(input)?),
            1 => u64::from(input.u16()?) << 12,
            2 => u64::MAX - u64::from(input.u16()?),
            3 => input.u64()?,
            _ => (u64::from(input.u16()?) << 12) + u64::from(input.u8()?),
        })
    }

    fn len(&self, input: &mut Input, addr: u64) -> Option<u64> {
        Some(match input.u8()? % 6 {
            0 => u64::from(input.u8()?) + 1,
            1 => u64::from(input.u16()?) << 4,
            2 => self
                .point(input.u8()?)
                .wrapping_sub(addr)
                .wrapping_add(Self::delta(input)?),
            // Up to exactly 2^64, or around it.
            3 => 0u64.wrapping_sub(addr).wrapping_add(Self::delta(input)?),
            4 => input.u64()?,
            _ => u64::from(input.u8()? % 2),
        })
    }

    fn domain(input: &mut Input) -> Option<u32> {
        Some(u32::from(input.u8()? % 8))
    }

    /// Sends a request and runs the queue.
    fn request(&mut self, op: Op) {
        let req = match op {
            Op::Attach { domain, ep, flags } => Req::attach(domain, ep, flags),
            Op::Detach { domain, ep } => Req::detach(domain, ep),
            Op::Map {
                domain,
                start,
                end,
                gpa,
                flags,
            } => Req::map(domain, start, end, gpa, flags),
            Op::Unmap { domain, start, end } => Req::unmap(domain, start, end),
        };
        let slot = self.slot;
        self.slot += 1;
        let head = self
            .w
            .post(slot, req.bytes())
            .expect("at most one request per step: the queue never fills");
        self.pending.push_back(Pending {
            head,
            slot,
            op,
            applied: false,
        });
        self.process();
    }

    /// Runs the request queue and applies the replies to the model.
    fn process(&mut self) {
        self.w.process();
        while let Some((head, len)) = self.w.pop_req() {
            let p = self
                .pending
                .pop_front()
                .expect("a reply to a request never made");
            assert_eq!(head, p.head, "replies out of order");
            assert_eq!(len, 4, "used length of a reply");
            let st = self.w.status(p.slot);
            if p.applied {
                assert_eq!(st, Status::Ok as u8, "a parked request failed");
            } else {
                self.model.apply(p.op, st);
            }
        }
        if self.w.dev.parked_drain().is_some() {
            let p = self
                .pending
                .front_mut()
                .expect("a parked request is the oldest pending one");
            assert!(self.model.config.drain, "parked in the non-draining mode");
            if !p.applied {
                p.applied = true;
                let op = p.op;
                self.model.apply(op, Status::Ok as u8);
            }
        }
        self.check_leases();
    }

    /// A lease that was not revoked still translates as the model does.
    fn check_leases(&self) {
        if !self.model.config.drain {
            return; // the control mode never revokes leases
        }
        for l in &self.leases {
            if l.areas.is_revoked() {
                continue;
            }
            for (s, gpas) in l.specs.iter().zip(&l.gpas) {
                assert_eq!(
                    self.model.lease(l.ep, s).as_ref(),
                    Ok(gpas),
                    "lease of endpoint {} area {s:?} not revoked but its translation changed",
                    l.ep
                );
            }
        }
    }

    /// The device's snapshot agrees with the model.
    fn check_snapshot(&self) {
        let Ok(s) = self.w.dev.snapshot() else {
            return; // busy
        };
        assert_eq!(s.bypass, self.model.bypass, "bypass");
        for e in &s.endpoints {
            assert_eq!(
                e.domain, self.model.attached[e.id as usize],
                "attachment of endpoint {}",
                e.id
            );
        }
        assert_eq!(s.domains.len(), self.model.domains.len(), "domains");
        for d in &s.domains {
            let m = &self.model.domains[&d.id];
            assert_eq!(d.bypass, m.bypass);
            assert_eq!(
                d.mappings.len(),
                m.maps.len(),
                "mappings of domain {}",
                d.id
            );
            for (x, (&start, y)) in d.mappings.iter().zip(&m.maps) {
                assert_eq!(
                    (x.iova, x.iova_end, x.gpa, x.flags.bits()),
                    (start, y.end, y.gpa, y.flags)
                );
            }
        }
    }

    fn iommu_translate(&mut self, ep: usize, addr: u64, mut len: u64, access: Permissions) {
        let reaches_top = last_byte(addr, len) == Some(u64::MAX);
        let valid = last_byte(addr, len).is_some_and(|l| l <= self.model.config.input_end());
        if self.model.route(ep) == Route::Identity && valid && !reaches_top {
            // Each IOTLB fill covers at most 1 GiB of an identity range,
            // and a range needing more than IOTLB_CAPACITY (4096) fills is
            // refused only after 8192 of them (~0.1 s here): keep such
            // ranges to 8 GiB (9 fills). Virtio's 32-bit descriptor
            // lengths cannot ask for more than 4 GiB anyway.
            len = len.min(MAX_IDENTITY_LEN);
        }
        let before = faults(&self.w);
        let expect = self.model.translate(ep, addr, len, access);
        let res =
            vm_memory::Iommu::translate(&self.w.eps[ep], GuestAddress(addr), len as usize, access);
        match res {
            Ok(pieces) => {
                assert!(!reaches_top, "the IOTLB cannot hold the last byte");
                let mut cur = addr;
                let mut total = 0u64;
                for p in pieces {
                    let n = p.length as u64;
                    assert!(n > 0, "an empty piece");
                    // Each byte of the piece translates as in the model.
                    // (A piece may wrap around the guest-physical space:
                    // vm-memory's IOTLB merges IOVA-adjacent entries with
                    // equal wrapping offsets, such as the last GPA page
                    // followed by page 0; vm-memory's users check ranges.)
                    let want = self.model.translate(ep, cur, n, access);
                    let mut at = p.base.0;
                    let same = want.as_ref().is_ok_and(|rs| {
                        rs.iter().all(|r| {
                            let same = r.gpa == at;
                            at = at.wrapping_add(r.len);
                            same
                        })
                    });
                    assert!(
                        same,
                        "IOTLB piece at {cur:#x}+{n:#x} of {addr:#x}+{len:#x} -> {:#x}; model {want:?}",
                        p.base.0
                    );
                    total += n;
                    cur = cur.wrapping_add(n);
                }
                assert!(len > 0, "an empty range translated");
                assert_eq!(total, len, "translated in part");
                assert_eq!(faults(&self.w), before, "a fault for a success");
            }
            Err(_) => {
                // A range of up to IOTLB_CAPACITY (4096) pieces is never
                // refused for its length: domains hold at most
                // MAX_PER_DOMAIN mappings here, identity ranges are kept
                // to 9 pieces.
                assert!(
                    expect.is_err() || reaches_top,
                    "{addr:#x}+{len:#x} {access:?} refused; the model translates it: {expect:?}"
                );
                let reported = match expect {
                    Err(e) => reports(e, len),
                    Ok(_) => reaches_top,
                };
                assert_eq!(
                    faults(&self.w) - before,
                    u64::from(reported),
                    "faults reported for refusing {addr:#x}+{len:#x} ({expect:?})"
                );
            }
        }
    }

    fn translate(&mut self, ep: usize, addr: u64, len: u64, access: Permissions) {
        let before = faults(&self.w);
        let expect = self.model.translate(ep, addr, len, access);
        let got = self.w.eps[ep]
            .translate(addr, len, access)
            .map(|r| r.as_slice().to_vec());
        assert_eq!(got, expect, "translate {addr:#x}+{len:#x} {access:?}");
        let reported = got.is_err_and(|e| reports(e, len));
        assert_eq!(faults(&self.w) - before, u64::from(reported));
    }

    fn pin(&mut self, ep: usize, addr: u64, len: u64, access: Permissions) {
        let before = faults(&self.w);
        let mut expect = self.model.translate(ep, addr, len, access);
        let held = self.pins.iter().filter(|(e, _)| *e == ep).count();
        if expect.is_ok() && held >= MAX_PINS {
            expect = Err(TranslateError::TooManyPins);
        }
        match self.w.eps[ep].pin(addr, len, access) {
            Ok(p) => {
                assert_eq!(Ok(p.ranges()), expect.as_deref(), "pin {addr:#x}+{len:#x}");
                assert_eq!((p.iova(), p.len()), (addr, len));
                assert_eq!(faults(&self.w), before);
                if self.pins.len() < 32 {
                    self.pins.push((ep, p));
                }
            }
            Err(e) => {
                assert_eq!(Err(e), expect, "pin {addr:#x}+{len:#x} {access:?}");
                assert_eq!(faults(&self.w) - before, u64::from(reports(e, len)));
            }
        }
    }

    fn lease(&mut self, ep: usize, specs: &[AreaSpec]) {
        let before = faults(&self.w);
        let expect: Result<Vec<_>, _> = specs
            .iter()
            .map(|s| self.model.lease(ep, s).map_err(|e| (e, s.len)))
            .collect();
        match self.w.eps[ep].lease_queue_areas(specs, self.hook.clone()) {
            Ok(areas) => {
                let gpas = expect.expect("the model leases it too");
                assert!(!areas.is_revoked());
                for ((spec, got), (want_spec, want)) in areas.areas().zip(specs.iter().zip(&gpas)) {
                    assert_eq!(spec, *want_spec);
                    assert_eq!(got, &want[..], "lease of {spec:?}");
                }
                assert_eq!(faults(&self.w), before);
                if self.leases.len() < 8 {
                    self.leases.push(Lease {
                        ep,
                        areas,
                        specs: specs.to_vec(),
                        gpas,
                    });
                }
            }
            Err(e) => {
                let (want, len) = expect.expect_err("the model refuses it too");
                assert_eq!(e, want, "lease of {specs:?}");
                assert_eq!(faults(&self.w) - before, u64::from(reports(e, len)));
            }
        }
    }

    /// An access through a lease, inside an area (the cached
    /// translation) or anywhere (pinned for the access): it succeeds
    /// exactly when the model translates it, and reads or writes the
    /// model's guest-physical bytes.
    fn lease_access(&mut self, i: usize, input: &mut Input) -> Option<()> {
        let (ep, specs) = (self.leases[i].ep, &self.leases[i].specs);
        let n = usize::from(input.u8()? % 32) + 1;
        let addr = if input.bool()? {
            let s = specs[usize::from(input.u8()?) % specs.len()];
            s.iova.wrapping_add(u64::from(input.u16()?) % s.len)
        } else {
            self.addr(input)?
        };
        let write = input.bool()?;
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let dest = self.model.translate(ep, addr, n as u64, access);
        // The control mode never revokes a lease: inside its areas it
        // keeps the translation it was made with, whatever happened since.
        let stale = !self.model.config.drain
            && last_byte(addr, n as u64).is_some_and(|last| {
                specs.iter().any(|s| {
                    s.iova <= addr && last <= s.iova + (s.len - 1) && s.access.allow(access)
                })
            });
        let low = |r: &[GpaRange]| r.iter().any(|r| r.gpa < BUF_END);
        let cached_low = self.leases[i].gpas.iter().any(|g| low(g));
        if write && (dest.as_deref().is_ok_and(low) || cached_low) {
            return Some(()); // would overwrite the harness's rings or slots
        }
        let held = self.pins.iter().filter(|(e, _)| *e == ep).count();
        let l = &self.leases[i];
        let Some(mem) = l.areas.memory(&self.w.mem) else {
            assert!(l.areas.is_revoked());
            return Some(());
        };
        let mut buf = [0u8; 32];
        let buf = &mut buf[..n];
        let res = if write {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = 0x5a ^ k as u8;
            }
            mem.write_slice(buf, GuestAddress(addr))
        } else {
            mem.read_slice(buf, GuestAddress(addr))
        };
        drop(mem);
        match dest {
            _ if stale => {}
            // An access outside the areas takes a pin: it may hit the limit.
            Ok(ranges)
                if held < MAX_PINS
                    && ranges.iter().all(|r| {
                        r.gpa
                            .checked_add(r.len)
                            .is_some_and(|e| e <= MEM_SIZE as u64)
                    }) =>
            {
                assert!(res.is_ok(), "access {addr:#x}+{n} through a lease: {res:?}");
                let mut back = [0u8; 32];
                let mut off = 0;
                for r in &ranges {
                    let k = r.len as usize;
                    self.w
                        .mem
                        .read_slice(&mut back[off..off + k], GuestAddress(r.gpa))
                        .unwrap();
                    off += k;
                }
                assert_eq!(&back[..n], &buf[..], "a leased access at the wrong place");
            }
            Ok(_) => {}
            Err(e) => assert!(res.is_err(), "access {addr:#x}+{n} through a lease: {e:?}"),
        }
        Some(())
    }

    fn step(&mut self, input: &mut Input) -> Option<()> {
        let g = self.model.granule();
        match input.u8()? % 16 {
            0 | 1 => {
                let domain = Self::domain(input)?;
                let start = match input.u8()? % 4 {
                    0 => u64::from(input.u16()?) * g,
                    1 => 0u64.wrapping_sub((u64::from(input.u8()?) + 1) * g),
                    2 => self.point(input.u8()?),
                    _ => input.u64()?,
                };
                let end = match input.u8()? % 4 {
                    0 => start.wrapping_add((u64::from(input.u8()? % 16) + 1) * g - 1),
                    1 => u64::MAX,
                    2 => self.point(input.u8()?).wrapping_sub(1),
                    _ => input.u64()?,
                };
                let gpa = match input.u8()? % 3 {
                    0 => u64::from(input.u16()?) * g,
                    // The top of the guest-physical space.
                    1 => 0u64.wrapping_sub(end.wrapping_sub(start).wrapping_add(1)),
                    _ => input.u64()?,
                };
                let flags = match input.u8()? {
                    f @ 0..=239 => [1, 2, 3, 3, 7, 4, 0][usize::from(f) % 7],
                    _ => input.u32()?,
                };
                self.request(Op::Map {
                    domain,
                    start,
                    end,
                    gpa,
                    flags,
                });
            }
            2 => {
                let domain = Self::domain(input)?;
                let (start, end) = match input.u8()? % 4 {
                    0 => {
                        let p = self.point(input.u8()? & 0x3f);
                        let q = self.point(input.u8()? | 0x40);
                        (p, q.wrapping_sub(1))
                    }
                    1 => (0, u64::MAX),
                    2 => {
                        let s = u64::from(input.u16()?) * g;
                        (s, s.wrapping_add((u64::from(input.u8()?) + 1) * g - 1))
                    }
                    _ => (input.u64()?, input.u64()?),
                };
                self.request(Op::Unmap { domain, start, end });
            }
            3 => {
                let domain = Self::domain(input)?;
                let ep = u32::from(input.u8()?) % (NUM_EPS as u32 + 1);
                let flags = match input.u8()? {
                    f @ 0..=249 => u32::from(f % 2),
                    _ => input.u32()?,
                };
                self.request(Op::Attach { domain, ep, flags });
            }
            4 => {
                let domain = Self::domain(input)?;
                let ep = u32::from(input.u8()?) % (NUM_EPS as u32 + 1);
                self.request(Op::Detach { domain, ep });
            }
            5 => {
                let v = input.u8()? % 3;
                if self.resetting {
                    // A driver touches the device again only once its
                    // reset has completed (the transport's status reads 0).
                    if self.w.dev.reset_pending() {
                        return Some(());
                    }
                    self.resetting = false;
                }
                let at = CONFIG_BYPASS_OFFSET as u64;
                let mut b = [0u8];
                self.w.dev.read_config(at, &mut b);
                let draining = b[0] == 1 && !self.model.bypass;
                assert!(
                    b[0] == u8::from(self.model.bypass) || (draining && !self.pins.is_empty()),
                    "bypass reads {} (model {})",
                    b[0],
                    self.model.bypass
                );
                self.w.dev.write_config(at, &[v]);
                if !draining && v <= 1 {
                    self.model.bypass = v == 1;
                }
                self.check_leases();
            }
            6..=8 => {
                let ep = usize::from(input.u8()?) % NUM_EPS;
                let addr = self.addr(input)?;
                let len = self.len(input, addr)?;
                let access = input.access()?;
                self.iommu_translate(ep, addr, len, access);
            }
            9 => {
                let ep = usize::from(input.u8()?) % NUM_EPS;
                let addr = self.addr(input)?;
                let len = self.len(input, addr)?;
                let access = input.access()?;
                self.translate(ep, addr, len, access);
            }
            10 => {
                let ep = usize::from(input.u8()?) % NUM_EPS;
                let addr = self.addr(input)?;
                let len = self.len(input, addr)?;
                let access = input.access()?;
                self.pin(ep, addr, len, access);
            }
            11 => {
                // Release pins: a parked request may complete.
                let keep = usize::from(input.u8()?) % (self.pins.len() + 1);
                self.pins.truncate(keep);
                self.process();
            }
            12 => {
                let ep = usize::from(input.u8()?) % NUM_EPS;
                let n = usize::from(input.u8()? % 3) + 1;
                let mut specs = [AreaSpec {
                    iova: 0,
                    len: 0,
                    access: Permissions::Read,
                }; 3];
                for s in &mut specs[..n] {
                    let iova = self.addr(input)?;
                    *s = AreaSpec {
                        iova,
                        len: self.len(input, iova)?,
                        access: input.access()?,
                    };
                }
                self.lease(ep, &specs[..n]);
            }
            13 => {
                if self.leases.is_empty() {
                    return Some(());
                }
                let i = usize::from(input.u8()?) % self.leases.len();
                if input.u8()? % 4 == 0 {
                    self.leases.swap_remove(i);
                    self.process();
                } else {
                    self.lease_access(i, input)?;
                }
            }
            14 => {
                // Device reset (or system reset), then the driver sets the
                // queues up again; pins may still be held.
                if input.u8()? % 4 != 0 {
                    return Some(());
                }
                let complete = if input.bool()? {
                    self.model.bypass = self.model.config.bypass;
                    self.w.dev.system_reset()
                } else {
                    self.w.dev.reset()
                };
                self.resetting |= !complete;
                let f = self.w.dev.device_features();
                self.w.dev.ack_features(f);
                self.w.reset_queues();
                self.pending.clear();
                self.model.reset();
                self.check_leases();
            }
            _ => self.check_snapshot(),
        }
        Some(())
    }

    fn check(&mut self, data: &mut Input) {
        for _ in 0..64 {
            if self.step(data).is_none() {
                break;
            }
        }
        // Release everything: nothing may stay parked or pending.
        self.pins.clear();
        self.leases.clear();
        self.process();
        assert!(self.pending.is_empty(), "requests never replied to");
        assert!(self.w.dev.parked_drain().is_none());
        assert!(!self.w.dev.reset_pending());
        self.check_snapshot();
        // Back to the state `new` left: the next input starts there too.
        self.w.reset();
        self.model = Model::new(self.model.config.clone());
        self.slot = 0;
        self.resetting = false;
    }
}

thread_local! {
    static FUZZ: RefCell<[Option<Fuzz>; CONFIGS]> = const { RefCell::new([None, None, None]) };
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(v) = input.u8() else {
        return;
    };
    let v = usize::from(v) % CONFIGS;
    FUZZ.with_borrow_mut(|f| f[v].get_or_insert_with(|| Fuzz::new(v)).check(&mut input));
});
