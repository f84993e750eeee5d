//! The VM's configuration: what the command line (`cli.rs`) produces and
//! the devices are built from. Plain data and its defaults; nothing here
//! parses, so device code depends on this module and never on the CLI.

use std::path::PathBuf;
use std::time::Duration;

/// Default upper bound of the IOMMU's polling window after the request
/// queue's last activity (`--iommu poll_us=`).
pub const DEFAULT_POLL: Duration = Duration::from_millis(10);

/// Where the serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Tty,
    File(PathBuf),
    Null,
    Off,
}

/// One `--disk` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Behind the virtio-iommu (`iommu=on`).
    pub iommu: bool,
    /// Refuse writes (`readonly=on`; VIRTIO_BLK_F_RO is offered).
    pub readonly: bool,
    /// Fault injection: hold every request this many microseconds before
    /// its I/O starts (`delay_us=`), with its buffers pinned.
    pub delay_us: u64,
    /// Fault injection: fail every Nth request with IOERR (`fail_every=`).
    pub fail_every: u64,
    /// Fault injection: a read or write covering this sector never
    /// completes unless it is cancelled (`stall_at=`).
    pub stall_at: Option<u64>,
    /// Device name (`id=`): also the GET_ID string (default: the file
    /// name).
    pub id: Option<String>,
    /// Size of the queue offered (`queue_size=`, a power of two up to
    /// 1024; default 256).
    pub queue_size: u16,
    /// Request queues offered (`num_queues=`, 1 to 16; default 1).
    pub num_queues: u16,
    /// Bypass the host page cache (`direct=on`: O_DIRECT).
    pub direct: bool,
    /// Run the I/O on worker threads instead of io_uring
    /// (`_disable_io_uring=on`, Cloud Hypervisor's key).
    pub disable_io_uring: bool,
}

/// Queue size offered by default (`--disk queue_size=`).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: PathBuf::new(),
            iommu: false,
            readonly: false,
            delay_us: 0,
            fail_every: 0,
            stall_at: None,
            id: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            num_queues: 1,
            direct: false,
            disable_io_uring: false,
        }
    }
}

/// One `--device` value: a host PCI device passed through with VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Its sysfs directory (`/sys/bus/pci/devices/<BDF>`).
    pub path: PathBuf,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// Name in the exit report (default: the host BDF).
    pub id: Option<String>,
    /// UNSAFE test control (`_skip_container_unmap=on`): the guest's
    /// UNMAPs are acknowledged but never reach the VFIO container, so the
    /// device keeps reaching memory the guest took back. Exists only so a
    /// guest test can show that it detects exactly that.
    pub skip_container_unmap: bool,
}

/// Validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub mem_size: u64,
    /// Populate guest RAM, and map it for the guest, before it runs
    /// (`--memory prefault=on`).
    pub mem_prefault: bool,
    /// Back guest RAM by a memfd mapped shared (`--memory shared=on`).
    pub mem_shared: bool,
    pub disks: Vec<DiskConfig>,
    /// `--device`: passed-through host PCI devices.
    pub devices: Vec<DeviceConfig>,
    pub serial: SerialMode,
    /// `--iommu` options.
    pub iommu: IommuOptions,
    /// `--platform` options.
    pub platform: PlatformConfig,
}

/// `--iommu` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuOptions {
    /// Upper bound of the polling window (`poll_us=`).
    pub poll: Duration,
    /// Poll a quiet queue at idle priority (`idle_poll=`).
    pub idle_poll: bool,
    /// Serve each kick on its vCPU before waking the poller, and stop
    /// polling while the poller keeps losing its CPU (`inline_first=`).
    pub inline_first: bool,
    /// Invalidations wait for in-flight DMA (`drain=`, default on; off is
    /// the unsafe upstream-like control mode).
    pub drain: bool,
    /// Fence the pages of DMA still in flight this long after the
    /// revocation grace (`fence_ms=`; `None`: wait for the DMA however
    /// long it takes). See `crate::fence`.
    pub fence_after: Option<Duration>,
    /// UNSAFE test control (`_fence_hold=off`): fence without holding the
    /// vCPUs (guest writes during a fence can be lost).
    pub fence_hold: bool,
}

impl Default for IommuOptions {
    fn default() -> Self {
        IommuOptions {
            poll: DEFAULT_POLL,
            idle_poll: false,
            inline_first: true,
            drain: true,
            fence_after: None,
            fence_hold: true,
        }
    }
}

/// `--memory` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Populate it before the guest runs.
    pub prefault: bool,
    /// Back it by a memfd mapped shared.
    pub shared: bool,
}

/// `--platform` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Every device of segment 0 behind the IOMMU (`iommu_segments=[0]`).
    pub iommu_segment0: bool,
    /// Input range of the IOMMU in bits (`iommu_address_width=`).
    pub iommu_address_width: u8,
    /// Cloud Hypervisor's spelling of `--iommu fence_ms=` (`iommu_fence_ms=`).
    pub iommu_fence_ms: Option<u64>,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            iommu_segment0: false,
            iommu_address_width: 64,
            iommu_fence_ms: None,
        }
    }
}
