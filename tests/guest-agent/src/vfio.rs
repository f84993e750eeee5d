//! A minimal VFIO (type1 IOMMU, group/container API) binding written against
//! the Linux UAPI (`include/uapi/linux/vfio.h`). Only what the scenarios need.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{os_err, Res};

const VFIO_TYPE: u64 = b';' as u64;
const VFIO_BASE: u64 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO encodes no size or direction.
const fn vfio_io(n: u64) -> u64 {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}

const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_INFO: u64 = vfio_io(7);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;

pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 4;
/// Index of the PCI configuration space region of a vfio-pci device.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    argsz: u32,
    pub flags: u32,
    pub index: u32,
    cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T, what: &str) -> Res<i32> {
    // SAFETY: `arg` is a valid, exclusively borrowed #[repr(C)] struct whose
    // layout matches what the kernel expects for `req`.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        return Err(os_err(what));
    }
    Ok(r)
}

fn ioctl_val(fd: RawFd, req: u64, arg: libc::c_ulong, what: &str) -> Res<i32> {
    // SAFETY: the request takes a plain integer argument.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        return Err(os_err(what));
    }
    Ok(r)
}

fn open_rw(path: &Path) -> Res<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    Ok(OwnedFd::from(f))
}

/// A container with one group and one device, type1v2 IOMMU.
/// Field order is the drop order: device, group, container.
pub struct VfioSession {
    pub device: OwnedFd,
    /// Held open: closing it detaches the group from the container.
    pub _group: OwnedFd,
    pub container: OwnedFd,
    pub regions: Vec<Option<RegionInfo>>,
}

impl VfioSession {
    /// Opens `/dev/vfio/vfio`, the group of `bdf` and the device itself.
    pub fn open(bdf: &str) -> Res<Self> {
        let container = open_rw(Path::new("/dev/vfio/vfio"))?;
        let cfd = container.as_raw_fd();
        let ver = ioctl_val(cfd, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        if ver != VFIO_API_VERSION {
            return Err(format!("unexpected VFIO API version {ver}"));
        }
        let ext = ioctl_val(
            cfd,
            VFIO_CHECK_EXTENSION,
            VFIO_TYPE1V2_IOMMU as _,
            "VFIO_CHECK_EXTENSION",
        )?;
        if ext != 1 {
            return Err("VFIO_TYPE1v2_IOMMU not supported".into());
        }
        let group_no = iommu_group_of(bdf)?;
        let group = open_rw(Path::new(&format!("/dev/vfio/{group_no}")))?;
        let gfd = group.as_raw_fd();
        let mut st = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            ..Default::default()
        };
        ioctl_ptr(gfd, VFIO_GROUP_GET_STATUS, &mut st, "VFIO_GROUP_GET_STATUS")?;
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!(
                "IOMMU group {group_no} is not viable (all its devices must be bound to vfio-pci)"
            ));
        }
        let mut c: i32 = cfd;
        ioctl_ptr(
            gfd,
            VFIO_GROUP_SET_CONTAINER,
            &mut c,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl_val(
            cfd,
            VFIO_SET_IOMMU,
            VFIO_TYPE1V2_IOMMU as _,
            "VFIO_SET_IOMMU(TYPE1v2)",
        )?;
        let name = CString::new(bdf).map_err(|e| e.to_string())?;
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let dfd = unsafe { libc::ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr()) };
        if dfd < 0 {
            return Err(os_err("VFIO_GROUP_GET_DEVICE_FD"));
        }
        // SAFETY: the kernel just returned a new file descriptor we own.
        let device = unsafe { OwnedFd::from_raw_fd(dfd) };
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..Default::default()
        };
        ioctl_ptr(
            device.as_raw_fd(),
            VFIO_DEVICE_GET_INFO,
            &mut info,
            "VFIO_DEVICE_GET_INFO",
        )?;
        let mut regions = Vec::new();
        for index in 0..info.num_regions {
            let mut ri = RegionInfo {
                argsz: std::mem::size_of::<RegionInfo>() as u32,
                index,
                ..Default::default()
            };
            // Regions the device does not have (e.g. VGA) return EINVAL.
            let ok = ioctl_ptr(
                device.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO,
                &mut ri,
                "VFIO_DEVICE_GET_REGION_INFO",
            )
            .is_ok();
            regions.push(if ok && ri.size > 0 { Some(ri) } else { None });
        }
        Ok(Self {
            device,
            _group: group,
            container,
            regions,
        })
    }

    pub fn region(&self, index: u32) -> Res<RegionInfo> {
        self.regions
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or_else(|| format!("device has no VFIO region {index}"))
    }

    /// Maps `size` bytes of process memory at `vaddr` to `iova`, read+write.
    pub fn map_dma(&self, vaddr: *const u8, iova: u64, size: u64) -> Res<()> {
        let mut m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size,
        };
        ioctl_ptr(
            self.container.as_raw_fd(),
            VFIO_IOMMU_MAP_DMA,
            &mut m,
            "VFIO_IOMMU_MAP_DMA",
        )
        .map(|_| ())
    }

    /// Unmaps `[iova, iova+size)`; returns the number of bytes unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Res<u64> {
        let mut u = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size,
        };
        ioctl_ptr(
            self.container.as_raw_fd(),
            VFIO_IOMMU_UNMAP_DMA,
            &mut u,
            "VFIO_IOMMU_UNMAP_DMA",
        )?;
        Ok(u.size)
    }

    /// Reads from a region through the device fd (pread).
    pub fn region_read(&self, index: u32, off: u64, buf: &mut [u8]) -> Res<()> {
        let r = self.region(index)?;
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::pread(
                self.device.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                (r.offset + off) as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(os_err(&format!("pread region {index} @{off:#x}")));
        }
        Ok(())
    }

    /// Writes to a region through the device fd (pwrite).
    pub fn region_write(&self, index: u32, off: u64, buf: &[u8]) -> Res<()> {
        let r = self.region(index)?;
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                self.device.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                (r.offset + off) as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(os_err(&format!("pwrite region {index} @{off:#x}")));
        }
        Ok(())
    }

    pub fn cfg_read8(&self, off: u64) -> Res<u8> {
        let mut b = [0u8; 1];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(b[0])
    }

    pub fn cfg_read16(&self, off: u64) -> Res<u16> {
        let mut b = [0u8; 2];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn cfg_read32(&self, off: u64) -> Res<u32> {
        let mut b = [0u8; 4];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn cfg_write16(&self, off: u64, v: u16) -> Res<()> {
        self.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
    }
}

/// The IOMMU group number of a PCI device, from sysfs.
pub fn iommu_group_of(bdf: &str) -> Res<String> {
    let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| format!("readlink {link}: {e}"))?;
    target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or_else(|| format!("bad iommu_group link {}", target.display()))
}

/// Binds a PCI device to vfio-pci (driver_override + unbind + drivers_probe)
/// and waits for its `/dev/vfio/N` node.
pub fn bind_vfio_pci(bdf: &str) -> Res<()> {
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    let current = std::fs::read_link(format!("{dev}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()));
    if current.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    crate::write_file(&format!("{dev}/driver_override"), "vfio-pci")?;
    if current.is_some() {
        crate::write_file(&format!("{dev}/driver/unbind"), bdf)?;
    }
    crate::write_file("/sys/bus/pci/drivers_probe", bdf)?;
    let group = iommu_group_of(bdf)?;
    let node = format!("/dev/vfio/{group}");
    for _ in 0..500 {
        if Path::new(&node).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!(
        "{node} did not appear after binding {bdf} to vfio-pci"
    ))
}
