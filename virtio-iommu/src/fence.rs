//! Fences: guest pages taken away from DMA the host cannot cancel.
//!
//! An invalidation waits for the pins it overlaps ([`crate::tracker`]) and,
//! after the revocation grace, asks their holders to end early. A holder
//! whose I/O the host cannot cancel (a block READ the kernel has already
//! issued to a disk that stalls) would hold the reply for as long as the
//! host's storage takes, without bound, and the guest's driver spins for
//! that reply. After a second deadline
//! ([`crate::IommuConfig::fence_after`]) the device hands the VMM a
//! [`Fence`] (`VirtioIommu::fences_due`): the guest-physical pages those
//! pins cover. The VMM makes them stop being the guest's pages (it puts a
//! copy of each in a fresh page at the same guest-physical address, with
//! the vCPUs held, so that a late DMA lands in the old page, which the
//! guest can no longer see) and then calls [`Fence::complete`]: the pins
//! stop holding the invalidation, which replies.
//!
//! # Invariant
//!
//! A reply is published only once every pin it waited for has been
//! released or fenced, where *fenced* means the VMM completed the fence
//! that claimed the pin:
//!
//! - a fence *claims* a pin (exclusively: one fence per pin) under the
//!   pin's shard lock; a claimed pin keeps holding every drain it holds,
//!   including those of invalidations that collect it while the fence
//!   runs;
//! - [`Fence::complete`] is the only place a claimed pin stops holding its
//!   drains: under the shard lock it marks the pin fenced and takes its
//!   waiters, then releases them; a pin released before that released them
//!   itself (the record is gone, the fence finds nothing to release);
//! - a fenced pin is not collected by later invalidations: its DMA can no
//!   longer reach a page the guest sees;
//! - from its claim to its end a fence closes the tracker's `FenceGate`
//!   on its pages: a revocable pin that would touch one is refused, and
//!   those already there (other DMA into the same pages, through other
//!   IOVAs or endpoints) are revoked and report `Pin::fenced` from then
//!   on, so that their holders end them with an error rather than report
//!   data that went to a page the guest no longer sees (a revocation
//!   alone does not stop an I/O the host cannot cancel);
//! - a [`Fence`] dropped without [`Fence::complete`] (the VMM could not
//!   fence) unclaims its pins, which go on holding their drains; those
//!   drains are due for another fence after a backoff
//!   (`VirtioIommu::fences_due`), so a transient failure does not leave
//!   the invalidation unbounded.
//!
//! The loom models in `loom_tests` check that no access to the guest's
//! page runs after a reply, whether the drain ends by release or by fence,
//! and that no pin on a fenced page is left unrevoked, and catch a fence
//! that releases at claim time and a pin that ignores the gate.
//!
//! What the crate cannot check: a fence is sound only if every late write
//! of the pinned DMA goes to the memory that was pinned when the I/O was
//! issued (device DMA, `O_DIRECT` block I/O), not through the guest's
//! address space at completion (a worker thread copying a buffered read
//! into guest memory would write the fresh page). A VMM fences only pins
//! whose holders work that way.

use std::time::Instant;

use crate::drain::{Drain, Revocable};
use crate::sync::Arc;
use crate::tracker::{EndpointCore, GpaRange, Shared};

/// The granule of the ranges a fence hands out: a fence takes whole host
/// pages (a VMM on larger pages aligns further, or refuses to fence).
pub const FENCE_PAGE_SIZE: u64 = 4096;

/// Pages of uncancellable DMA for the VMM to take from the guest; see the
/// [module documentation](self).
///
/// The VMM fences [`Fence::ranges`] with no lock of the device held
/// (fencing holds the vCPUs, and a vCPU may be waiting for that lock) and
/// then calls [`Fence::complete`]. Dropping it instead leaves the
/// invalidations waiting for the DMA, as without fences.
pub struct Fence {
    pins: Vec<std::sync::Arc<dyn Revocable>>,
    /// The drains it claimed, and how long they wait before another
    /// fence is tried if this one fails.
    drains: Vec<Arc<Drain>>,
    retry_after: std::time::Duration,
    ranges: Vec<GpaRange>,
    created: Instant,
    shared: Arc<Shared>,
    /// The gate's key for these pages.
    gate: u64,
    completed: bool,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("pins", &self.pins.len())
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl Fence {
    /// Claims the pins still blocking `drains` (each drain at most once
    /// at a time), closes the gate on their pages and revokes the other
    /// pins of `endpoints` on those pages; `None` when no pin can be
    /// fenced (released meanwhile, not revocable, or claimed by another
    /// fence). If the fence fails, its drains can be claimed again
    /// `retry_after` later (doubling with each failure).
    pub(crate) fn claim<'a>(
        drains: impl IntoIterator<Item = &'a Arc<Drain>>,
        shared: &Arc<Shared>,
        endpoints: impl IntoIterator<Item = &'a Arc<EndpointCore>>,
        retry_after: std::time::Duration,
    ) -> Option<Fence> {
        let mut pins = Vec::new();
        let mut pieces = Vec::new();
        let mut claimed = Vec::new();
        for d in drains {
            let Some(found) = d.claim_fence() else {
                continue;
            };
            if !found.is_empty() {
                claimed.push(d.clone());
            }
            for (pin, ranges) in found {
                pins.push(pin);
                pieces.extend(ranges);
            }
        }
        if pins.is_empty() {
            return None;
        }
        let ranges = page_ranges(pieces);
        // Gate first, then the scan (see `FenceGate`).
        let gate = shared.fence_gate.close(&ranges);
        let hooks: Vec<_> = endpoints
            .into_iter()
            .flat_map(|ep| ep.revoke_pins_on(&ranges))
            .collect();
        shared
            .metrics
            .revocations
            .fetch_add(hooks.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for hook in hooks {
            hook();
        }
        Some(Fence {
            pins,
            drains: claimed,
            retry_after,
            ranges,
            created: Instant::now(),
            shared: shared.clone(),
            gate,
            completed: false,
        })
    }

    /// The guest-physical ranges to fence: page-aligned
    /// ([`FENCE_PAGE_SIZE`]), sorted, disjoint and not adjacent.
    pub fn ranges(&self) -> &[GpaRange] {
        &self.ranges
    }

    /// Number of pages in [`Fence::ranges`].
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.len / FENCE_PAGE_SIZE).sum()
    }

    /// The VMM has fenced every page of [`Fence::ranges`]: the pins stop
    /// holding their invalidations, which reply once nothing else holds
    /// them (the drain eventfd fires as for any drain).
    pub fn complete(mut self) {
        self.completed = true;
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.shared.metrics;
        m.fences.fetch_add(1, Relaxed);
        m.pages_fenced.fetch_add(self.pages(), Relaxed);
        m.fence_time.record(self.created.elapsed());
        // Pins made from now on pin the guest's new pages.
        self.shared.fence_gate.open(self.gate);
        for pin in &self.pins {
            pin.fence_done();
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        self.shared
            .metrics
            .fence_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.fence_gate.open(self.gate);
        for pin in &self.pins {
            pin.fence_failed();
        }
        // Their invalidations are still held by the DMA: a later fence
        // may yet bound them.
        for d in &self.drains {
            d.fence_failed(self.retry_after);
        }
    }
}

/// `pieces` (address, length; non-empty, not wrapping: translations)
/// widened to whole pages, sorted and merged.
fn page_ranges(mut pieces: Vec<(u64, u64)>) -> Vec<GpaRange> {
    let mask = FENCE_PAGE_SIZE - 1;
    // Inclusive page-aligned bounds: the last byte's page may end at the
    // top of the address space.
    pieces.retain(|&(_, len)| len > 0);
    let mut bounds: Vec<(u64, u64)> = pieces
        .iter()
        .map(|&(gpa, len)| (gpa & !mask, gpa.saturating_add(len - 1) | mask))
        .collect();
    bounds.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(bounds.len());
    for (first, last) in bounds {
        match merged.last_mut() {
            Some(m) if first <= m.1.saturating_add(1) => m.1 = m.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
        .into_iter()
        .map(|(first, last)| GpaRange {
            gpa: first,
            len: (last - first).saturating_add(1),
        })
        .collect()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn r(gpa: u64, len: u64) -> GpaRange {
        GpaRange { gpa, len }
    }

    #[test]
    fn pieces_are_widened_to_pages_sorted_and_merged() {
        assert_eq!(page_ranges(vec![(0x1010, 8)]), [r(0x1000, 0x1000)]);
        assert_eq!(
            page_ranges(vec![(0x5000, 0x2000), (0x1ff0, 0x20), (0x3000, 1)]),
            // 0x1ff0..0x200f spans two pages, adjacent to 0x3000's.
            [r(0x1000, 0x3000), r(0x5000, 0x2000)]
        );
        assert_eq!(
            page_ranges(vec![(0x2000, 0x1000), (0x2800, 0x100)]),
            [r(0x2000, 0x1000)]
        );
        assert_eq!(page_ranges(vec![(0x4000, 0)]), []);
    }

    #[test]
    fn a_range_at_the_top_of_the_address_space_does_not_wrap() {
        assert_eq!(
            page_ranges(vec![(u64::MAX - 0x10, 0x11)]),
            [r(u64::MAX - 0xfff, 0x1000)]
        );
    }
}
