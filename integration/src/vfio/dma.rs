//! A passed-through device's DMA: its VFIO container's mappings.
//!
//! - `iommu=on`: [`LedgerMapper`] is the endpoint's external mapper. It
//!   forwards the virtio-iommu domain's MAP and UNMAP to the container
//!   (through the crate's [`VfioMapper`]) and keeps the container's
//!   mappings as a ledger, so the exit report can show that the container
//!   holds exactly the domain's mappings.
//! - `iommu=off`: [`map_guest_ram`] maps every RAM region at its
//!   guest-physical address for the VM's lifetime.
//!
//! The crate calls the mapper before it replies: a MAP whose container map
//! fails is rolled back and answered `S_DEVERR`, and an UNMAP is answered
//! only after the container's `VFIO_IOMMU_UNMAP_DMA` has returned, i.e.
//! after the host IOMMU stopped translating the range.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vfio_ioctls::VfioContainer;
use virtio_iommu::mapper::VfioMapper;
use virtio_iommu::{ExternalMapper, MapFlags};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::virtio::lock;

/// The container's mappings and counters of one passed-through device.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Live container mappings: IOVA -> size.
    mappings: Mutex<BTreeMap<u64, u64>>,
    /// Successful maps.
    pub maps: AtomicU64,
    /// Successful unmaps.
    pub unmaps: AtomicU64,
    /// Maps the container refused.
    pub map_errors: AtomicU64,
    /// Unmaps the container refused.
    pub unmap_errors: AtomicU64,
    /// Unmaps acknowledged without reaching the container (the unsafe
    /// `_skip_container_unmap=on` control).
    pub unmaps_skipped: AtomicU64,
}

impl Ledger {
    /// The live container mappings as `(iova, size)` in IOVA order.
    pub fn mappings(&self) -> Vec<(u64, u64)> {
        lock(&self.mappings).iter().map(|(&a, &s)| (a, s)).collect()
    }

    /// Records a successful container map.
    fn record_map(&self, iova: u64, size: u64) {
        lock(&self.mappings).insert(iova, size);
        self.maps.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a successful container unmap of `[iova, iova + size)`: the
    /// mappings wholly inside it are gone.
    fn record_unmap(&self, iova: u64, size: u64) {
        let end = iova.saturating_add(size);
        let mut m = lock(&self.mappings);
        let gone: Vec<u64> = m
            .range(iova..end)
            .filter(|(&a, &s)| a.saturating_add(s) <= end)
            .map(|(&a, _)| a)
            .collect();
        for a in gone {
            m.remove(&a);
        }
        self.unmaps.fetch_add(1, Ordering::Relaxed);
    }
}

/// The crate's [`VfioMapper`] with a [`Ledger`].
pub struct LedgerMapper {
    inner: VfioMapper<Arc<GuestMemoryMmap>>,
    ledger: Arc<Ledger>,
    skip_unmap: bool,
}

impl LedgerMapper {
    /// A mapper over `container` resolving GPAs in `mem`. `skip_unmap`
    /// is the unsafe test control that never unmaps (see
    /// [`crate::config::DeviceConfig::skip_container_unmap`]).
    pub fn new(
        container: Arc<VfioContainer>,
        mem: GuestMemoryMmap,
        ledger: Arc<Ledger>,
        skip_unmap: bool,
    ) -> Self {
        LedgerMapper {
            inner: VfioMapper::new(container, Arc::new(mem)),
            ledger,
            skip_unmap,
        }
    }
}

impl std::fmt::Debug for LedgerMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerMapper")
    }
}

impl ExternalMapper for LedgerMapper {
    fn map(&self, iova: u64, gpa: u64, size: u64, flags: MapFlags) -> io::Result<()> {
        if self.skip_unmap {
            // The control keeps stale mappings until their IOVA is reused
            // (then the container would refuse the new MAP, and the guest
            // kernel is not built for MAP failing on a free IOVA).
            let end = iova.saturating_add(size);
            for (a, s) in self.ledger.mappings() {
                if a < end && iova < a.saturating_add(s) && self.inner.unmap(a, s).is_ok() {
                    self.ledger.record_unmap(a, s);
                }
            }
        }
        let r = self.inner.map(iova, gpa, size, flags);
        match &r {
            Ok(()) => self.ledger.record_map(iova, size),
            Err(e) => {
                // The guest decides how often this happens: log the 1st,
                // 2nd, 4th, 8th... refusal only.
                let n = self.ledger.map_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!("VFIO map {iova:#x}+{size:#x} -> {gpa:#x}: {e} (refusal {n})");
                }
            }
        }
        r
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        if self.skip_unmap {
            self.ledger.unmaps_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let r = self.inner.unmap(iova, size);
        match &r {
            Ok(()) => self.ledger.record_unmap(iova, size),
            Err(_) => {
                self.ledger.unmap_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

/// Maps all of guest RAM into `container` at its guest-physical addresses
/// (an `iommu=off` device: its DMA addresses are GPAs). Returns the bytes
/// mapped.
pub fn map_guest_ram(container: &VfioContainer, mem: &GuestMemoryMmap) -> Result<u64, String> {
    let mut total = 0u64;
    for r in mem.iter() {
        let gpa = r.start_addr().0;
        let len = usize::try_from(r.len()).map_err(|_| "RAM region too large".to_string())?;
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| format!("RAM at {gpa:#x}: {e}"))?;
        // SAFETY: `host..host + len` is one guest RAM region, mapped for the
        // VMM's whole lifetime (the VM never unmaps guest memory before the
        // process exits). The VMM accesses guest memory only through
        // volatile operations and never holds a Rust reference into it, so
        // device DMA into it cannot break Rust's aliasing rules.
        unsafe { container.vfio_dma_map(gpa, len, host) }
            .map_err(|e| format!("VFIO map of RAM {gpa:#x}+{len:#x}: {e}"))?;
        total += r.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_follows_maps_and_unmaps() {
        let l = Ledger::default();
        l.record_map(0x3000, 0x1000);
        l.record_map(0x1000, 0x2000);
        l.record_map(0x8000, 0x1000);
        assert_eq!(
            l.mappings(),
            vec![(0x1000, 0x2000), (0x3000, 0x1000), (0x8000, 0x1000)]
        );
        // An unmap removes the mappings wholly inside it, and only those.
        l.record_unmap(0x1000, 0x3000);
        assert_eq!(l.mappings(), vec![(0x8000, 0x1000)]);
        l.record_unmap(0x8000, 0x800);
        assert_eq!(l.mappings(), vec![(0x8000, 0x1000)]);
        l.record_unmap(0, u64::MAX);
        assert!(l.mappings().is_empty());
        assert_eq!((l.maps.into_inner(), l.unmaps.into_inner()), (3, 3));
    }
}
