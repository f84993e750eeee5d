//! The DMA tracker: pins, drains and revocation.
//!
//! # Protocol
//!
//! Every endpoint is split into [`PIN_SHARDS`] shards (`PinShard`), each
//! one mutex that guards a copy of the endpoint's attachment (which domain
//! translates for it) and a table of pins (DMA in flight) made through
//! that shard. Threads pinning through one endpoint at once (the queues of
//! one multi-queue disk) use different shards, so they do not pass one
//! lock between their CPUs on every pin. The protocol has three rules:
//!
//! 1. *Lookup-then-pin is one critical section.* `EndpointCore::pin`
//!    holds one shard's lock while it reads that shard's attachment, looks
//!    the range up in the domain's mapping tree (under the domain's read
//!    lock) and inserts the pin record into that shard's table.
//! 2. *Invalidation removes before it scans, every shard.* UNMAP removes
//!    the mappings under the domain's write lock and only then takes each
//!    attached endpoint's shard locks, one after the other, to collect
//!    overlapping pins. DETACH and ATTACH change each shard's copy of the
//!    attachment and collect that shard's pins in the same critical
//!    section of that shard.
//! 3. *A drain completes when its count reaches zero.* Every collected pin
//!    gets a reference to the [`Drain`]; releasing the pin (dropping the
//!    [`Pin`]) decrements the count. The request's reply is published only
//!    when the count is zero.
//!
//! A pin lives in exactly one shard. If it was created before the
//! invalidation's removal (or before its shard's attachment changed), it
//! is in that shard's table by the time the scan takes that shard's lock
//! (rule 1: the lookup that found the translation and the insertion
//! happened under the shard's lock, and the removal could not have
//! overtaken a lookup that already saw the mapping), so the scan sees it. A
//! pin attempted after the removal does not find the mapping, and one
//! attempted after its shard's attachment changed translates through the
//! new one. Hence, once the count is zero, no access through the removed
//! translation is running and none can start: the invariant. While the
//! shards of a DETACH or ATTACH are changed one by one, some translate
//! through the new attachment and some through the old; the guest sees
//! neither state, since the reply comes after the last shard and the drain.
//!
//! # Leased translations
//!
//! Queue areas ([`crate::queue_area`]) are translated once and then used
//! for as long as the queue runs, through a [`crate::lease`] rather than a
//! pin. Their records sit in the same endpoint table (`AreaRecord`) and
//! are found by the same scans (rule 2): an invalidation that overlaps one
//! closes its lease, makes the drain wait for the access sections open at
//! that moment, and, after the locks are dropped, calls the area's revoke
//! hook and reports an R_MAPPING fault. A lease made through a translation
//! is registered in the same critical section as its lookup (rule 1), so
//! the scan finds every lease that an invalidation must close. Leases are
//! rare (one per queue start), so they all live in shard 0, the *primary*
//! shard, which also answers questions about the attachment.

use vm_memory::Permissions;
use vmm_sys_util::eventfd::EventFd;

use crate::config::Limits;
use crate::drain::{Drain, Revocable};
use crate::lease::Lease;
use crate::mapping::MappingTree;
use crate::metrics::Metrics;
use crate::sync::{lock, Arc, Condvar, Mutex, MutexGuard, Ordering, ShardedRwLock};

/// A callback asked to cancel the DMA a pin protects. It must not block on
/// the tracker; it typically cancels an I/O whose completion drops the pin.
pub type RevokeHook = Arc<dyn Fn() + Send + Sync>;

/// `via` of a pin made through the global bypass (endpoint unattached).
pub(crate) const VIA_GLOBAL_BYPASS: u64 = 0;

/// A contiguous range of guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GpaRange {
    /// The last byte of the range (the first for an empty one), without
    /// wrapping past the top of the address space.
    pub(crate) fn last(&self) -> u64 {
        self.gpa.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether the range shares a byte with `[first, last]`.
    pub(crate) fn touches(&self, first: u64, last: u64) -> bool {
        self.gpa <= last && first <= self.last()
    }
}

/// A translation domain as seen by the translation path.
///
/// Aligned so that two domains never share a cache line: pins on
/// different domains must not slow each other down.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Domain {
    /// Guest-visible ID.
    pub id: u32,
    /// Unique over the device's lifetime (IDs are reused, `uid`s never).
    pub uid: u64,
    /// Endpoints of a bypass domain see identity translation.
    pub bypass: bool,
    /// IOVA -> GPA mappings.
    pub mappings: ShardedRwLock<MappingTree, PIN_SHARDS>,
}

impl Domain {
    pub(crate) fn new(id: u32, uid: u64, bypass: bool) -> Self {
        Domain {
            id,
            uid,
            bypass,
            mappings: ShardedRwLock::new(MappingTree::new()),
        }
    }
}

struct PinRecord {
    serial: u64,
    via: u64,
    start: u64,
    end: u64,
    revoke: Option<RevokeHook>,
    revoked: bool,
    waiters: Vec<Arc<Drain>>,
    /// What the pin's DMA may write (revocable pins only: those can be
    /// fenced, see `crate::fence`).
    gpa: Option<GpaRanges>,
    fence: PinFence,
    /// A fence claimed other pins on pages this one touches: its DMA may
    /// land in a page taken from the guest, so it reports `fenced` (see
    /// `EndpointCore::revoke_pins_on`).
    on_fenced_page: bool,
    /// Open write sections (`Pin::write_section`): the holder is writing
    /// the pin's pages through the guest's address space; a fence waits
    /// for them to close before it claims or marks the pin.
    writing: u32,
}

/// Where a pin stands with fences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PinFence {
    /// Not claimed by a fence.
    None,
    /// A fence is taking its pages away: it still holds its drains, and
    /// invalidations still collect it.
    Claimed,
    /// Its pages are no longer the guest's: it holds nothing, and is not
    /// collected again.
    Done,
}

/// The in-flight pins of one endpoint: a slab with a free list, so insert
/// and remove are O(1) and a guard names its slot.
#[derive(Default)]
pub(crate) struct PinTable {
    slots: Vec<Option<PinRecord>>,
    free: Vec<u32>,
    live: usize,
    next_serial: u64,
}

/// Pin slots allocated with each endpoint (in its primary shard).
const PIN_TABLE_PREALLOC: usize = 64;

/// Pin slots allocated when another shard takes its first pin.
const PIN_TABLE_FIRST_USE: usize = 16;

/// Shards of each endpoint's pin table (see the module documentation).
/// Pins made at once from more threads than this share shards; an
/// [`crate::EndpointHandle::on_queue`] handle picks one by queue index.
/// Loom models two: every interleaving across shards with fewer states.
#[cfg(not(loom))]
pub const PIN_SHARDS: usize = 4;
/// Shards of each endpoint's pin table (two in the loom models).
#[cfg(loom)]
pub const PIN_SHARDS: usize = 2;

impl PinTable {
    fn with_capacity(n: usize) -> Self {
        PinTable {
            slots: Vec::with_capacity(n),
            // Never smaller than a few cache lines, so that the free lists
            // of two endpoints cannot share one.
            free: Vec::with_capacity(n.max(64)),
            live: 0,
            next_serial: 0,
        }
    }

    fn insert(&mut self, rec: PinRecord) -> u32 {
        if self.slots.capacity() == 0 {
            // A shard's first pin: room for a few, and a free list of two
            // cache lines, so that this shard's hot data never shares a
            // line with a neighbour's allocation.
            self.slots.reserve(PIN_TABLE_FIRST_USE);
            self.free.reserve(32);
        }
        self.live += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(rec);
            i
        } else {
            self.slots.push(Some(rec));
            (self.slots.len() - 1) as u32
        }
    }

    fn remove(&mut self, slot: u32, serial: u64) -> Option<PinRecord> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.as_ref().map(|r| r.serial) != Some(serial) {
            return None;
        }
        self.live -= 1;
        self.free.push(slot);
        s.take()
    }

    /// Number of pins held.
    pub(crate) fn live(&self) -> usize {
        self.live
    }
}

/// A leased translation of an endpoint (its queue areas); see
/// [`crate::lease`] and [`crate::queue_area`].
pub(crate) struct AreaRecord {
    /// Identifies the record for its owner's deregistration.
    pub serial: u64,
    /// The translation it was made through (see [`PinRecord`]).
    pub via: u64,
    /// First IOVA, last IOVA and access of each area.
    pub areas: Vec<(u64, u64, Permissions)>,
    /// The lease the owner's accesses go through.
    pub lease: Arc<Lease<Arc<Drain>>>,
    /// Told when an invalidation closes the lease.
    pub revoke: Option<RevokeHook>,
}

/// Leased translations one endpoint may hold at once (three areas per
/// queue make one record): a device bug, not a guest, could exceed it.
pub const MAX_AREA_RECORDS_PER_ENDPOINT: usize = 1024;

/// What the translation path reads under a shard's lock.
pub(crate) struct EndpointState {
    /// The domain translating for the endpoint (the same in every shard
    /// once an attachment change has finished).
    pub domain: Option<Arc<Domain>>,
    /// DMA in flight through this shard.
    pub pins: PinTable,
    /// Leased translations (queue areas); in the primary shard only.
    pub areas: Vec<AreaRecord>,
    /// Serial of the next area record.
    pub next_area_serial: u64,
}

/// Flags shared by every endpoint of a device.
pub(crate) struct Shared {
    /// The config space's `bypass` byte (a loom atomic in the models: the
    /// route of an unattached endpoint depends on it).
    pub bypass: crate::sync::AtomicBool,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Fault records waiting for the event queue.
    pub faults: crate::events::FaultQueue,
    /// Limits.
    pub limits: Limits,
    /// Last IOVA of the input range: identity translation ends there too.
    pub input_end: u64,
    /// Guest pages being fenced.
    pub fence_gate: FenceGate,
}

/// Guest pages being fenced (`crate::fence`). Until their fence ends, a
/// revocable pin whose ranges touch one is refused
/// ([`TranslateError::Fenced`]): its DMA would pin a page that is about to
/// stop being the guest's, and what it wrote would land where the guest
/// cannot see it.
///
/// Ordering: a fence closes the gate before it scans the shards for the
/// pins already on those pages (`EndpointCore::revoke_pins_on`), and a pin
/// checks the gate under its shard's lock, so every revocable pin on a
/// fenced page is either found by that scan or refused.
#[derive(Default)]
pub(crate) struct FenceGate {
    /// Fences in progress: pins look at `pages` only when non-zero.
    active: crate::sync::AtomicUsize,
    /// (fence, first byte, last byte) of every range being fenced.
    pages: Mutex<Vec<(u64, u64, u64)>>,
    next_fence: std::sync::atomic::AtomicU64,
}

impl FenceGate {
    /// Refuses revocable pins on `pages` until [`FenceGate::open`] with
    /// the returned key.
    pub(crate) fn close(&self, pages: &[GpaRange]) -> u64 {
        let key = self
            .next_fence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut v = lock(&self.pages);
        v.extend(
            pages
                .iter()
                .filter(|r| r.len > 0)
                .map(|r| (key, r.gpa, r.last())),
        );
        self.active.fetch_add(1, Ordering::AcqRel);
        key
    }

    /// Lets pins on the pages of fence `key` through again.
    pub(crate) fn open(&self, key: u64) {
        lock(&self.pages).retain(|&(k, _, _)| k != key);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether `ranges` touch a page being fenced.
    fn blocks(&self, ranges: &GpaRanges) -> bool {
        if self.active.load(Ordering::Acquire) == 0 {
            return false;
        }
        let v = lock(&self.pages);
        ranges
            .as_slice()
            .iter()
            .any(|r| v.iter().any(|&(_, first, last)| r.touches(first, last)))
    }
}

/// One shard of an endpoint: a copy of its attachment and the pins made
/// through that copy (and, in the primary shard, the leases).
///
/// Aligned (its pin table's buffers are at least two cache lines) so that
/// two shards never share a cache line: the hot path writes the lock, the
/// reference count (a [`Pin`] holds its shard) and the table on every pin.
#[repr(align(128))]
pub(crate) struct PinShard {
    /// The endpoint's ID.
    pub endpoint: u32,
    /// Attachment, pins and leases; see the module documentation.
    pub state: Mutex<EndpointState>,
    /// Pins this shard may hold: its share of `max_pins_per_endpoint`.
    cap: usize,
    /// Device-wide state.
    shared: Arc<Shared>,
    /// Told when a pin's last write section closes (a fence may wait).
    writes_closed: Condvar,
}

/// Where a pin's record is: its shard and slot, and the serial that tells
/// it from the slot's later occupants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PinSlot {
    /// Index into `EndpointCore::shards`.
    pub shard: usize,
    /// Slot in that shard's table.
    pub slot: u32,
    /// The record's serial.
    pub serial: u64,
}

/// The shared part of an endpoint.
///
/// Aligned so that two endpoints never share a cache line.
#[repr(align(128))]
pub(crate) struct EndpointCore {
    /// Endpoint ID.
    pub id: u32,
    /// [`PIN_SHARDS`] shards; see the module documentation.
    pub shards: [Arc<PinShard>; PIN_SHARDS],
    /// Device-wide state.
    pub shared: Arc<Shared>,
    /// Cache used by the `vm_memory::Iommu` implementation.
    #[cfg(not(loom))]
    pub iotlb: std::sync::RwLock<vm_memory::Iotlb>,
    /// Whether the IOTLB was ever filled (invalidations skip it otherwise).
    #[cfg(not(loom))]
    pub iotlb_used: std::sync::atomic::AtomicBool,
    /// Entries added to the IOTLB since it was last emptied (an upper
    /// bound on its size: see `IOTLB_CAPACITY`). Changed under its lock.
    #[cfg(not(loom))]
    pub iotlb_fills: std::sync::atomic::AtomicUsize,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The endpoint is not attached and not in bypass mode.
    #[error("endpoint is not attached to a domain")]
    NotAttached,
    /// Some address of the range is not mapped.
    #[error("IOVA {0:#x} is not mapped")]
    NotMapped(u64),
    /// The mapping does not permit the access.
    #[error("access to IOVA {0:#x} is not permitted")]
    Permission(u64),
    /// The range is empty or wraps around the address space.
    #[error("invalid IOVA range")]
    BadRange,
    /// The range spans more discontiguous pieces than one pin may hold.
    #[error("range is too fragmented")]
    TooFragmented,
    /// The endpoint holds too many pins.
    #[error("too many pins in flight")]
    TooManyPins,
    /// The endpoint holds too many leased translations.
    #[error("too many leased queue areas")]
    TooManyAreas,
    /// A revocable pin would touch a guest page that is being fenced
    /// ([`crate::fence`]); retrying after the fence succeeds.
    #[error("guest page is being fenced")]
    Fenced,
}

/// At most this many discontiguous GPA ranges per translation: bounds the
/// host allocation a guest-chosen length can cause.
pub const MAX_RANGES_PER_TRANSLATION: usize = 4096;

/// GPA ranges of a translation; one range needs no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpaRanges {
    /// A single contiguous range.
    One(GpaRange),
    /// Several ranges.
    Many(Vec<GpaRange>),
}

impl GpaRanges {
    /// The ranges as a slice.
    pub fn as_slice(&self) -> &[GpaRange] {
        match self {
            GpaRanges::One(r) => std::slice::from_ref(r),
            GpaRanges::Many(v) => v,
        }
    }

    /// Appends a piece, merged into the last range when it continues it.
    /// A range ending at the top of the guest-physical space is not
    /// continued by one at 0: merged, they would make a range whose end
    /// wraps around the space.
    fn push(&mut self, gpa: u64, len: u64) -> Result<(), TranslateError> {
        match self {
            GpaRanges::One(r) if r.gpa.checked_add(r.len) == Some(gpa) => r.len += len,
            GpaRanges::One(r) => *self = GpaRanges::Many(vec![*r, GpaRange { gpa, len }]),
            GpaRanges::Many(v) => {
                let last = v.last_mut().expect("Many is never empty");
                if last.gpa.checked_add(last.len) == Some(gpa) {
                    last.len += len;
                } else if v.len() >= MAX_RANGES_PER_TRANSLATION {
                    return Err(TranslateError::TooFragmented);
                } else {
                    v.push(GpaRange { gpa, len });
                }
            }
        }
        Ok(())
    }
}

/// Translates `[iova, iova + len)` through `tree`, following contiguous
/// mappings; every piece must permit `access`.
pub(crate) fn translate_in(
    tree: &MappingTree,
    iova: u64,
    len: u64,
    access: Permissions,
) -> Result<GpaRanges, TranslateError> {
    let last = last_byte(iova, len).ok_or(TranslateError::BadRange)?;
    let mut cur = iova;
    let mut out: Option<GpaRanges> = None;
    loop {
        let m = tree.lookup(cur).ok_or(TranslateError::NotMapped(cur))?;
        if !m.flags.allows(access) {
            return Err(TranslateError::Permission(cur));
        }
        let piece_end = m.iova_end.min(last);
        let piece_len = piece_end - cur + 1;
        let gpa = m.gpa_of(cur);
        match out.as_mut() {
            None => {
                out = Some(GpaRanges::One(GpaRange {
                    gpa,
                    len: piece_len,
                }))
            }
            Some(o) => o.push(gpa, piece_len)?,
        }
        if piece_end == last {
            return Ok(out.expect("set above"));
        }
        cur = piece_end + 1;
    }
}

/// The last byte of the guest-chosen range `[iova, iova + len)`, or `None`
/// when the range is empty or wraps: every (address, length) a guest
/// supplies goes through here before any other arithmetic on it.
pub(crate) fn last_byte(iova: u64, len: u64) -> Option<u64> {
    iova.checked_add(len.checked_sub(1)?)
}

/// Checks an identity-translated range: non-empty, no wrap, inside the
/// input range. Returns its last address.
pub(crate) fn identity_range(iova: u64, len: u64, input_end: u64) -> Result<u64, TranslateError> {
    let last = last_byte(iova, len).ok_or(TranslateError::BadRange)?;
    if last > input_end {
        return Err(TranslateError::BadRange);
    }
    Ok(last)
}

/// How an endpoint currently translates.
pub(crate) enum Route<'a> {
    /// Identity, recorded as `via`.
    Identity(u64),
    /// Through a domain's mappings.
    Domain(&'a Domain),
    /// Blocked.
    Blocked,
}

impl EndpointState {
    pub(crate) fn route(&self, shared: &Shared) -> Route<'_> {
        match &self.domain {
            Some(d) if d.bypass => Route::Identity(d.uid),
            Some(d) => Route::Domain(d),
            None if shared.bypass.load(Ordering::Acquire) => Route::Identity(VIA_GLOBAL_BYPASS),
            None => Route::Blocked,
        }
    }

    /// The `via` tag of pins made through the current attachment.
    pub(crate) fn current_via(&self) -> u64 {
        self.domain.as_ref().map_or(VIA_GLOBAL_BYPASS, |d| d.uid)
    }

    /// Translates `[iova, iova + len)` (`len` > 0) through the current
    /// attachment, reading the domain under its reader shard `shard`;
    /// returns the ranges and the `via` tag of a pin on them.
    // Inlined: a call moves the result through memory, 15% of a pin.
    #[inline(always)]
    fn lookup(
        &self,
        shared: &Shared,
        shard: usize,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GpaRanges, u64), TranslateError> {
        match self.route(shared) {
            Route::Identity(via) => {
                identity_range(iova, len, shared.input_end)?;
                Ok((GpaRanges::One(GpaRange { gpa: iova, len }), via))
            }
            Route::Domain(d) => {
                let tree = d.mappings.read(shard);
                Ok((translate_in(&tree, iova, len, access)?, d.uid))
            }
            Route::Blocked => Err(TranslateError::NotAttached),
        }
    }
}

impl PinShard {
    fn new(endpoint: u32, index: usize, shared: Arc<Shared>) -> Self {
        let max = shared.limits.max_pins_per_endpoint;
        // The shards' caps add up to the endpoint's limit.
        let cap = max / PIN_SHARDS + usize::from(index < max % PIN_SHARDS);
        let pins = if index == 0 {
            PinTable::with_capacity(PIN_TABLE_PREALLOC)
        } else {
            PinTable::default()
        };
        PinShard {
            endpoint,
            state: Mutex::new(EndpointState {
                domain: None,
                pins,
                areas: Vec::new(),
                next_area_serial: 0,
            }),
            cap,
            shared,
            writes_closed: Condvar::new(),
        }
    }

    /// Whether the pin in `slot` (with `serial`) was fenced: a fence
    /// took its pages from the guest, or claimed other pins on pages it
    /// touches (see [`crate::fence`]).
    fn fenced(&self, slot: u32, serial: u64) -> bool {
        let st = lock(&self.state);
        st.pins
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|r| {
                r.serial == serial
                    && (r.fence == PinFence::Done || (r.on_fenced_page && collateral_reported()))
            })
    }

    /// Opens a write section on the pin in `slot` (see
    /// [`Pin::write_section`]): false once a fence has claimed or marked
    /// it.
    fn open_write(&self, slot: u32, serial: u64) -> bool {
        let mut st = lock(&self.state);
        match st
            .pins
            .slots
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        {
            Some(r) if r.serial == serial => {
                if r.fence != PinFence::None || (r.on_fenced_page && collateral_reported()) {
                    return false;
                }
                r.writing += 1;
                true
            }
            _ => false,
        }
    }

    /// Closes a write section opened by [`PinShard::open_write`].
    fn close_write(&self, slot: u32, serial: u64) {
        let mut st = lock(&self.state);
        if let Some(r) = st
            .pins
            .slots
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
            .filter(|r| r.serial == serial)
        {
            debug_assert!(r.writing > 0, "a write section closed twice");
            r.writing = r.writing.saturating_sub(1);
            if r.writing == 0 {
                self.writes_closed.notify_all();
            }
        }
    }

    /// Releases a pin; completes the drains that waited only for it.
    pub(crate) fn release(&self, slot: u32, serial: u64) {
        let rec = lock(&self.state).pins.remove(slot, serial);
        if let Some(rec) = rec {
            for d in rec.waiters {
                d.release_one();
            }
        }
    }

    /// Makes `drain` wait for every pin of this shard made through `via`
    /// that overlaps `[start, end]`, and closes every lease made through
    /// `via` with an area overlapping it.
    fn collect_range(
        this: &Arc<Self>,
        st: &mut EndpointState,
        via: u64,
        start: u64,
        end: u64,
        drain: &mut DrainCollector,
    ) {
        Self::collect(this, st, drain, |r| {
            r.via == via && r.start <= end && start <= r.end
        });
        for rec in st.areas.iter().filter(|r| r.via == via) {
            if let Some(&(first, last, access)) = rec
                .areas
                .iter()
                .find(|(first, last, _)| *first <= end && start <= *last)
            {
                drain.close_lease(this.endpoint, rec, first.max(start).min(last), access);
            }
        }
    }

    /// Makes `drain` wait for every pin of this shard not made through
    /// `keep_via`, and closes every lease not made through it.
    fn collect_not_via(
        this: &Arc<Self>,
        st: &mut EndpointState,
        keep_via: u64,
        drain: &mut DrainCollector,
    ) {
        Self::collect(this, st, drain, |r| r.via != keep_via);
        for rec in st.areas.iter().filter(|r| r.via != keep_via) {
            if let Some(&(first, _, access)) = rec.areas.first() {
                drain.close_lease(this.endpoint, rec, first, access);
            }
        }
    }

    fn collect(
        this: &Arc<Self>,
        st: &mut EndpointState,
        drain: &mut DrainCollector,
        affected: impl Fn(&PinRecord) -> bool,
    ) {
        if st.pins.live == 0 {
            return;
        }
        for (slot, rec) in st.pins.slots.iter_mut().enumerate() {
            // A fenced pin's DMA no longer reaches a guest page.
            if let Some(rec) = rec
                .as_mut()
                .filter(|r| r.fence != PinFence::Done && affected(r))
            {
                let d = drain.drain();
                d.add_blocker(std::sync::Arc::new(PinBlocker {
                    shard: this.clone(),
                    slot: slot as u32,
                    serial: rec.serial,
                }));
                rec.waiters.push(d.clone());
            }
        }
    }

    /// Claims the pin at `slot` for a fence (see [`Revocable::claim_fence`]).
    fn claim_fence(&self, slot: u32, serial: u64) -> Option<Vec<(u64, u64)>> {
        let mut st = lock(&self.state);
        // A write section in progress ends before the claim (it is a
        // bounded copy, and its holder takes no lock inside it): the fence
        // then copies what it wrote, and no section opens after the claim.
        while st
            .pins
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|r| r.serial == serial && r.writing > 0 && sections_waited())
        {
            st = self
                .writes_closed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        let rec = st.pins.slots.get_mut(slot as usize)?.as_mut()?;
        if rec.serial != serial || rec.fence != PinFence::None {
            return None;
        }
        let ranges = rec
            .gpa
            .as_ref()?
            .as_slice()
            .iter()
            .map(|r| (r.gpa, r.len))
            .collect();
        rec.fence = PinFence::Claimed;
        #[cfg(loom)]
        if broken::FENCE_RELEASES_AT_CLAIM.load(std::sync::atomic::Ordering::SeqCst) {
            rec.fence = PinFence::Done;
            let waiters = std::mem::take(&mut rec.waiters);
            drop(st);
            for d in waiters {
                d.release_one();
            }
        }
        Some(ranges)
    }

    /// The claimed pin at `slot` is fenced: it releases every drain it
    /// holds (outside the lock) and holds none from now on. A pin released
    /// meanwhile has released them already.
    fn fence_done(&self, slot: u32, serial: u64) {
        let waiters = {
            let mut st = lock(&self.state);
            match st
                .pins
                .slots
                .get_mut(slot as usize)
                .and_then(Option::as_mut)
            {
                Some(rec) if rec.serial == serial && rec.fence == PinFence::Claimed => {
                    rec.fence = PinFence::Done;
                    std::mem::take(&mut rec.waiters)
                }
                _ => return,
            }
        };
        for d in waiters {
            d.release_one();
        }
    }

    /// The fence of the claimed pin at `slot` failed: it is unclaimed.
    fn fence_failed(&self, slot: u32, serial: u64) {
        let mut st = lock(&self.state);
        if let Some(rec) = st
            .pins
            .slots
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        {
            if rec.serial == serial && rec.fence == PinFence::Claimed {
                rec.fence = PinFence::None;
            }
        }
    }

    /// Clones the revoke hook of a pin that still blocks a drain, once.
    fn take_revoke(&self, slot: u32, serial: u64) -> Option<RevokeHook> {
        let mut st = lock(&self.state);
        let rec = st.pins.slots.get_mut(slot as usize)?.as_mut()?;
        if rec.serial != serial || rec.revoked {
            return None;
        }
        rec.revoked = true;
        rec.revoke.clone()
    }
}

/// Deliberately broken variants, for the loom models to show that they
/// catch them.
#[cfg(loom)]
pub(crate) mod broken {
    /// Invalidations collect the pins of the primary shard only.
    pub(crate) static SCAN_PRIMARY_ONLY: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// Revocable pins ignore the fence gate.
    pub(crate) static FENCE_GATE_OFF: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// A pin claimed for a fence stops holding its drains at once, before
    /// the VMM has fenced its pages.
    pub(crate) static FENCE_RELEASES_AT_CLAIM: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// A pin sharing a page with a fenced one does not report `fenced`.
    pub(crate) static COLLATERAL_UNREPORTED: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// Fences claim and mark pins without waiting for their open write
    /// sections.
    pub(crate) static SECTIONS_IGNORED: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
}

/// Whether fences wait for open write sections: always (the loom models'
/// broken variant does not).
#[inline(always)]
fn sections_waited() -> bool {
    #[cfg(loom)]
    if broken::SECTIONS_IGNORED.load(std::sync::atomic::Ordering::SeqCst) {
        return false;
    }
    true
}

/// Whether a pin that shares a fenced page reports `fenced`: always (the
/// loom models' broken variant does not).
#[inline(always)]
fn collateral_reported() -> bool {
    #[cfg(loom)]
    if broken::COLLATERAL_UNREPORTED.load(std::sync::atomic::Ordering::SeqCst) {
        return false;
    }
    true
}

/// Whether pins check the fence gate: always (the loom models' broken
/// variant does not).
#[inline(always)]
fn gate_checked() -> bool {
    #[cfg(loom)]
    if broken::FENCE_GATE_OFF.load(std::sync::atomic::Ordering::SeqCst) {
        return false;
    }
    true
}

/// Whether invalidations collect the pins of shard `index`: always (the
/// loom models' broken variant collects the primary shard's only).
#[inline(always)]
fn scans(index: usize) -> bool {
    let _ = index;
    #[cfg(loom)]
    if broken::SCAN_PRIMARY_ONLY.load(std::sync::atomic::Ordering::SeqCst) {
        return index == 0;
    }
    true
}

/// The shard a thread pins through when its handle names none: threads
/// take shards in turn, so a device's first [`PIN_SHARDS`] threads never
/// share one. (Loom runs its threads on one OS thread: its models name
/// their shards.)
pub(crate) fn thread_shard() -> usize {
    #[cfg(loom)]
    {
        0
    }
    #[cfg(not(loom))]
    {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Relaxed) % PIN_SHARDS;
        }
        SHARD.with(|s| *s)
    }
}

impl EndpointCore {
    pub(crate) fn new(id: u32, shared: Arc<Shared>) -> Self {
        EndpointCore {
            id,
            shards: std::array::from_fn(|i| Arc::new(PinShard::new(id, i, shared.clone()))),
            shared,
            #[cfg(not(loom))]
            iotlb: std::sync::RwLock::new(vm_memory::Iotlb::new()),
            #[cfg(not(loom))]
            iotlb_used: std::sync::atomic::AtomicBool::new(false),
            #[cfg(not(loom))]
            iotlb_fills: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Locks the primary shard: its attachment is the endpoint's (every
    /// shard's, outside an attachment change), and it holds the leases.
    pub(crate) fn lock_primary(&self) -> MutexGuard<'_, EndpointState> {
        lock(&self.shards[0].state)
    }

    /// Translates `[iova, iova + len)` through shard `hint`'s copy of the
    /// attachment, without pinning it.
    pub(crate) fn translate(
        &self,
        hint: usize,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<GpaRanges, TranslateError> {
        if len == 0 {
            return Err(TranslateError::BadRange);
        }
        let index = hint % PIN_SHARDS;
        let st = lock(&self.shards[index].state);
        st.lookup(&self.shared, index, iova, len, access)
            .map(|(r, _)| r)
    }

    /// Translates `[iova, iova + len)` and registers it as in flight, in
    /// shard `hint` or, when that shard's share of the pin limit is used
    /// up, the next shard with room. Returns the ranges and where the
    /// pin's record is.
    pub(crate) fn pin(
        &self,
        hint: usize,
        iova: u64,
        len: u64,
        access: Permissions,
        revoke: Option<RevokeHook>,
    ) -> Result<(GpaRanges, PinSlot), TranslateError> {
        if len == 0 {
            return Err(TranslateError::BadRange);
        }
        for k in 0..PIN_SHARDS {
            let index = (hint + k) % PIN_SHARDS;
            let shard = &self.shards[index];
            let mut st = lock(&shard.state);
            // The lookup comes first, so that a bad range is reported as
            // such whatever the pin count.
            let (ranges, via) = st.lookup(&self.shared, index, iova, len, access)?;
            // Under the shard lock: see `FenceGate`.
            if revoke.is_some() && gate_checked() && self.shared.fence_gate.blocks(&ranges) {
                return Err(TranslateError::Fenced);
            }
            if st.pins.live() >= shard.cap {
                continue;
            }
            let serial = st.pins.next_serial;
            st.pins.next_serial += 1;
            let gpa = revoke.as_ref().map(|_| ranges.clone());
            let slot = st.pins.insert(PinRecord {
                serial,
                via,
                start: iova,
                end: iova + (len - 1),
                revoke,
                revoked: false,
                waiters: Vec::new(),
                gpa,
                fence: PinFence::None,
                on_fenced_page: false,
                writing: 0,
            });
            return Ok((
                ranges,
                PinSlot {
                    shard: index,
                    slot,
                    serial,
                },
            ));
        }
        Err(TranslateError::TooManyPins)
    }

    /// Releases the pin recorded at `at`.
    #[cfg(loom)]
    pub(crate) fn release(&self, at: PinSlot) {
        self.shards[at.shard].release(at.slot, at.serial);
    }

    /// Whether the pin recorded at `at` reports fenced (`Pin::fenced`).
    #[cfg(loom)]
    pub(crate) fn fenced(&self, at: PinSlot) -> bool {
        self.shards[at.shard].fenced(at.slot, at.serial)
    }

    /// Opens a write section on the pin at `at` (`Pin::write_section`).
    #[cfg(loom)]
    pub(crate) fn open_write(&self, at: PinSlot) -> bool {
        self.shards[at.shard].open_write(at.slot, at.serial)
    }

    /// Closes a write section on the pin at `at`.
    #[cfg(loom)]
    pub(crate) fn close_write(&self, at: PinSlot) {
        self.shards[at.shard].close_write(at.slot, at.serial)
    }

    /// Number of pins held, over all shards.
    pub(crate) fn pins_live(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.state).pins.live()).sum()
    }

    /// Points every shard's attachment at `dom` and makes `drain` wait for
    /// every pin, and close every lease, made through the previous one
    /// (rule 2, shard by shard).
    pub(crate) fn switch(&self, dom: Option<Arc<Domain>>, drain: &mut DrainCollector) {
        for (i, shard) in self.shards.iter().enumerate() {
            let mut st = lock(&shard.state);
            st.domain = dom.clone();
            let keep = st.current_via();
            if scans(i) {
                PinShard::collect_not_via(shard, &mut st, keep, drain);
            }
        }
    }

    /// Sets the attachment of an endpoint that holds no pin (restore).
    pub(crate) fn set_domain(&self, dom: Option<Arc<Domain>>) {
        for shard in &self.shards {
            lock(&shard.state).domain = dom.clone();
        }
    }

    /// Makes `drain` wait for every pin made through `via` that overlaps
    /// `[start, end]`, and closes every lease made through `via` with an
    /// area overlapping it. Call after the translation was removed.
    pub(crate) fn collect_range(&self, via: u64, start: u64, end: u64, drain: &mut DrainCollector) {
        for (_, shard) in self.shards.iter().enumerate().filter(|(i, _)| scans(*i)) {
            let mut st = lock(&shard.state);
            PinShard::collect_range(shard, &mut st, via, start, end, drain);
        }
    }

    /// Translates `areas` (first IOVA, length, access) and registers them
    /// as one leased translation, in one critical section (rule 1), so
    /// that every later invalidation overlapping an area finds the lease.
    /// Returns the translations and the record's serial; on failure the
    /// error and the index of the area that failed, and nothing is
    /// registered.
    pub(crate) fn lease_areas(
        &self,
        areas: &[(u64, u64, Permissions)],
        lease: Arc<Lease<Arc<Drain>>>,
        revoke: Option<RevokeHook>,
    ) -> Result<(Vec<GpaRanges>, u64), (TranslateError, usize)> {
        let mut st = self.lock_primary();
        if st.areas.len() >= MAX_AREA_RECORDS_PER_ENDPOINT {
            return Err((TranslateError::TooManyAreas, 0));
        }
        let mut out = Vec::with_capacity(areas.len());
        let mut records = Vec::with_capacity(areas.len());
        {
            let route = st.route(&self.shared);
            let tree = match &route {
                Route::Domain(d) => Some(d.mappings.read(0)),
                _ => None,
            };
            for (i, &(iova, len, access)) in areas.iter().enumerate() {
                // Guest-chosen: checked before any arithmetic on it.
                let last = last_byte(iova, len).ok_or((TranslateError::BadRange, i))?;
                let gpa = match (&route, &tree) {
                    (Route::Identity(_), _) => {
                        identity_range(iova, len, self.shared.input_end).map_err(|e| (e, i))?;
                        GpaRanges::One(GpaRange { gpa: iova, len })
                    }
                    (Route::Domain(_), Some(t)) => {
                        translate_in(t, iova, len, access).map_err(|e| (e, i))?
                    }
                    _ => return Err((TranslateError::NotAttached, i)),
                };
                out.push(gpa);
                records.push((iova, last, access));
            }
        }
        let serial = st.next_area_serial;
        st.next_area_serial += 1;
        let via = st.current_via();
        st.areas.push(AreaRecord {
            serial,
            via,
            areas: records,
            lease,
            revoke,
        });
        Ok((out, serial))
    }

    /// Ends an access section of a leased translation; the last section of
    /// a closed lease releases the drains that waited for it (rule 3).
    pub(crate) fn exit_lease(lease: &Lease<Arc<Drain>>) {
        for d in lease.exit() {
            d.release_one();
        }
    }

    /// Asks every revocable pin whose pages touch `pages` and that no fence
    /// claimed to end early (its holder ends its I/O with an error): the
    /// DMA of such a pin may land in a page that a fence is taking from the
    /// guest. Each such pin reports [`Pin::fenced`] from now on (revoked
    /// earlier or not): if its I/O cannot be cancelled either, its data
    /// lands in the old page, and the holder must not report success.
    /// Returns the hooks, to be called with no lock held; each pin's hook
    /// is taken once, as by revocation.
    pub(crate) fn revoke_pins_on(&self, pages: &[GpaRange]) -> Vec<RevokeHook> {
        let touches = |gpa: &GpaRanges| {
            gpa.as_slice()
                .iter()
                .any(|r| pages.iter().any(|p| r.touches(p.gpa, p.last())))
        };
        let mut hooks = Vec::new();
        for shard in &self.shards {
            let mut st = lock(&shard.state);
            // As for a claimed pin: write sections on these pages close
            // first, and none opens once the pin is marked.
            while st.pins.slots.iter().flatten().any(|r| {
                r.writing > 0
                    && r.fence == PinFence::None
                    && r.gpa.as_ref().is_some_and(touches)
                    && sections_waited()
            }) {
                st = shard
                    .writes_closed
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
            for rec in st.pins.slots.iter_mut().flatten() {
                if rec.fence == PinFence::None && rec.gpa.as_ref().is_some_and(touches) {
                    rec.on_fenced_page = true;
                    if rec.revoked {
                        continue;
                    }
                    if let Some(h) = &rec.revoke {
                        rec.revoked = true;
                        hooks.push(h.clone());
                    }
                }
            }
        }
        hooks
    }

    /// Forgets a leased translation (its owner let it go).
    pub(crate) fn remove_area_record(&self, serial: u64) {
        let mut st = self.lock_primary();
        if let Some(i) = st.areas.iter().position(|r| r.serial == serial) {
            st.areas.swap_remove(i);
        }
    }
}

/// A DMA-owning guard: while it lives, the IOVA range it was created for is
/// registered as in flight, and any invalidation overlapping it waits.
///
/// It owns everything it needs (no borrowed lock), is `Send`, and releases
/// the range when dropped.
pub struct Pin {
    shard: Arc<PinShard>,
    slot: u32,
    serial: u64,
    iova: u64,
    len: u64,
    ranges: GpaRanges,
}

impl Pin {
    pub(crate) fn new(
        ep: &EndpointCore,
        at: PinSlot,
        iova: u64,
        len: u64,
        ranges: GpaRanges,
    ) -> Self {
        Pin {
            shard: ep.shards[at.shard].clone(),
            slot: at.slot,
            serial: at.serial,
            iova,
            len,
            ranges,
        }
    }

    /// The guest-physical ranges, in IOVA order; GPA-contiguous pieces are merged.
    pub fn ranges(&self) -> &[GpaRange] {
        self.ranges.as_slice()
    }

    /// First IOVA of the pinned range.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length of the pinned range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether a fence took this pin's pages from the guest
    /// ([`crate::fence`]), or is taking pages this pin touches (the pin
    /// was not claimed, but shares a page with one that was): the
    /// guest-physical pages it covers may no longer be the ones the DMA
    /// reaches. The holder must then not write
    /// them through the guest's address space either (a status byte, a
    /// copy): the translation it was made through is gone, and the write
    /// would land in the guest's fresh page. It completes the request in a
    /// way the guest can see without those pages (an error, or a reset).
    pub fn fenced(&self) -> bool {
        self.shard.fenced(self.slot, self.serial)
    }

    /// Opens a section in which the holder may write this pin's pages
    /// through the guest's address space (a status byte, data copied from
    /// a bounce buffer), or `None` once a fence has claimed or marked the
    /// pin ([`Pin::fenced`]): the holder then writes nothing and ends the
    /// request as for a fenced pin.
    ///
    /// A fence waits for open sections on its pages before it claims or
    /// marks their pins, so a write made in a section lands before the
    /// fence copies the page (and is copied with it), never in the old
    /// page after the copy, nor in the guest's new page after the reply.
    /// Keep a section to a bounded copy: take no lock and do no I/O in
    /// it.
    pub fn write_section(&self) -> Option<PinWrite<'_>> {
        self.shard
            .open_write(self.slot, self.serial)
            .then(|| PinWrite { pin: self })
    }

    /// Always false: a pin covers at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The GPA of a single-range pin; `None` if the range is fragmented.
    pub fn contiguous_gpa(&self) -> Option<u64> {
        match &self.ranges {
            GpaRanges::One(r) => Some(r.gpa),
            GpaRanges::Many(_) => None,
        }
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("endpoint", &self.shard.endpoint)
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.shard.release(self.slot, self.serial);
    }
}

/// An open write section of a [`Pin`] (see [`Pin::write_section`]);
/// dropping it closes the section.
#[must_use = "the section closes when the guard is dropped"]
pub struct PinWrite<'a> {
    pin: &'a Pin,
}

impl Drop for PinWrite<'_> {
    fn drop(&mut self) {
        self.pin.shard.close_write(self.pin.slot, self.pin.serial);
    }
}

/// A lease an invalidation closed: whom to tell, and the fault to report.
pub(crate) struct RevokedArea {
    /// The owner's hook.
    pub hook: Option<RevokeHook>,
    /// The endpoint the lease belongs to.
    pub endpoint: u32,
    /// An address of the area that lost its translation.
    pub iova: u64,
    /// How the device accesses that area.
    pub access: Permissions,
}

/// Builds a [`Drain`] only when a pin actually has to be waited for, so
/// that an invalidation without DMA in flight allocates nothing; collects
/// the leases it closed.
pub(crate) struct DrainCollector {
    notifier: Option<Arc<EventFd>>,
    drain: Option<Arc<Drain>>,
    close_leases: bool,
    revoked: Vec<RevokedArea>,
}

impl DrainCollector {
    /// A collector; `close_leases` false leaves leased translations alone
    /// (the non-draining control mode: rings stay translated, as in
    /// devices that translate them once and never revoke).
    pub(crate) fn new(notifier: Option<Arc<EventFd>>, close_leases: bool) -> Self {
        DrainCollector {
            notifier,
            drain: None,
            close_leases,
            revoked: Vec::new(),
        }
    }

    fn drain(&mut self) -> &Arc<Drain> {
        let n = &self.notifier;
        self.drain.get_or_insert_with(|| Drain::new(n.clone()))
    }

    /// Closes `rec`'s lease; the drain waits for its open sections.
    fn close_lease(&mut self, endpoint: u32, rec: &AreaRecord, iova: u64, access: Permissions) {
        if !self.close_leases {
            return;
        }
        let closed = rec.lease.close(|| {
            let d = self.drain();
            d.hold();
            d.clone()
        });
        if closed.first {
            self.revoked.push(RevokedArea {
                hook: rec.revoke.clone(),
                endpoint,
                iova,
                access,
            });
        }
    }

    /// Ends collection: the drain to wait for, if any pin is still held or
    /// any closed lease still has open sections, and the leases closed.
    pub(crate) fn finish(self) -> (Option<Arc<Drain>>, Vec<RevokedArea>) {
        let d = self.drain.filter(|d| !d.arm());
        (d, self.revoked)
    }
}

/// A pin a drain waits for: its shard, slot and serial, enough to call
/// its revoke hook once (see [`Drain::revoke`]).
struct PinBlocker {
    shard: Arc<PinShard>,
    slot: u32,
    serial: u64,
}

impl Revocable for PinBlocker {
    fn claim_fence(&self) -> Option<Vec<(u64, u64)>> {
        self.shard.claim_fence(self.slot, self.serial)
    }

    fn fence_done(&self) {
        self.shard.fence_done(self.slot, self.serial);
    }

    fn fence_failed(&self) {
        self.shard.fence_failed(self.slot, self.serial);
    }

    fn revoke(&self) -> bool {
        let Some(hook) = self.shard.take_revoke(self.slot, self.serial) else {
            return false;
        };
        hook();
        self.shard
            .shared
            .metrics
            .revocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mapping::{MapFlags, Mapping};

    fn tree(maps: &[(u64, u64)]) -> MappingTree {
        let mut t = MappingTree::new();
        for &(iova, gpa) in maps {
            t.insert(Mapping {
                iova,
                iova_end: iova + 0xfff,
                gpa,
                flags: MapFlags::READ_WRITE,
            })
            .unwrap();
        }
        t
    }

    /// Found by the `translate` fuzz target: a guest that maps the last
    /// guest-physical page and page 0 at adjacent IOVAs got one range
    /// `{ gpa: 2^64 - 4096, len: 8192 }` across them, whose end wraps.
    #[test]
    fn pieces_at_the_top_and_at_zero_of_the_gpa_space_stay_apart() {
        let top = u64::MAX - 0xfff;
        let r = |gpa, len| GpaRange { gpa, len };
        // One range, then the wrap.
        let t = tree(&[(0x1000, top), (0x2000, 0), (0x3000, 0x1000)]);
        let got = translate_in(&t, 0x1000, 0x3000, Permissions::Read).unwrap();
        assert_eq!(got.as_slice(), &[r(top, 0x1000), r(0, 0x2000)]);
        // Several ranges, then the wrap.
        let t = tree(&[(0, 0x5000), (0x1000, top), (0x2000, 0)]);
        let got = translate_in(&t, 0, 0x3000, Permissions::Read).unwrap();
        assert_eq!(
            got.as_slice(),
            &[r(0x5000, 0x1000), r(top, 0x1000), r(0, 0x1000)]
        );
        // Contiguous pieces up to the last byte still merge.
        let t = tree(&[(0x1000, top - 0x1000), (0x2000, top)]);
        let got = translate_in(&t, 0x1000, 0x2000, Permissions::Read).unwrap();
        assert_eq!(got.as_slice(), &[r(top - 0x1000, 0x2000)]);
    }
}
