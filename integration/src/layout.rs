//! Guest physical memory layout (x86_64).

/// GDT used to enter the kernel.
pub const GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6800;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol zero page (bzImage boot).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, including its NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel may be loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// End of RAM below 4 GiB: 3 GiB..4 GiB is left for MMIO (IOAPIC, LAPIC,
/// and later PCI).
pub const MEM_32BIT_GAP_START: u64 = 3 << 30;
/// RAM beyond the gap starts here.
pub const RAM_64BIT_START: u64 = 4 << 30;
/// KVM's TSS (three pages) and identity map page, just below the LAPIC area.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// E820 / PVH memory type for usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 / PVH memory type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

// The fixed areas must not overlap.
const _: () = {
    assert!(GDT_START + 0x20 <= PVH_INFO_START);
    assert!(PVH_MEMMAP_START + 16 * 24 <= PML4_START);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(KVM_IDENTITY_MAP_START >= 0xfee0_1000 && KVM_TSS_START + 3 * 4096 <= 1 << 32);
    assert!(KVM_IDENTITY_MAP_START + 4096 <= KVM_TSS_START);
};

/// Guest RAM ranges (start, length) for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((RAM_64BIT_START, size - low));
    }
    v
}

/// Memory map handed to the guest: (start, length, type). PCI ECAM is
/// listed as reserved, so that Linux uses it from early boot on.
pub fn memory_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![(0, EBDA_START, E820_RAM)];
    for (start, len) in ram_ranges(size) {
        if start >= RAM_64BIT_START {
            v.push((crate::pci::ECAM_BASE, crate::pci::ECAM_SIZE, E820_RESERVED));
        }
        let (s, l) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if l > 0 {
            v.push((s, l, E820_RAM));
        }
    }
    if size <= MEM_32BIT_GAP_START {
        v.push((crate::pci::ECAM_BASE, crate::pci::ECAM_SIZE, E820_RESERVED));
    }
    v
}

/// End (exclusive) of RAM below 4 GiB.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MEM_32BIT_GAP_START)
}

/// Page-aligned address for an initramfs of `len` bytes: as high as
/// possible below `limit`, and not below `floor`.
pub fn initramfs_addr(len: u64, floor: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(len)? & !0xfff;
    (start >= floor).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(low_ram_end(512 << 20), 512 << 20);
        assert_eq!(
            memory_map(512 << 20),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, (512 << 20) - HIMEM_START, E820_RAM),
                (0xe000_0000, 1 << 20, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn large_ram_skips_the_hole() {
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        let m = memory_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2], (0xe000_0000, 1 << 20, E820_RESERVED));
        assert_eq!(m[3], (4 << 30, 1 << 30, E820_RAM));
        assert_eq!(low_ram_end(4 << 30), 3 << 30);
    }

    #[test]
    fn initramfs_goes_high_and_aligned() {
        assert_eq!(
            initramfs_addr(0x1001, 0x100_0000, 0x2000_0000),
            Some(0x1fff_e000)
        );
        assert_eq!(initramfs_addr(0x2000_0000, 0x100_0000, 0x2000_0000), None);
        assert_eq!(initramfs_addr(0x3000_0000, 0, 0x2000_0000), None);
    }
}
