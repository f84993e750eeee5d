//! Queue-area translations: a virtqueue's rings translated once, used
//! through a lease, revoked by the invalidations that remove them.
//!
//! A device behind the IOMMU reads its descriptor table and available ring
//! and writes its used ring on every request. Translating each access
//! (`IommuMemory`, or a pin per access) costs an interval-tree lookup and
//! locks; translating once at queue enable and keeping the result, as
//! Cloud Hypervisor, QEMU and crosvm do, makes a ring usable after the
//! guest unmapped it. [`QueueAreas`] keeps the translation *and* stays
//! strict:
//!
//! - [`EndpointHandle::lease_queue_areas`] translates the areas once, in
//!   the same critical section that registers them with the endpoint
//!   (rule 1 of [`crate::tracker`]);
//! - every ring access happens inside an access section
//!   ([`QueueAreas::memory`] opens one, dropping the [`QueueMemory`] ends
//!   it): one compare-and-swap and one decrement, no lock an invalidation
//!   holds, no tree lookup (see [`crate::lease`]);
//! - an UNMAP, DETACH, ATTACH-move, bypass 1 -> 0 or reset that overlaps
//!   any area closes the lease: no section opens any more, the
//!   invalidation's reply waits for the sections open at that moment
//!   (exactly like a pin), the revoke hook tells the device (which should
//!   stop the queue and report DEVICE_NEEDS_RESET with a configuration
//!   interrupt), and an R_MAPPING fault record goes to the driver.
//!
//! # Invariant
//!
//! After the reply of an invalidation that overlaps an area, no access
//! through the leased translation is running and none can start: the
//! lease's invariant, plus the tracker's rules that make every overlapping
//! invalidation find the lease.
//!
//! Addresses outside the areas (an indirect descriptor table, say) go
//! through an ordinary [`Pin`] held for the duration of the access, so
//! [`QueueMemory`] can back a whole `virtio_queue::Queue`.
//!
//! A device must not block inside a section on anything that waits for
//! an invalidation's reply: sections are what replies wait for. The
//! device's own DMA (block I/O) is pinned as before; only ring accesses
//! belong in sections.

use std::fmt;
use std::iter::FusedIterator;

use vm_memory::bitmap::MS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryResult, MemoryRegionAddress, Permissions, VolatileSlice,
};

use crate::drain::Drain;
use crate::lease::Lease;
use crate::sync::Arc;
use crate::tracker::{
    last_byte, EndpointCore, GpaRange, GpaRanges, Pin, RevokeHook, TranslateError,
};
use crate::translate::EndpointHandle;

/// One area a device accesses for as long as its queue runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AreaSpec {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// How the device accesses it.
    pub access: Permissions,
}

impl AreaSpec {
    /// The three areas of a split virtqueue of `size` entries (virtio 1.2,
    /// 2.7): the descriptor table (16 bytes per entry, read), the
    /// available ring (6 + 2 * size bytes, read) and the used ring
    /// (6 + 8 * size bytes, written).
    pub fn split_queue(desc: u64, avail: u64, used: u64, size: u16) -> [AreaSpec; 3] {
        let n = u64::from(size);
        [
            AreaSpec {
                iova: desc,
                len: 16 * n,
                access: Permissions::Read,
            },
            AreaSpec {
                iova: avail,
                len: 6 + 2 * n,
                access: Permissions::Read,
            },
            AreaSpec {
                iova: used,
                len: 6 + 8 * n,
                access: Permissions::Write,
            },
        ]
    }
}

const EMPTY_SPEC: AreaSpec = AreaSpec {
    iova: 0,
    len: 0,
    access: Permissions::No,
};

/// An area and its cached translation.
#[derive(Debug)]
struct CachedArea {
    iova: u64,
    last: u64,
    access: Permissions,
    gpa: GpaRanges,
}

impl CachedArea {
    /// The GPA pieces of `[iova, iova + len)`, which lies inside the area:
    /// the first one, and (for an area that is fragmented in GPA space and
    /// an access that crosses a fragment) the others in order.
    #[inline]
    fn pieces(&self, iova: u64, len: u64) -> (GpaRange, Vec<GpaRange>) {
        let off = iova - self.iova;
        if let GpaRanges::One(r) = &self.gpa {
            // The common case: one contiguous range, no allocation.
            let first = GpaRange {
                gpa: r.gpa.wrapping_add(off),
                len,
            };
            return (first, Vec::new());
        }
        let mut skip = off;
        let mut left = len;
        let mut out = Vec::new();
        for r in self.gpa.as_slice() {
            if skip >= r.len {
                skip -= r.len;
                continue;
            }
            let n = (r.len - skip).min(left);
            out.push(GpaRange {
                gpa: r.gpa.wrapping_add(skip),
                len: n,
            });
            left -= n;
            skip = 0;
            if left == 0 {
                break;
            }
        }
        let first = out.remove(0);
        (first, out)
    }
}

/// A device's leased translation of its queue areas. Dropping it lets the
/// translation go (the device reset its queue).
pub struct QueueAreas {
    ep: EndpointHandle,
    serial: u64,
    lease: Arc<Lease<Arc<Drain>>>,
    areas: Vec<CachedArea>,
}

impl fmt::Debug for QueueAreas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueAreas")
            .field("endpoint", &self.ep.id())
            .field("areas", &self.areas)
            .field("revoked", &self.is_revoked())
            .field("open_sections", &self.lease.open_sections())
            .finish()
    }
}

impl EndpointHandle {
    /// Translates `areas` for as long as the device uses them (a queue's
    /// rings, from queue enable to reset) and registers them, so that any
    /// invalidation that overlaps one revokes the lot: `revoke` is called
    /// (by the invalidating thread, with no lock held; it must not block on
    /// the IOMMU), later sections fail, and the invalidation's reply waits
    /// for the sections open at that moment.
    ///
    /// Every area must be translatable with its access; a failure is
    /// reported as a fault on the event queue and nothing is registered.
    pub fn lease_queue_areas(
        &self,
        areas: &[AreaSpec],
        revoke: RevokeHook,
    ) -> Result<QueueAreas, TranslateError> {
        self.lease_inner(areas, revoke).map_err(|(e, s)| {
            self.report_fault(e, s.iova, s.len, s.access);
            e
        })
    }

    fn lease_inner(
        &self,
        specs: &[AreaSpec],
        revoke: RevokeHook,
    ) -> Result<QueueAreas, (TranslateError, AreaSpec)> {
        let lease = Arc::new(Lease::new());
        let raw: Vec<(u64, u64, Permissions)> =
            specs.iter().map(|s| (s.iova, s.len, s.access)).collect();
        let (gpas, serial) = self
            .core
            .lease_areas(&raw, lease.clone(), Some(revoke))
            .map_err(|(e, i)| (e, specs.get(i).copied().unwrap_or(EMPTY_SPEC)))?;
        let areas = specs
            .iter()
            .zip(gpas)
            .map(|(s, gpa)| CachedArea {
                iova: s.iova,
                // lease_areas checked that this does not wrap.
                last: s.iova + (s.len - 1),
                access: s.access,
                gpa,
            })
            .collect();
        Ok(QueueAreas {
            ep: self.clone(),
            serial,
            lease,
            areas,
        })
    }
}

impl QueueAreas {
    /// The endpoint the areas belong to.
    pub fn endpoint(&self) -> &EndpointHandle {
        &self.ep
    }

    /// Whether an invalidation revoked the areas. Once true it stays true:
    /// the device must reset the queue (and lease the areas again) to use
    /// it.
    pub fn is_revoked(&self) -> bool {
        self.lease.is_closed()
    }

    /// The areas and their guest-physical ranges, as translated.
    pub fn areas(&self) -> impl Iterator<Item = (AreaSpec, &[GpaRange])> {
        self.areas.iter().map(|a| {
            (
                AreaSpec {
                    iova: a.iova,
                    len: a.last - a.iova + 1,
                    access: a.access,
                },
                a.gpa.as_slice(),
            )
        })
    }

    /// Opens an access section; `None` once the areas are revoked. Keep
    /// sections short and do not block in them (see the module
    /// documentation).
    pub fn enter(&self) -> Option<AreaGuard<'_>> {
        self.lease.enter().then(|| AreaGuard { areas: self })
    }

    /// Opens an access section and returns guest memory as the device sees
    /// it through the areas, backed by `phys` (guest-physical memory):
    /// accesses inside an area use the cached translation, others are
    /// pinned for their duration. `None` once the areas are revoked.
    ///
    /// The section also resolves each area's memory region once, so that
    /// an access inside an area is a bounds check and a pointer offset.
    pub fn memory<'a, M: GuestMemoryBackend>(&'a self, phys: &'a M) -> Option<QueueMemory<'a, M>> {
        let guard = self.enter()?;
        let mut hosts = [None; FAST_AREAS];
        for (h, a) in hosts.iter_mut().zip(&self.areas) {
            let GpaRanges::One(r) = &a.gpa else {
                continue;
            };
            let Some((region, base)) = phys.to_region_addr(GuestAddress(r.gpa)) else {
                continue;
            };
            // The whole area inside the one region, or no shortcut.
            let inside = r
                .len
                .checked_sub(1)
                .and_then(|l| base.checked_add(l))
                .and_then(|last| region.check_address(last))
                .is_some();
            if inside {
                *h = Some((region, base));
            }
        }
        Some(QueueMemory { guard, phys, hosts })
    }

    /// The area (and its index) holding all of `[iova, iova + len)` with
    /// `access`.
    #[inline]
    fn area_of(&self, iova: u64, len: u64, access: Permissions) -> Option<(usize, &CachedArea)> {
        let last = last_byte(iova, len)?;
        self.areas
            .iter()
            .enumerate()
            .find(|(_, a)| a.iova <= iova && last <= a.last && a.access.allow(access))
    }
}

impl Drop for QueueAreas {
    fn drop(&mut self) {
        self.ep.core.remove_area_record(self.serial);
    }
}

/// An open access section of a [`QueueAreas`]; ends when dropped.
pub struct AreaGuard<'a> {
    areas: &'a QueueAreas,
}

impl fmt::Debug for AreaGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AreaGuard")
            .field("endpoint", &self.areas.ep.id())
            .finish()
    }
}

impl Drop for AreaGuard<'_> {
    fn drop(&mut self) {
        EndpointCore::exit_lease(&self.areas.lease);
    }
}

/// Areas whose memory region a section resolves up front (a split queue
/// has three).
const FAST_AREAS: usize = 4;

/// Guest memory as a device sees it through its queue areas, for the
/// duration of one access section: a `vm_memory::GuestMemory`, so a
/// `virtio_queue::Queue` can pop chains and add used entries through it.
pub struct QueueMemory<'a, M: GuestMemoryBackend> {
    guard: AreaGuard<'a>,
    phys: &'a M,
    /// Per area (in order): its memory region and the region offset of its
    /// first byte, when the area is one GPA range inside one region.
    hosts: [Option<(&'a M::R, MemoryRegionAddress)>; FAST_AREAS],
}

impl<M: GuestMemoryBackend> fmt::Debug for QueueMemory<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueMemory")
            .field("guard", &self.guard)
            .finish()
    }
}

fn iommu_error(addr: GuestAddress, count: usize, e: TranslateError) -> GuestMemoryError {
    GuestMemoryError::IommuError(IommuError::CannotResolve {
        iova_range: IovaRange {
            base: addr,
            length: count,
        },
        reason: e.to_string(),
    })
}

impl<M: GuestMemoryBackend> GuestMemory for QueueMemory<'_, M> {
    type PhysicalMemory = M;
    type Bitmap = <M::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let areas = self.guard.areas;
        let len = count as u64;
        if let Some((_, a)) = areas.area_of(addr.0, len, access) {
            let (first, rest) = a.pieces(addr.0, len);
            return std::iter::once(&first)
                .chain(rest.iter())
                .all(|r| self.phys.check_range(GuestAddress(r.gpa), r.len as usize));
        }
        match areas.ep.translate(addr.0, len, access) {
            Ok(ranges) => ranges.as_slice().iter().all(|r| {
                usize::try_from(r.len).is_ok_and(|l| self.phys.check_range(GuestAddress(r.gpa), l))
            }),
            Err(_) => false,
        }
    }

    #[inline]
    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'b, MS<'b, M>>> {
        let areas = self.guard.areas;
        let phys = self.phys;
        if count == 0 {
            return Ok(QueueSlices {
                phys,
                single: None,
                current: None,
                rest: None,
            });
        }
        let len = count as u64;
        if let Some((i, a)) = areas.area_of(addr.0, len, access) {
            if let Some(Some((region, base))) = self.hosts.get(i) {
                // Inside the area, hence inside its region (checked when
                // the section opened): one slice, no lookup.
                let at = MemoryRegionAddress(base.0 + (addr.0 - a.iova));
                let slice = region.get_slice(at, count)?;
                return Ok(QueueSlices {
                    phys,
                    single: Some(slice),
                    current: None,
                    rest: None,
                });
            }
            let (first, rest) = a.pieces(addr.0, len);
            return Ok(QueueSlices::new(phys, first, rest, None));
        }
        // Outside the areas (an indirect table): an ordinary pin for the
        // duration of the access. A failure is reported as a fault.
        let pin = areas
            .ep
            .pin(addr.0, len, access)
            .map_err(|e| iommu_error(addr, count, e))?;
        let mut ranges = pin.ranges().to_vec();
        let first = ranges.remove(0);
        Ok(QueueSlices::new(phys, first, ranges, Some(pin)))
    }
}

/// The slices of one [`QueueMemory`] access. Small on purpose: an access
/// inside an area (the hot path) is one physical-memory iterator; only an
/// access over several GPA pieces, or a pinned one, carries the rest in a
/// box.
pub struct QueueSlices<'b, M: GuestMemoryBackend> {
    phys: &'b M,
    /// The whole access as one slice (an area with a resolved region).
    single: Option<VolatileSlice<'b, MS<'b, M>>>,
    current: Option<GuestMemoryBackendSliceIterator<'b, M>>,
    rest: Option<Box<Rest>>,
}

/// The remaining pieces of a multi-piece access, and the pin that keeps an
/// access outside the areas translated while it runs.
struct Rest {
    pieces: std::vec::IntoIter<GpaRange>,
    _pin: Option<Pin>,
}

impl<'b, M: GuestMemoryBackend> QueueSlices<'b, M> {
    #[inline]
    fn new(phys: &'b M, first: GpaRange, rest: Vec<GpaRange>, pin: Option<Pin>) -> Self {
        let rest = (!rest.is_empty() || pin.is_some()).then(|| {
            Box::new(Rest {
                pieces: rest.into_iter(),
                _pin: pin,
            })
        });
        let current = usize::try_from(first.len)
            .ok()
            .map(|len| phys.get_slices(GuestAddress(first.gpa), len));
        QueueSlices {
            phys,
            single: None,
            current,
            rest,
        }
    }
}

impl<'b, M: GuestMemoryBackend> Iterator for QueueSlices<'b, M> {
    type Item = GuestMemoryResult<VolatileSlice<'b, MS<'b, M>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(s) = self.single.take() {
            return Some(Ok(s));
        }
        loop {
            if let Some(cur) = self.current.as_mut() {
                match cur.next() {
                    Some(Ok(s)) => return Some(Ok(s)),
                    Some(Err(e)) => {
                        // No items after an error.
                        self.current = None;
                        self.rest = None;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            let r = self.rest.as_mut()?.pieces.next()?;
            let Ok(len) = usize::try_from(r.len) else {
                self.rest = None;
                return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                    r.gpa,
                ))));
            };
            self.current = Some(self.phys.get_slices(GuestAddress(r.gpa), len));
        }
    }
}

impl<M: GuestMemoryBackend> FusedIterator for QueueSlices<'_, M> {}

impl<'b, M: GuestMemoryBackend> GuestMemorySliceIterator<'b, MS<'b, M>> for QueueSlices<'b, M> {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

    use super::{AreaSpec, QueueAreas};
    use crate::testing::{Harness, MEM_SIZE};
    use crate::tracker::GpaRange;
    use crate::{IommuConfig, Status};

    const EP: u32 = 8;
    const DOM: u32 = 1;
    const RW: u32 = 3;
    /// One two-page area whose pages are mapped to GPAs that are not
    /// contiguous, the second below the first.
    const IOVA: u64 = 0x80_0000;
    const GPA_A: u64 = 0x60_0000;
    const GPA_B: u64 = 0x40_0000;
    const PAGE: u64 = 0x1000;

    fn rig() -> Harness {
        let mut h = Harness::new(IommuConfig::default());
        h.dev.add_endpoint(EP).unwrap();
        assert_eq!(h.attach(DOM, EP, 0), Some(Status::Ok));
        assert_eq!(
            h.map(DOM, IOVA, IOVA + PAGE - 1, GPA_A, RW),
            Some(Status::Ok)
        );
        assert_eq!(
            h.map(DOM, IOVA + PAGE, IOVA + 2 * PAGE - 1, GPA_B, RW),
            Some(Status::Ok)
        );
        h
    }

    fn lease(h: &Harness, iova: u64, len: u64) -> QueueAreas {
        let spec = AreaSpec {
            iova,
            len,
            access: Permissions::ReadWrite,
        };
        h.dev
            .endpoint(EP)
            .unwrap()
            .lease_queue_areas(&[spec], Arc::new(|| {}))
            .unwrap()
    }

    #[test]
    fn an_area_split_in_gpa_space_is_accessed_through_each_piece() {
        let h = rig();
        let areas = lease(&h, IOVA, 2 * PAGE);
        let (spec, gpa) = areas.areas().next().unwrap();
        assert_eq!(spec.iova, IOVA);
        assert_eq!(spec.len, 2 * PAGE);
        assert_eq!(
            gpa,
            [
                GpaRange {
                    gpa: GPA_A,
                    len: PAGE
                },
                GpaRange {
                    gpa: GPA_B,
                    len: PAGE
                },
            ]
        );
        let mem = areas.memory(&h.mem).unwrap();

        // An access across the seam: its first half lands at the end of
        // the first page, its second half at the start of the second.
        let data: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
        let at = GuestAddress(IOVA + PAGE - 8);
        assert!(mem.check_range(at, 16, Permissions::Write));
        mem.write_slice(&data, at).unwrap();
        let lo: [u8; 8] = h.mem.read_obj(GuestAddress(GPA_A + PAGE - 8)).unwrap();
        let hi: [u8; 8] = h.mem.read_obj(GuestAddress(GPA_B)).unwrap();
        assert_eq!(lo, data[..8]);
        assert_eq!(hi, data[8..]);
        let mut back = [0u8; 16];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(back, data);

        // An access inside the second piece only.
        mem.write_obj(0xdead_beef_u32, GuestAddress(IOVA + PAGE + 0x100))
            .unwrap();
        let v: u32 = h.mem.read_obj(GuestAddress(GPA_B + 0x100)).unwrap();
        assert_eq!(v, 0xdead_beef);
        // Nothing of it went to the first page's GPA + 0x1100.
        let stray: u32 = h.mem.read_obj(GuestAddress(GPA_A + PAGE + 0x100)).unwrap();
        assert_eq!(stray, 0);

        // A zero-length access is empty, and an access running past the
        // area's end leaves the areas: it is translated like a pin, and
        // faults (nothing is mapped there), once per attempt.
        mem.write_slice(&[], GuestAddress(IOVA)).unwrap();
        assert_eq!(h.dev.pending_faults(), 0);
        let past = GuestAddress(IOVA + 2 * PAGE - 8);
        assert!(!mem.check_range(past, 16, Permissions::Write));
        assert_eq!(h.dev.pending_faults(), 1);
        assert!(mem.write_slice(&data, past).is_err());
        assert_eq!(h.dev.pending_faults(), 2);
        drop(mem);
        assert!(!areas.is_revoked());
    }

    #[test]
    fn an_area_mapped_outside_guest_ram_fails_the_access_without_a_panic() {
        let mut h = rig();
        // A mapping the driver may make: the GPA is past the end of RAM.
        let beyond = MEM_SIZE as u64;
        let iova = 0x90_0000;
        assert_eq!(
            h.map(DOM, iova, iova + PAGE - 1, beyond, RW),
            Some(Status::Ok)
        );
        let areas = lease(&h, iova, PAGE);
        let mem = areas.memory(&h.mem).unwrap();
        assert!(!mem.check_range(GuestAddress(iova), 8, Permissions::Read));
        assert!(mem.read_obj::<u64>(GuestAddress(iova)).is_err());
        assert!(mem.write_obj(1u64, GuestAddress(iova)).is_err());
    }
}
