//! Guest RAM: its backing (private anonymous memory, or a memfd mapped
//! shared with `--memory shared=on`) and prefaulting (`--memory
//! prefault=on`).
//!
//! By default guest RAM is allocated lazily: the guest's first access to a
//! page exits to KVM, which faults the host page in and maps it (a nested
//! page fault, on AMD an NPF). Prefaulting does both up front:
//! `MADV_POPULATE_WRITE` allocates every host page writable, then
//! `KVM_PRE_FAULT_MEMORY` (Linux 6.10+) builds the stage-2 mappings, so the
//! guest runs without nested page faults on RAM.
//!
//! Measured on the nested test bed (QEMU TCG with emulated SVM -> L1 KVM ->
//! this VMM -> L2), one-vCPU L2 boots running the disk `perf` scenario
//! (`guest-soak`, see `tests/guest/README.md`): without prefaulting, 8 of
//! 50 died of a triple fault, and every time the last event KVM had handled
//! was a page fault (vector 14) being re-injected after an exit during its
//! delivery; a hung `churn` run showed the same #PF injected and pending
//! for good. With only the stage-2 mappings built (host pages still the
//! shared zero page, so the guest's first write still faulted) 0 of 25
//! died; with both steps, 0 of 30, and populating 512 MiB took 1.3 s in L1.
//! The emulated SVM evidently mishandles nested page faults during event
//! delivery; with every page present and writable there are none for RAM.
//! On real hardware prefaulting only trades start-up time for fewer
//! faults later.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pre_fault_memory, KVMIO, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM over `ranges`: private anonymous memory, or with `shared`
/// one memfd mapped shared (each range at its own offset), as Cloud
/// Hypervisor's `--memory shared=on` does.
pub fn guest_ram(
    ranges: &[(GuestAddress, usize)],
    shared: bool,
) -> Result<GuestMemoryMmap, String> {
    if !shared {
        return GuestMemoryMmap::from_ranges(ranges).map_err(|e| e.to_string());
    }
    let total: usize = ranges.iter().map(|r| r.1).sum();
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total as u64)
        .map_err(|e| format!("sizing the guest RAM memfd to {total} bytes: {e}"))?;
    let mut offset = 0u64;
    let mut with_files = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let f = file.try_clone().map_err(|e| e.to_string())?;
        with_files.push((addr, len, Some(FileOffset::new(f, offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(|e| e.to_string())
}

vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

/// What [`prefault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefaulted {
    /// Bytes of host memory populated.
    pub populated: u64,
    /// Bytes mapped into KVM's stage-2 tables (0 where the kernel lacks
    /// KVM_PRE_FAULT_MEMORY: the guest then still faults them in).
    pub mapped: u64,
    /// How long it took.
    pub took: Duration,
}

/// Populates all of guest RAM writable and maps it for `vcpu` (any vCPU:
/// the stage-2 tables are shared while no vCPU is in SMM).
pub fn prefault(kvm: &Kvm, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<Prefaulted, String> {
    let t = Instant::now();
    let mut populated = 0;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| e.to_string())?;
        let len = usize::try_from(region.len()).map_err(|e| e.to_string())?;
        populate_write(host, len)?;
        populated += region.len();
    }
    let mut mapped = 0;
    if kvm.check_extension_raw(u64::from(KVM_CAP_PRE_FAULT_MEMORY)) > 0 {
        for region in mem.iter() {
            mapped += map_stage2(vcpu, region.start_addr().0, region.len())?;
        }
    }
    Ok(Prefaulted {
        populated,
        mapped,
        took: t.elapsed(),
    })
}

/// Faults in `[host, host + len)` for writing.
fn populate_write(host: *mut u8, len: usize) -> Result<(), String> {
    // SAFETY: the range is one region of guest RAM, mapped by the
    // GuestMemoryMmap that the caller holds; populating changes no
    // contents (fresh anonymous or file pages read as they were).
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(format!("MADV_POPULATE_WRITE: {e}"));
    }
    // Before Linux 5.14: touch every page. Reading and writing back the
    // same byte keeps whatever the page holds.
    const PAGE: usize = 4096;
    for off in (0..len).step_by(PAGE) {
        // SAFETY: `off < len`, inside the mapping (see above); volatile so
        // that the write-back is not elided.
        unsafe {
            let p = host.add(off);
            std::ptr::write_volatile(p, std::ptr::read_volatile(p));
        }
    }
    Ok(())
}

/// Maps `[gpa, gpa + len)` into the stage-2 tables; returns the bytes
/// mapped.
fn map_stage2(vcpu: &VcpuFd, gpa: u64, len: u64) -> Result<u64, String> {
    let mut arg = kvm_pre_fault_memory {
        gpa,
        size: len,
        ..Default::default()
    };
    while arg.size > 0 {
        // SAFETY: a vCPU ioctl with a pointer to a kvm_pre_fault_memory that
        // outlives the call; KVM advances gpa and size as it maps.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut arg)
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => return Err(format!("KVM_PRE_FAULT_MEMORY at {:#x}: {e}", arg.gpa)),
            }
        }
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn shared_ram_is_one_memfd_at_consecutive_offsets() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let mem = guest_ram(&ranges, true).unwrap();
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().expect("file-backed").start())
            .collect();
        assert_eq!(offsets, [0, 1 << 20]);
        mem.write_obj(0x1234_u32, GuestAddress(4 << 20)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(4 << 20)).unwrap(), 0x1234);
        let private = guest_ram(&ranges, false).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn populate_keeps_contents() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x8000)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        populate_write(host, 1 << 20).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x8000)).unwrap(), 0xabcd);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0);
    }
}
