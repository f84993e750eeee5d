//! The translation API that endpoint devices hold: one [`EndpointHandle`]
//! per endpoint, with `translate`, `pin` and a `vm_memory::Iommu`
//! implementation.

use std::fmt;
use std::ops::Deref;

use vm_memory::iommu::IotlbIterator;
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::events::Fault;
use crate::sync::Arc;
use crate::tracker::{last_byte, EndpointCore, GpaRanges, Pin, RevokeHook, Route, TranslateError};

/// The per-endpoint translation handle.
///
/// Cheap to clone; every clone refers to the same endpoint. Create it with
/// [`crate::VirtioIommu::add_endpoint`].
#[derive(Clone)]
pub struct EndpointHandle {
    pub(crate) core: Arc<EndpointCore>,
    /// The pin shard this handle uses; `None`: the calling thread's.
    shard: Option<usize>,
}

impl fmt::Debug for EndpointHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointHandle")
            .field("endpoint", &self.core.id)
            .finish()
    }
}

impl EndpointHandle {
    /// The endpoint ID.
    pub fn id(&self) -> u32 {
        self.core.id
    }

    /// A handle to the same endpoint whose pins go to the shard of queue
    /// `queue` ([`crate::tracker::PIN_SHARDS`] shards, queue index modulo
    /// their number).
    ///
    /// Threads that pin through one endpoint at once should not share a
    /// shard: each pin takes its shard's lock, and two CPUs passing one
    /// lock back and forth make every pin several times slower. A plain
    /// handle picks a shard per thread, which is right when each thread
    /// serves its own queues; a VMM whose threads serve queues in turn
    /// gives each queue its own handle from this call. Strictness does not
    /// depend on the choice: an invalidation waits for the pins of every
    /// shard.
    pub fn on_queue(&self, queue: u16) -> EndpointHandle {
        EndpointHandle {
            core: self.core.clone(),
            shard: Some(usize::from(queue) % crate::tracker::PIN_SHARDS),
        }
    }

    fn shard_hint(&self) -> usize {
        self.shard.unwrap_or_else(crate::tracker::thread_shard)
    }

    /// Reports a failed translation of `[iova, iova + len)` as a fault
    /// record: R_DOMAIN when the endpoint is blocked, R_MAPPING (at the
    /// first address that failed) when the range is unmapped, not
    /// permitted, wraps or leaves the input range. Resource limits
    /// (fragmentation, pin and area counts) are the VMM's, not faults, and
    /// so is an empty range.
    pub(crate) fn report_fault(
        &self,
        err: TranslateError,
        iova: u64,
        len: u64,
        access: Permissions,
    ) {
        let id = self.core.id;
        let f = match err {
            TranslateError::NotAttached => Fault::domain(id, access),
            TranslateError::NotMapped(a) | TranslateError::Permission(a) => {
                Fault::mapping(id, a, access)
            }
            TranslateError::BadRange if len > 0 => Fault::mapping(id, iova, access),
            TranslateError::BadRange
            | TranslateError::TooFragmented
            | TranslateError::TooManyPins
            | TranslateError::TooManyAreas
            | TranslateError::Fenced => return,
        };
        self.core.shared.faults.report(f, &self.core.shared.metrics);
    }

    /// Translates `[iova, iova + len)` for `access` without pinning it.
    ///
    /// The result is only a snapshot: nothing stops an UNMAP from removing
    /// the translation right after. Use it to validate addresses; any memory
    /// access through the result must be covered by a [`Pin`] instead (see
    /// [`EndpointHandle::pin`] and [`EndpointHandle::with_pin`]).
    /// A failure is reported as a fault on the event queue.
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<GpaRanges, TranslateError> {
        self.core
            .translate(self.shard_hint(), iova, len, access)
            .inspect_err(|&e| self.report_fault(e, iova, len, access))
    }

    /// Translates `[iova, iova + len)` for `access` and pins it: until the
    /// returned guard is dropped, every UNMAP, DETACH or ATTACH that removes
    /// any part of this translation waits before it replies.
    ///
    /// A failure is reported as a fault on the event queue.
    pub fn pin(&self, iova: u64, len: u64, access: Permissions) -> Result<Pin, TranslateError> {
        self.pin_inner(iova, len, access, None)
    }

    /// Like [`EndpointHandle::pin`], with a hook the tracker calls when an
    /// invalidation has waited for this pin longer than the grace period.
    /// The hook should cancel the I/O; the pin must still be dropped for the
    /// invalidation to complete.
    pub fn pin_revocable(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        revoke: RevokeHook,
    ) -> Result<Pin, TranslateError> {
        self.pin_inner(iova, len, access, Some(revoke))
    }

    fn pin_inner(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        revoke: Option<RevokeHook>,
    ) -> Result<Pin, TranslateError> {
        match self.core.pin(self.shard_hint(), iova, len, access, revoke) {
            Ok((ranges, at)) => Ok(Pin::new(&self.core, at, iova, len, ranges)),
            Err(e) => {
                self.report_fault(e, iova, len, access);
                Err(e)
            }
        }
    }

    /// Pins the range for the duration of `f`, which gets the GPA ranges.
    pub fn with_pin<R>(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        f: impl FnOnce(&Pin) -> R,
    ) -> Result<R, TranslateError> {
        let pin = self.pin(iova, len, access)?;
        Ok(f(&pin))
    }

    /// Number of pins this endpoint currently holds.
    pub fn pins_in_flight(&self) -> usize {
        self.core.pins_live()
    }

    /// Whether the endpoint currently translates (attached, or in bypass).
    pub fn is_translating(&self) -> bool {
        !matches!(
            self.core.lock_primary().route(&self.core.shared),
            Route::Blocked
        )
    }

    /// Whether the endpoint currently sees identity translation.
    pub fn is_bypassed(&self) -> bool {
        matches!(
            self.core.lock_primary().route(&self.core.shared),
            Route::Identity(_)
        )
    }

    /// Before `n` IOTLB fills (under its write lock): marks the IOTLB used
    /// and empties it if the fills would take it past `IOTLB_CAPACITY`
    /// entries, so that what a guest can make it cache stays bounded (it
    /// is a cache: an entry dropped is refilled from the domain on the
    /// next miss).
    fn make_room(&self, tlb: &mut Iotlb, n: usize) {
        use std::sync::atomic::Ordering;
        self.core.iotlb_used.store(true, Ordering::Release);
        let fills = &self.core.iotlb_fills;
        if fills.load(Ordering::Relaxed) + n > IOTLB_CAPACITY {
            tlb.invalidate_all();
            fills.store(0, Ordering::Relaxed);
        }
        fills.fetch_add(n, Ordering::Relaxed);
    }

    /// Fills the IOTLB for `[iova, last]` (from a lookup's first miss to
    /// the end of the range) in one pass, under the same locks as a pin,
    /// so that an invalidation cannot slip between the lookup and the fill
    /// (the invalidation clears the IOTLB after it has removed the mapping
    /// under the domain's write lock). A range over more than
    /// `IOTLB_CAPACITY` mappings is refused before anything is filled.
    fn fill_iotlb(&self, iova: u64, last: u64, access: Permissions) -> Result<(), TranslateError> {
        // The primary shard's lock: an attachment change updates it before
        // it empties the IOTLB, so a fill through the old route is seen.
        let st = self.core.lock_primary();
        match st.route(&self.core.shared) {
            Route::Blocked => Err(TranslateError::NotAttached),
            Route::Identity(_) => {
                // Identity: one entry from the first miss's page to the
                // end of the range (at least 1 GiB, to serve neighbours),
                // inside the input range. The IOTLB's ranges are
                // end-exclusive, so the space's last byte is never cached
                // (the caller refuses ranges that reach it).
                let base = iova & !0xfff;
                let end = self.core.shared.input_end.min(u64::MAX - 1);
                let want = (last - base).saturating_add(1).max(1 << 30);
                let len = (end - base).saturating_add(1).min(want);
                let len = usize::try_from(len).map_err(|_| TranslateError::BadRange)?;
                let mut tlb = self.core.iotlb.write().unwrap_or_else(|e| e.into_inner());
                self.make_room(&mut tlb, 1);
                tlb.set_mapping(
                    GuestAddress(base),
                    GuestAddress(base),
                    len,
                    Permissions::ReadWrite,
                )
                .map_err(|_| TranslateError::BadRange)
            }
            Route::Domain(d) => {
                let tree = d.mappings.read(0);
                let mut found = Vec::new();
                let mut cur = iova;
                loop {
                    let m = tree.lookup(cur).ok_or(TranslateError::NotMapped(cur))?;
                    if !m.flags.allows(access) {
                        return Err(TranslateError::Permission(cur));
                    }
                    if found.len() == IOTLB_CAPACITY {
                        return Err(TranslateError::TooFragmented);
                    }
                    found.push(m);
                    if m.iova_end >= last {
                        break;
                    }
                    cur = m.iova_end + 1;
                }
                let mut tlb = self.core.iotlb.write().unwrap_or_else(|e| e.into_inner());
                self.make_room(&mut tlb, found.len());
                for m in found {
                    // End-exclusive in the IOTLB: a mapping that reaches
                    // the last byte of the space is cached without it.
                    let len = m.size().min(u64::MAX - m.iova);
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    tlb.set_mapping(
                        GuestAddress(m.iova),
                        GuestAddress(m.gpa),
                        len,
                        m.flags.permissions(),
                    )
                    .map_err(|_| TranslateError::BadRange)?;
                }
                Ok(())
            }
        }
    }
}

/// Entries an endpoint's IOTLB (the `vm_memory::Iommu` path's cache) may
/// hold before it is emptied: bounds its memory (about 50 bytes an entry)
/// whatever the guest maps, and equals the most pieces one translation
/// may have ([`crate::tracker::MAX_RANGES_PER_TRANSLATION`]).
pub const IOTLB_CAPACITY: usize = crate::tracker::MAX_RANGES_PER_TRANSLATION;

/// The read guard over an endpoint's IOTLB that an [`IotlbIterator`] holds.
pub struct IotlbReadGuard<'a>(std::sync::RwLockReadGuard<'a, Iotlb>);

impl Deref for IotlbReadGuard<'_> {
    type Target = Iotlb;
    fn deref(&self) -> &Iotlb {
        &self.0
    }
}

/// `vm_memory::Iommu` over the endpoint, so that `IommuMemory` (and so
/// virtio-queue's `Reader`/`Writer`) translate through it.
///
/// The translation is valid while the returned iterator lives: an
/// invalidation clears this endpoint's IOTLB under its write lock, so it
/// waits for iterators still alive. Slices taken out of the iterator and
/// used after it is dropped (as `Reader::new` does) are not covered: hold a
/// [`Pin`] over the buffers for the whole access in that case. Do not call
/// `pin` while holding an iterator of the same endpoint.
impl vm_memory::Iommu for EndpointHandle {
    type IotlbGuard<'a> = IotlbReadGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, vm_memory::iommu::Error> {
        let range_err = |reason: String| vm_memory::iommu::Error::CannotResolve {
            iova_range: vm_memory::iommu::IovaRange { base: iova, length },
            reason,
        };
        // Guest-chosen (address, length): checked before any arithmetic.
        // The IOTLB works with end-exclusive u64 ranges, so a range must
        // end below 2^64 - 1; it must also lie in the input range (and be
        // non-empty: nothing is translated for nothing).
        let len = length as u64;
        let in_range = last_byte(iova.0, len)
            .is_some_and(|last| last < u64::MAX && last <= self.core.shared.input_end);
        if !in_range {
            self.report_fault(TranslateError::BadRange, iova.0, len, access);
            return Err(range_err(TranslateError::BadRange.to_string()));
        }
        // A miss fills the rest of the range in one pass (refused when it
        // spans more mappings than the IOTLB holds); a second miss can
        // only come from an invalidation racing this call.
        let last = iova.0 + (len - 1);
        for _ in 0..4 {
            let guard = IotlbReadGuard(self.core.iotlb.read().unwrap_or_else(|e| e.into_inner()));
            let fails = match Iotlb::lookup(guard, iova, length, access) {
                Ok(it) => return Ok(it),
                Err(f) => f,
            };
            let first = fails
                .misses
                .iter()
                .chain(fails.access_fails.iter())
                .map(|r| r.base.0)
                .min()
                .ok_or_else(|| range_err("lookup failed without a reason".into()))?;
            match self.fill_iotlb(first, last, access) {
                Ok(()) => {}
                // A device-side limit, like a pin's (no fault record).
                Err(e @ TranslateError::TooFragmented) => return Err(range_err(e.to_string())),
                Err(e) => {
                    self.report_fault(e, first, len, access);
                    return Err(range_err(e.to_string()));
                }
            }
        }
        Err(range_err(
            "the translation kept changing under concurrent invalidations".into(),
        ))
    }
}

/// Endpoint operations shared with the address space.
impl EndpointHandle {
    pub(crate) fn new(core: Arc<EndpointCore>) -> Self {
        EndpointHandle { core, shard: None }
    }

    /// Clears the IOTLB entries of `[start, end]` (called after removal).
    pub(crate) fn invalidate_iotlb(core: &EndpointCore, start: u64, end: u64) {
        // Fills happen under the domain or endpoint lock that the caller's
        // removal went through, so a fill that mattered is visible here.
        if !core.iotlb_used.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut tlb = core.iotlb.write().unwrap_or_else(|e| e.into_inner());
        if start == 0 && end == u64::MAX {
            tlb.invalidate_all();
        } else {
            // End-exclusive: stop below 2^64 (the last byte is never cached).
            let len = (end - start).saturating_add(1).min(u64::MAX - start);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            tlb.invalidate_mapping(GuestAddress(start), len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;
    use crate::{IommuConfig, Status};

    /// Maps `n` single pages at IOVA `i << 13` (every other page, so no two
    /// are contiguous) to GPA `0x10_0000 + (i % 16) << 12`.
    fn scattered(n: u64) -> (Harness, EndpointHandle) {
        let mut h = Harness::new(IommuConfig::default());
        let ep = h.dev.add_endpoint(1).unwrap();
        assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
        for i in 0..n {
            let iova = i << 13;
            let gpa = 0x10_0000 + ((i % 16) << 12);
            assert_eq!(h.map(1, iova, iova + 0xfff, gpa, 3), Some(Status::Ok));
        }
        (h, ep)
    }

    #[test]
    fn the_iotlb_stays_within_its_capacity_and_keeps_translating() {
        let n = IOTLB_CAPACITY as u64 + 1000;
        let (_h, ep) = scattered(n);
        for round in 0..2 {
            for i in 0..n {
                let got: Vec<_> = vm_memory::Iommu::translate(
                    &ep,
                    GuestAddress((i << 13) + 8),
                    16,
                    Permissions::Read,
                )
                .unwrap()
                .collect();
                assert_eq!(got.len(), 1);
                assert_eq!(
                    got[0].base.0,
                    0x10_0000 + ((i % 16) << 12) + 8,
                    "round {round} page {i}"
                );
                let fills = ep
                    .core
                    .iotlb_fills
                    .load(std::sync::atomic::Ordering::Relaxed);
                assert!(fills <= IOTLB_CAPACITY, "{fills} entries cached");
            }
        }
    }

    #[test]
    fn a_range_over_more_pieces_than_the_iotlb_holds_is_refused() {
        // n contiguous IOVA pages whose GPAs are not contiguous: n pieces.
        let mut h = Harness::new(IommuConfig::default());
        let ep = h.dev.add_endpoint(1).unwrap();
        assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
        let n = IOTLB_CAPACITY as u64 + 1;
        for i in 0..n {
            let gpa = 0x10_0000 + ((i % 2) << 16) + ((i % 16) << 12);
            assert_eq!(
                h.map(1, i << 12, (i << 12) + 0xfff, gpa, 3),
                Some(Status::Ok)
            );
        }
        let len = usize::try_from(n << 12).unwrap();
        let e = vm_memory::Iommu::translate(&ep, GuestAddress(0), len, Permissions::Read)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("fragmented"), "{e}");
        // Refused in one walk of the domain, before anything was cached
        // (not after thousands of fills and lookups).
        let fills = ep
            .core
            .iotlb_fills
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(fills, 0);
        // One piece fewer fits.
        let len = usize::try_from((n - 1) << 12).unwrap();
        let total: usize =
            vm_memory::Iommu::translate(&ep, GuestAddress(0), len, Permissions::Read)
                .unwrap()
                .map(|r| r.length)
                .sum();
        assert_eq!(total, len);
    }
}
