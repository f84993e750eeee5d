//! BARs mapped straight into the guest.
//!
//! Where VFIO allows it (the region's MMAP flag, narrowed by its sparse
//! mmap areas), a BAR's areas are mmapped from the device fd and installed
//! as KVM memory slots at the BAR's guest address, so the guest reaches
//! the device without a VM exit. A BAR that holds the MSI-X table or PBA
//! stays trapped whole: the VMM emulates those.
//!
//! Invariant: an area has a slot exactly while its BAR decodes (memory
//! enable set) at an address inside the VMM's BAR window; a BAR that moves
//! or stops decoding loses its slots before anything else happens, and
//! accesses outside the slots keep trapping to the VMM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};

use crate::pci::{BAR_WINDOW_END, BAR_WINDOW_START};

/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;

/// Hands out KVM memory slot numbers above guest RAM's.
#[derive(Debug)]
pub struct SlotAllocator(AtomicU32);

impl SlotAllocator {
    /// Slots from `first` up.
    pub fn new(first: u32) -> Self {
        SlotAllocator(AtomicU32::new(first))
    }

    fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// One mmapped area of a BAR.
#[derive(Debug)]
struct Area {
    bar: usize,
    /// Offset within the BAR.
    offset: u64,
    size: u64,
    /// Host address of the mmap.
    host: usize,
    slot: u32,
    /// Guest address of the installed slot.
    at: Option<u64>,
}

/// The mmapped BAR areas of one device and their KVM slots.
#[derive(Debug)]
pub struct BarMaps {
    vm: Option<Arc<VmFd>>,
    areas: Vec<Area>,
}

impl BarMaps {
    /// No mapped areas (every access traps).
    pub fn none() -> Self {
        BarMaps {
            vm: None,
            areas: Vec::new(),
        }
    }

    /// Mmaps the mappable areas of `bars` (BAR indices) of `device`.
    /// A BAR whose areas cannot be mapped stays trapped (logged).
    pub fn new(device: &VfioDevice, bars: &[usize], vm: Arc<VmFd>, slots: &SlotAllocator) -> Self {
        use std::os::fd::AsRawFd;
        let mut areas = Vec::new();
        for &bar in bars {
            let index = bar as u32;
            if device.get_region_flags(index) & REGION_FLAG_MMAP == 0 {
                continue;
            }
            let size = device.get_region_size(index);
            let region_off = device.get_region_offset(index);
            let sparse = device
                .get_region_caps(index)
                .into_iter()
                .find_map(|c| match c {
                    VfioRegionInfoCap::SparseMmap(s) => Some(s.areas),
                    _ => None,
                });
            let list: Vec<(u64, u64)> = match sparse {
                Some(a) => a.iter().map(|a| (a.offset, a.size)).collect(),
                None => vec![(0, size)],
            };
            for (offset, len) in list {
                let page = 4096;
                if len == 0 || offset % page != 0 || len % page != 0 || offset + len > size {
                    log::warn!("BAR{bar}: mmap area {offset:#x}+{len:#x} unusable, trapped");
                    continue;
                }
                let Some(file_off) = region_off
                    .checked_add(offset)
                    .and_then(|o| libc::off_t::try_from(o).ok())
                else {
                    continue;
                };
                // SAFETY: a fresh shared mapping of the device fd; no Rust
                // reference into it is ever made (the guest and the device
                // access it), and it is unmapped only in `Drop`, after its
                // KVM slot is gone.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        device.as_raw_fd(),
                        file_off,
                    )
                };
                if p == libc::MAP_FAILED {
                    log::warn!(
                        "BAR{bar}: mmap of {offset:#x}+{len:#x}: {}; trapped",
                        std::io::Error::last_os_error()
                    );
                    continue;
                }
                areas.push(Area {
                    bar,
                    offset,
                    size: len,
                    host: p as usize,
                    slot: slots.next(),
                    at: None,
                });
            }
        }
        BarMaps {
            vm: Some(vm),
            areas,
        }
    }

    /// Number of mmapped areas.
    pub fn len(&self) -> usize {
        self.areas.len()
    }

    /// True without mmapped areas.
    pub fn is_empty(&self) -> bool {
        self.areas.is_empty()
    }

    /// The first half of [`BarMaps::update`]: removes the slots that
    /// `decoded` no longer has at the same place, adds none. Called before
    /// the device stops decoding: VFIO revokes its BAR mmaps then, and a
    /// guest access through a slot over a revoked mmap would fail the
    /// vCPU's KVM_RUN.
    pub fn remove_stale(&mut self, decoded: &[(usize, u64, u64)]) {
        let Some(vm) = self.vm.clone() else {
            return;
        };
        for a in &mut self.areas {
            if a.at.is_some() && a.at != slot_address(a.bar, a.offset, a.size, decoded) {
                set_slot(&vm, a, None);
            }
        }
    }

    /// Makes the slots follow `decoded` (index, guest address, size of
    /// each BAR that decodes now): removes the slots of BARs that moved or
    /// stopped decoding, then installs the new ones.
    pub fn update(&mut self, decoded: &[(usize, u64, u64)]) {
        self.remove_stale(decoded);
        let Some(vm) = self.vm.clone() else {
            return;
        };
        let want = |a: &Area| slot_address(a.bar, a.offset, a.size, decoded);
        for a in &mut self.areas {
            let w = want(a);
            if a.at.is_none() && w.is_some() {
                set_slot(&vm, a, w);
            }
        }
    }
}

/// Where the area `[offset, offset + size)` of BAR `bar` belongs in the
/// guest given the decoding BARs: `None` when its BAR does not decode, or
/// decodes (even partly) outside the VMM's BAR window (a BAR being sized,
/// or moved over RAM: those accesses keep trapping).
fn slot_address(bar: usize, offset: u64, size: u64, decoded: &[(usize, u64, u64)]) -> Option<u64> {
    let &(_, base, _) = decoded.iter().find(|d| d.0 == bar)?;
    let gpa = base.checked_add(offset)?;
    let end = gpa.checked_add(size)?;
    (gpa >= BAR_WINDOW_START && end <= BAR_WINDOW_END).then_some(gpa)
}

/// Installs `a` at `gpa`, or removes its slot with `None`.
fn set_slot(vm: &VmFd, a: &mut Area, gpa: Option<u64>) {
    let r = kvm_userspace_memory_region {
        slot: a.slot,
        flags: 0,
        guest_phys_addr: gpa.or(a.at).unwrap_or(0),
        memory_size: if gpa.is_some() { a.size } else { 0 },
        userspace_addr: a.host as u64,
    };
    // SAFETY: the host range is this area's live mmap of the device, kept
    // until `Drop` removes the slot; a zero size deletes the slot.
    match unsafe { vm.set_user_memory_region(r) } {
        Ok(()) => a.at = gpa,
        Err(e) => log::error!(
            "BAR{} area {:#x}: KVM_SET_USER_MEMORY_REGION at {gpa:?}: {e}; access traps",
            a.bar,
            a.offset
        ),
    }
}

impl Drop for BarMaps {
    fn drop(&mut self) {
        for a in &mut self.areas {
            if let (Some(vm), Some(_)) = (self.vm.as_ref(), a.at) {
                set_slot(vm, a, None);
                if a.at.is_some() {
                    // Still in the guest: leaking the mapping is the only
                    // safe choice.
                    continue;
                }
            }
            // SAFETY: the mapping was made in `new` with this length and
            // no KVM slot refers to it any more.
            unsafe { libc::munmap(a.host as *mut libc::c_void, a.size as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_only_for_decoding_bars_inside_the_window() {
        let w = BAR_WINDOW_START;
        let decoded = [(4, w + 0x10000, 0x4000), (2, u64::MAX - 0xfff, 0x1000)];
        assert_eq!(slot_address(4, 0x1000, 0x1000, &decoded), Some(w + 0x11000));
        assert_eq!(slot_address(1, 0, 0x1000, &decoded), None, "not decoding");
        assert_eq!(
            slot_address(2, 0, 0x1000, &decoded),
            None,
            "outside the window"
        );
        assert_eq!(slot_address(2, 0x1000, 0x1000, &decoded), None, "wraps");
        let at_end = [(0, BAR_WINDOW_END - 0x1000, 0x2000)];
        assert_eq!(slot_address(0, 0, 0x2000, &at_end), None, "crosses the end");
        assert_eq!(
            slot_address(0, 0, 0x1000, &at_end),
            Some(BAR_WINDOW_END - 0x1000)
        );
    }
}
