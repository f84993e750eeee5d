//! The per-domain IOVA -> GPA interval map.
//!
//! Mappings never overlap, so a `BTreeMap` keyed by the first IOVA of each
//! mapping is an interval structure: the mapping that may contain an address
//! is the last one that starts at or below it. MAP is O(log n), UNMAP of k
//! mappings is O(log n + k) (`extract_if` walks only the affected keys), and
//! a lookup is O(log n).
//!
//! Single-page mappings (what a strict Linux guest creates for most DMA
//! buffers) are also indexed in a hash table keyed by page number, so the
//! translation hot path finds them with one probe instead of a walk down
//! the tree.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use vm_memory::Permissions;

use crate::protocol::{VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};

/// Permission and memory-type flags of a mapping (the MAP request's `flags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MapFlags(u32);

impl MapFlags {
    /// Read access allowed.
    pub const READ: MapFlags = MapFlags(VIRTIO_IOMMU_MAP_F_READ);
    /// Write access allowed.
    pub const WRITE: MapFlags = MapFlags(VIRTIO_IOMMU_MAP_F_WRITE);
    /// Memory-mapped I/O.
    pub const MMIO: MapFlags = MapFlags(VIRTIO_IOMMU_MAP_F_MMIO);
    /// Read and write.
    pub const READ_WRITE: MapFlags = MapFlags(VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE);
    /// Every flag this device knows.
    pub const ALL: MapFlags =
        MapFlags(VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO);

    /// Builds flags from raw bits; `None` when an unknown bit is set.
    pub fn from_bits(bits: u32) -> Option<MapFlags> {
        (bits & !Self::ALL.0 == 0).then_some(MapFlags(bits))
    }

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether all bits of `other` are set.
    pub fn contains(self, other: MapFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether this mapping permits `access`.
    ///
    /// Writes need `WRITE`; reads need `READ`. A write-only mapping does not
    /// allow reads: the device enforces exactly what was asked.
    pub fn allows(self, access: Permissions) -> bool {
        let need = match access {
            Permissions::No => 0,
            Permissions::Read => VIRTIO_IOMMU_MAP_F_READ,
            Permissions::Write => VIRTIO_IOMMU_MAP_F_WRITE,
            Permissions::ReadWrite => VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        };
        self.0 & need == need
    }

    /// The `vm_memory` permissions these flags grant.
    pub fn permissions(self) -> Permissions {
        match (self.contains(Self::READ), self.contains(Self::WRITE)) {
            (true, true) => Permissions::ReadWrite,
            (true, false) => Permissions::Read,
            (false, true) => Permissions::Write,
            (false, false) => Permissions::No,
        }
    }
}

/// One mapping: `[iova, iova_end]` (inclusive) -> `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Last IOVA (inclusive).
    pub iova_end: u64,
    /// Guest-physical address of `iova`.
    pub gpa: u64,
    /// Permissions and memory type.
    pub flags: MapFlags,
}

impl Mapping {
    /// Size in bytes, saturating at `u64::MAX` for a mapping of the whole space.
    pub fn size(&self) -> u64 {
        (self.iova_end - self.iova).saturating_add(1)
    }

    /// Translates an IOVA inside this mapping.
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa.wrapping_add(iova - self.iova)
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    iova_end: u64,
    gpa: u64,
    flags: MapFlags,
}

/// A single-page mapping in the page index: its end is implied (16 bytes
/// instead of 24, in the table a guest fills most).
#[derive(Clone, Copy, Debug)]
struct PageEntry {
    gpa: u64,
    flags: MapFlags,
}

/// Why an insertion or removal was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeError {
    /// The new mapping overlaps an existing one.
    Overlap,
    /// The UNMAP range would split a mapping.
    Split,
}

/// Page size of the single-page index.
const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Multiplicative hash for page numbers (they are not attacker-chosen in a
/// way that matters: the table is bounded by the mapping limits).
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        let h = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

/// A set of non-overlapping mappings.
#[derive(Clone, Debug, Default)]
pub struct MappingTree {
    map: BTreeMap<u64, Entry>,
    pages: HashMap<u64, PageEntry, BuildHasherDefault<PageHasher>>,
}

fn is_single_page(iova: u64, iova_end: u64) -> bool {
    iova & (PAGE_SIZE - 1) == 0 && iova_end - iova == PAGE_SIZE - 1
}

impl MappingTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn entry_at_or_below(&self, addr: u64) -> Option<Mapping> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(&iova, e)| Mapping {
                iova,
                iova_end: e.iova_end,
                gpa: e.gpa,
                flags: e.flags,
            })
    }

    /// The mapping containing `iova`, if any.
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        if let Some(e) = self.pages.get(&(iova >> PAGE_SHIFT)) {
            let page = iova & !(PAGE_SIZE - 1);
            return Some(Mapping {
                iova: page,
                iova_end: page + (PAGE_SIZE - 1),
                gpa: e.gpa,
                flags: e.flags,
            });
        }
        self.entry_at_or_below(iova).filter(|m| m.iova_end >= iova)
    }

    /// Whether any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.entry_at_or_below(end)
            .is_some_and(|m| m.iova_end >= start)
    }

    /// Inserts a mapping that must not overlap an existing one.
    pub fn insert(&mut self, m: Mapping) -> Result<(), TreeError> {
        debug_assert!(m.iova <= m.iova_end);
        if self.overlaps(m.iova, m.iova_end) {
            return Err(TreeError::Overlap);
        }
        let e = Entry {
            iova_end: m.iova_end,
            gpa: m.gpa,
            flags: m.flags,
        };
        self.map.insert(m.iova, e);
        if is_single_page(m.iova, m.iova_end) {
            let p = PageEntry {
                gpa: m.gpa,
                flags: m.flags,
            };
            self.pages.insert(m.iova >> PAGE_SHIFT, p);
        }
        Ok(())
    }

    /// Checks that UNMAP of `[start, end]` splits no mapping.
    pub fn check_unmap(&self, start: u64, end: u64) -> Result<(), TreeError> {
        // A mapping split at the front starts before `start` and reaches it.
        if let Some(m) = self.lookup(start) {
            if m.iova < start {
                return Err(TreeError::Split);
            }
        }
        // A mapping split at the back contains `end` and goes beyond it.
        if let Some(m) = self.lookup(end) {
            if m.iova_end > end {
                return Err(TreeError::Split);
            }
        }
        Ok(())
    }

    /// Removes every mapping inside `[start, end]`, after [`check_unmap`]
    /// succeeded, appending them to `out`. Returns how many were removed.
    ///
    /// [`check_unmap`]: MappingTree::check_unmap
    pub fn remove_range(&mut self, start: u64, end: u64, out: &mut Vec<Mapping>) -> usize {
        let before = out.len();
        let pages = &mut self.pages;
        out.extend(
            self.map
                .extract_if(start..=end, |_, _| true)
                .inspect(|(iova, e)| {
                    if is_single_page(*iova, e.iova_end) {
                        pages.remove(&(iova >> PAGE_SHIFT));
                    }
                })
                .map(|(iova, e)| Mapping {
                    iova,
                    iova_end: e.iova_end,
                    gpa: e.gpa,
                    flags: e.flags,
                }),
        );
        out.len() - before
    }

    /// Removes every mapping.
    pub fn clear(&mut self) {
        self.map.clear();
        self.pages.clear();
    }

    /// Iterates over the mappings in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.map.iter().map(|(&iova, e)| Mapping {
            iova,
            iova_end: e.iova_end,
            gpa: e.gpa,
            flags: e.flags,
        })
    }

    /// The mapping that starts exactly at `iova`.
    pub fn starting_at(&self, iova: u64) -> Option<Mapping> {
        self.map.get(&iova).map(|e| Mapping {
            iova,
            iova_end: e.iova_end,
            gpa: e.gpa,
            flags: e.flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(iova: u64, end: u64) -> Mapping {
        Mapping {
            iova,
            iova_end: end,
            gpa: iova + 0x1000_0000,
            flags: MapFlags::READ_WRITE,
        }
    }

    /// The seven UNMAP examples of the specification, in order.
    #[test]
    fn unmap_examples_from_the_specification() {
        let run = |maps: &[(u64, u64)], unmap: (u64, u64)| -> Result<usize, TreeError> {
            let mut t = MappingTree::new();
            for &(s, e) in maps {
                t.insert(m(s, e)).unwrap();
            }
            t.check_unmap(unmap.0, unmap.1)?;
            let mut out = Vec::new();
            Ok(t.remove_range(unmap.0, unmap.1, &mut out))
        };
        assert_eq!(run(&[], (0, 4)), Ok(0));
        assert_eq!(run(&[(0, 9)], (0, 9)), Ok(1));
        assert_eq!(run(&[(0, 4), (5, 9)], (0, 9)), Ok(2));
        assert_eq!(run(&[(0, 9)], (0, 4)), Err(TreeError::Split));
        assert_eq!(run(&[(0, 4), (5, 9)], (0, 4)), Ok(1));
        assert_eq!(run(&[(0, 4)], (0, 9)), Ok(1));
        assert_eq!(run(&[(0, 4), (10, 14)], (0, 14)), Ok(2));
    }

    #[test]
    fn split_at_the_front_is_refused() {
        let mut t = MappingTree::new();
        t.insert(m(0x1000, 0x2fff)).unwrap();
        assert_eq!(t.check_unmap(0x2000, 0x3fff), Err(TreeError::Split));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn overlap_is_refused_on_both_sides() {
        let mut t = MappingTree::new();
        t.insert(m(0x2000, 0x2fff)).unwrap();
        assert_eq!(t.insert(m(0x1000, 0x2000)), Err(TreeError::Overlap));
        assert_eq!(t.insert(m(0x2fff, 0x3fff)), Err(TreeError::Overlap));
        assert_eq!(t.insert(m(0x0, 0xffff)), Err(TreeError::Overlap));
        t.insert(m(0x1000, 0x1fff)).unwrap();
        t.insert(m(0x3000, 0x3fff)).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn lookup_finds_the_containing_mapping() {
        let mut t = MappingTree::new();
        t.insert(m(0x1000, 0x1fff)).unwrap();
        assert_eq!(t.lookup(0x1800).unwrap().gpa_of(0x1800), 0x1000_1800);
        assert!(t.lookup(0x2000).is_none());
        assert!(t.lookup(0xfff).is_none());
    }

    #[test]
    fn whole_space_mapping_has_saturated_size() {
        let mut t = MappingTree::new();
        t.insert(m(0, u64::MAX)).unwrap();
        assert_eq!(t.lookup(u64::MAX).unwrap().size(), u64::MAX);
        let mut out = Vec::new();
        assert_eq!(t.remove_range(0, u64::MAX, &mut out), 1);
    }

    #[test]
    fn single_page_index_follows_inserts_and_removals() {
        let mut t = MappingTree::new();
        t.insert(m(0x1000, 0x1fff)).unwrap();
        t.insert(m(0x2000, 0x3fff)).unwrap();
        assert_eq!(t.pages.len(), 1);
        assert_eq!(t.lookup(0x1abc).unwrap().iova, 0x1000);
        assert_eq!(t.lookup(0x3abc).unwrap().iova, 0x2000);
        let mut out = Vec::new();
        t.remove_range(0, 0x1fff, &mut out);
        assert!(t.pages.is_empty());
        assert!(t.lookup(0x1abc).is_none());
        t.clear();
        assert!(t.lookup(0x3abc).is_none());
    }

    #[test]
    fn flags_permissions() {
        assert!(MapFlags::READ.allows(Permissions::Read));
        assert!(!MapFlags::READ.allows(Permissions::Write));
        assert!(!MapFlags::WRITE.allows(Permissions::Read));
        assert!(MapFlags::READ_WRITE.allows(Permissions::ReadWrite));
        assert_eq!(MapFlags::from_bits(8), None);
        assert_eq!(MapFlags::from_bits(7), Some(MapFlags::ALL));
    }
}
