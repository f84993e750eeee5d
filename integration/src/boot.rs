//! Kernel, initramfs and command line loading (PVH ELF or bzImage).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64 },
    /// 64-bit long mode with identity-mapped page tables, RSI = zero page.
    Linux64 { entry: u64 },
}

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("kernel {0}: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(String),
    #[error("kernel {0}: ELF without a PVH note (only PVH ELF boot is supported)")]
    NoPvhNote(String),
    #[error("kernel load: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
    #[error("initramfs of {len} bytes does not fit between {floor:#x} and {limit:#x}")]
    InitramfsTooBig { len: u64, floor: u64, limit: u64 },
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |err| BootError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// Kernel image formats we can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Looks at the image's magic numbers.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    // Linux boot protocol: "HdrS" at 0x202.
    if head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Loads kernel, initramfs and command line into `mem` and writes the boot
/// parameters; returns how to start the boot vCPU.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let mut kf = File::open(kernel).map_err(io_err(kernel))?;
    let mut head = vec![0u8; 0x400];
    let n = kf.read(&mut head).map_err(io_err(kernel))?;
    head.truncate(n);
    kf.seek(SeekFrom::Start(0)).map_err(io_err(kernel))?;
    let format = detect_format(&head)
        .ok_or_else(|| BootError::UnknownFormat(kernel.display().to_string()))?;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)?;
    let cmdline_len = cl.as_cstring()?.as_bytes().len() as u32;

    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kf, himem)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (r, a.0),
                _ => return Err(BootError::NoPvhNote(kernel.display().to_string())),
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kf, himem)?;
            // 64-bit entry point: 0x200 past the protected-mode code.
            (r, r.kernel_load.0 + 0x200)
        }
    };
    log::debug!(
        "kernel {:?} loaded at {:#x}..{:#x}, entry {entry:#x}",
        format,
        result.kernel_load.0,
        result.kernel_end
    );

    let initrd = match initramfs {
        Some(p) => {
            let data = std::fs::read(p).map_err(io_err(p))?;
            let len = data.len() as u64;
            let floor = result.kernel_end.max(HIMEM_START);
            let mut limit = low_ram_end(mem_size);
            if let Some(h) = result.setup_header {
                if h.initrd_addr_max != 0 {
                    limit = limit.min(u64::from(h.initrd_addr_max) + 1);
                }
            }
            let addr = initramfs_addr(len, floor, limit).ok_or(BootError::InitramfsTooBig {
                len,
                floor,
                limit,
            })?;
            mem.write_slice(&data, GuestAddress(addr))?;
            log::debug!("initramfs at {addr:#x}, {len} bytes");
            Some((addr, len))
        }
        None => None,
    };

    let map = memory_map(mem_size);
    match format {
        KernelFormat::Elf => {
            let mut info = hvm_start_info {
                magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                rsdp_paddr: crate::acpi::RSDP_START,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut modules = Vec::new();
            if let Some((addr, len)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                modules.push(hvm_modlist_entry {
                    paddr: addr,
                    size: len,
                    ..Default::default()
                });
            }
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&params, mem)?;
            Ok(BootEntry::Pvh { entry })
        }
        KernelFormat::BzImage => {
            let mut bp = boot_params::default();
            if let Some(h) = result.setup_header {
                bp.hdr = h;
            }
            bp.hdr.type_of_loader = 0xff;
            bp.hdr.boot_flag = 0xaa55;
            bp.hdr.header = 0x5372_6448; // "HdrS"
            bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
            bp.hdr.cmdline_size = cmdline_len;
            bp.acpi_rsdp_addr = crate::acpi::RSDP_START;
            if let Some((addr, len)) = initrd {
                bp.hdr.ramdisk_image = addr as u32;
                bp.hdr.ramdisk_size = len as u32;
            }
            for (i, &(addr, size, type_)) in map.iter().enumerate() {
                bp.e820_table[i] = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            bp.e820_entries = map.len() as u8;
            let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem)?;
            write_identity_page_tables(mem)?;
            Ok(BootEntry::Linux64 { entry })
        }
    }
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit boot protocol.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let mut elf = vec![0u8; 0x400];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert_eq!(detect_format(&elf), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(&[0u8; 0x400]), None);
        assert_eq!(detect_format(b"\x7fEL"), None);
    }

    #[test]
    fn not_a_kernel() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = std::env::temp_dir().join(format!("vmm-not-a-kernel-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let e = load_guest(&mem, 64 << 20, &p, None, "").unwrap_err();
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(e, BootError::UnknownFormat(_)), "{e}");
    }
}
