//! The VM's PCI devices, built from the configuration: the host bridge,
//! the virtio-iommu (when any disk or passed-through device is
//! `iommu=on`), one virtio-blk per `--disk` and one VFIO function per
//! `--device`.
//!
//! Slots: 00:00.0 host bridge, 00:01.0 virtio-iommu, then the disks in
//! command-line order from 00:02.0, then the passed-through devices. An
//! endpoint's ID is its BDF; the VIOT lists exactly the `iommu=on` ones.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use crate::acpi::IommuTopology;
use crate::config::{DeviceConfig, VmConfig};
use crate::fence::PageFencer;
use crate::pci::msix::GsiRouter;
use crate::pci::{BarAllocator, Bdf, PciBus, BAR_WINDOW_END, BAR_WINDOW_START};
use crate::vcpu_hold::VcpuHold;
use crate::vfio::dma::{Ledger, LedgerMapper};
use crate::vfio::PassthroughReport;
use crate::virtio::block::{Block, DiskReport};
use crate::virtio::iommu::{Iommu, IommuInspector};
use crate::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use crate::virtio::VirtioDevice;
use virtio_iommu::{EndpointHandle, Metrics};

/// PCI device number of the virtio-iommu (00:01.0).
pub const IOMMU_DEVICE: u8 = 1;
/// PCI device number of the first disk; the others follow in command-line
/// order (00:02.0, 00:03.0, ...), then the passed-through devices.
pub const FIRST_DISK_DEVICE: u8 = 2;

/// What [`build`] made.
pub struct PciSetup {
    /// The bus with every function on it.
    pub bus: PciBus,
    /// The IOMMU and its endpoints, for the VIOT.
    pub topology: Option<IommuTopology>,
    /// The IOMMU's counters.
    pub metrics: Option<Arc<Metrics>>,
    /// Per-disk exit reports.
    pub disks: Vec<DiskReport>,
    /// Per passed-through device exit reports.
    pub passthrough: Vec<PassthroughReport>,
}

/// A `--device` opened, waiting for its slot.
struct Opened<'c> {
    cfg: &'c DeviceConfig,
    container: Arc<VfioContainer>,
    device: Arc<VfioDevice>,
    host: String,
    guest: Bdf,
    /// `iommu=on`: the container's ledger.
    ledger: Option<Arc<Ledger>>,
}

/// The bus under construction.
struct Builder<'a> {
    vm: &'a Arc<VmFd>,
    mem: &'a GuestMemoryMmap,
    router: Arc<GsiRouter>,
    bars: BarAllocator,
    bus: PciBus,
}

impl Builder<'_> {
    fn add_virtio(&mut self, bdf: Bdf, dev: Box<dyn VirtioDevice>) -> Result<(), String> {
        let bar = self
            .bars
            .alloc(BAR_SIZE)
            .ok_or("PCI BAR window exhausted")?;
        let d = VirtioPciDevice::new(bdf, dev, bar, self.router.clone(), Some(self.vm.clone()))
            .map_err(|e| format!("{bdf}: {e}"))?;
        self.bus.add(bdf.dev, Arc::new(d));
        log::debug!("{bdf}: BAR0 at {bar:#x}");
        Ok(())
    }
}

/// Builds the bus for `cfg`. Errors name the device and what to do.
pub fn build(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    hold: &Arc<VcpuHold>,
) -> Result<PciSetup, String> {
    if cfg.disks.len() + cfg.devices.len() > usize::from(32 - FIRST_DISK_DEVICE) {
        return Err(format!(
            "too many PCI devices: {} disks and {} passed-through devices in {} slots",
            cfg.disks.len(),
            cfg.devices.len(),
            32 - FIRST_DISK_DEVICE
        ));
    }
    // Passed-through devices are opened first, so that a wrong path fails
    // before anything else is built; their containers become the IOMMU
    // endpoints' mappers.
    let mut opened = open_devices(cfg, vm)?;
    let mut b = Builder {
        vm,
        mem,
        router: Arc::new(GsiRouter::new(Some(vm.clone()))),
        bars: BarAllocator::new(BAR_WINDOW_START, BAR_WINDOW_END),
        bus: PciBus::new(),
    };
    let disk_bdf = |i: usize| Bdf::new(FIRST_DISK_DEVICE + i as u8);
    let mut handles: Vec<Option<EndpointHandle>> = cfg.disks.iter().map(|_| None).collect();
    let mut topology = None;
    let mut metrics = None;
    let mut inspector = None;
    if cfg.disks.iter().any(|d| d.iommu) || cfg.devices.iter().any(|d| d.iommu) {
        let mut iommu = new_iommu(cfg, mem, hold)?;
        let mut endpoints = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            if d.iommu {
                let bdf = disk_bdf(i);
                handles[i] = Some(iommu.add_endpoint(u32::from(bdf.id()))?);
                endpoints.push(bdf);
            }
        }
        for o in opened.iter_mut().filter(|o| o.cfg.iommu) {
            o.ledger = Some(add_vfio_endpoint(&mut iommu, o, mem)?);
            endpoints.push(o.guest);
        }
        inspector = Some(iommu.inspector());
        metrics = Some(iommu.metrics());
        let bdf = Bdf::new(IOMMU_DEVICE);
        b.add_virtio(bdf, Box::new(iommu))?;
        topology = Some(IommuTopology {
            iommu: bdf,
            endpoints,
        });
    }
    let mut disks = Vec::new();
    for (i, (d, h)) in cfg.disks.iter().zip(handles).enumerate() {
        let blk =
            Block::new(d, mem.clone(), h).map_err(|e| format!("disk {}: {e}", d.path.display()))?;
        disks.push(blk.report());
        b.add_virtio(disk_bdf(i), Box::new(blk))?;
    }
    let mut passthrough = Vec::new();
    // KVM slots after guest RAM's (one per RAM region, from 0).
    let slots = crate::vfio::bar_map::SlotAllocator::new(mem.num_regions() as u32);
    for o in opened {
        passthrough.push(add_passthrough(&mut b, o, &slots, inspector.as_ref())?);
    }
    Ok(PciSetup {
        bus: b.bus,
        topology,
        metrics,
        disks,
        passthrough,
    })
}

/// Opens every `--device` (checks first, then VFIO).
fn open_devices<'c>(cfg: &'c VmConfig, vm: &VmFd) -> Result<Vec<Opened<'c>>, String> {
    if cfg.devices.is_empty() {
        return Ok(Vec::new());
    }
    let kvm_vfio = crate::vfio::kvm_vfio_device(vm)?;
    let mut v = Vec::new();
    for (j, d) in cfg.devices.iter().enumerate() {
        let (container, device, host) = crate::vfio::open(&d.path, &kvm_vfio)?;
        v.push(Opened {
            cfg: d,
            container,
            device,
            host,
            guest: Bdf::new(FIRST_DISK_DEVICE + (cfg.disks.len() + j) as u8),
            ledger: None,
        });
    }
    Ok(v)
}

/// The virtio-iommu with the configured options.
fn new_iommu(cfg: &VmConfig, mem: &GuestMemoryMmap, hold: &Arc<VcpuHold>) -> Result<Iommu, String> {
    if cfg.iommu.fence_after.is_some() {
        check_fenceable(cfg)?;
    }
    if !cfg.iommu.drain {
        log::warn!(
            "UNSAFE: --iommu drain=off: UNMAP, DETACH and ATTACH reply without waiting \
             for in-flight DMA and cached ring translations are never revoked; devices \
             can write guest memory the guest already took back (a control mode for \
             tests and measurements, never for real guests)"
        );
        eprintln!("vmm: WARNING: --iommu drain=off is unsafe (see the log)");
    }
    let mut iommu = Iommu::with_config(
        mem.clone(),
        virtio_iommu::IommuConfig {
            drain: cfg.iommu.drain,
            address_width_bits: cfg.platform.iommu_address_width,
            fence_after: cfg.iommu.fence_after,
            ..Default::default()
        },
        cfg.iommu.poll,
    )
    .map_err(|e| format!("virtio-iommu: {e}"))?;
    if cfg.iommu.fence_after.is_some() {
        let mut fencer = PageFencer::new(mem.clone(), hold.clone());
        if !cfg.iommu.fence_hold {
            log::warn!(
                "UNSAFE: --iommu _fence_hold=off: fences replace guest pages while the vCPUs \
                 run; guest writes to those pages during a fence are lost (a control mode for \
                 tests only)"
            );
            eprintln!("vmm: WARNING: --iommu _fence_hold=off is unsafe (see the log)");
            fencer = fencer.without_holding_vcpus();
        }
        iommu.set_fencer(fencer);
    }
    iommu.set_idle_poll(cfg.iommu.idle_poll);
    iommu.set_inline_first(cfg.iommu.inline_first);
    Ok(iommu)
}

/// Refuses `--iommu fence_ms=` where a fence could not keep its promise
/// (see `crate::fence`): a buffered disk's late reads are copied into
/// whatever page is at the address when they complete; a VFIO container
/// (behind the IOMMU or not) keeps mapping the old pages; and a disk
/// outside the IOMMU has no pin the fence can revoke, so its DMA into a
/// page that shares a fenced buffer's page would land in the old page,
/// lost to the guest, with a success status.
pub(crate) fn check_fenceable(cfg: &VmConfig) -> Result<(), String> {
    if let Some(d) = cfg.disks.iter().find(|d| !d.iommu) {
        return Err(format!(
            "--iommu fence_ms= needs every disk behind the IOMMU ({} has iommu=off: its \
             DMA could land in a fenced page's old copy, which the guest no longer sees); \
             put it at iommu=on or drop fence_ms",
            d.path.display()
        ));
    }
    if let Some(d) = cfg.disks.iter().find(|d| !d.direct) {
        return Err(format!(
            "--iommu fence_ms= needs direct=on on every disk ({} has direct=off: \
             its reads complete through the VMM's address space, which a fence cannot \
             redirect); add direct=on or drop fence_ms",
            d.path.display()
        ));
    }
    if let Some(d) = cfg.devices.first() {
        return Err(format!(
            "--iommu fence_ms= cannot be used with a passed-through device ({}): its VFIO \
             container would keep mapping the old copy of a fenced page; drop fence_ms \
             or the device",
            d.path.display()
        ));
    }
    Ok(())
}

/// Makes the `iommu=on` device `o` an endpoint whose mapper is its
/// container; returns the container's ledger.
fn add_vfio_endpoint(
    iommu: &mut Iommu,
    o: &Opened<'_>,
    mem: &GuestMemoryMmap,
) -> Result<Arc<Ledger>, String> {
    let ledger = Arc::new(Ledger::default());
    if o.cfg.skip_container_unmap {
        log::warn!(
            "UNSAFE: --device {}: _skip_container_unmap=on: UNMAPs never reach \
             the VFIO container; the device keeps reaching memory the guest \
             took back (a control mode for tests only)",
            o.cfg.path.display()
        );
        eprintln!("vmm: WARNING: --device _skip_container_unmap=on is unsafe");
    }
    let mapper = LedgerMapper::new(
        o.container.clone(),
        mem.clone(),
        ledger.clone(),
        o.cfg.skip_container_unmap,
    );
    iommu.add_external_endpoint(u32::from(o.guest.id()), Arc::new(mapper))?;
    Ok(ledger)
}

/// Puts the opened device `o` on the bus (mapping all of RAM for an
/// `iommu=off` one) and returns its exit report.
fn add_passthrough(
    b: &mut Builder<'_>,
    o: Opened<'_>,
    slots: &crate::vfio::bar_map::SlotAllocator,
    inspector: Option<&IommuInspector>,
) -> Result<PassthroughReport, String> {
    let name = o.cfg.id.clone().unwrap_or_else(|| o.host.clone());
    let mut ram_mapped = 0;
    if o.ledger.is_none() {
        ram_mapped = crate::vfio::dma::map_guest_ram(&o.container, b.mem)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    // The device holds its container from here on.
    let f = crate::vfio::pci::VfioPciFunction::new(
        o.device,
        &name,
        &mut b.bars,
        b.router.clone(),
        Some((b.vm.clone(), slots)),
    )?;
    let mmapped_areas = f.mmapped_areas();
    b.bus.add(o.guest.dev, Arc::new(f));
    log::info!("{name}: host {} passed through as {}", o.host, o.guest);
    let translated = match (o.ledger, inspector) {
        (Some(l), Some(i)) => Some((l, i.clone())),
        (None, _) => None,
        (Some(_), None) => return Err(format!("{name}: iommu=on without an IOMMU")),
    };
    Ok(PassthroughReport {
        name,
        host: o.host,
        guest: o.guest,
        translated,
        ram_mapped,
        mmapped_areas,
        checks: 0,
        mismatches: 0,
        max_checked_mappings: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::check_fenceable;
    use crate::cli::Args;
    use crate::config::VmConfig;
    use clap::Parser;

    fn cfg(extra: &[&str]) -> VmConfig {
        let mut v = vec!["vmm", "--kernel", "/k", "--iommu", "fence_ms=200"];
        v.extend_from_slice(extra);
        VmConfig::parse(&Args::try_parse_from(v).expect("clap")).expect("config")
    }

    /// Only DMA the crate pins, into pages a fence can divert, may run
    /// beside fencing: every disk behind the IOMMU and O_DIRECT, no VFIO.
    #[test]
    fn fencing_refuses_dma_that_bypasses_its_pins() {
        let ok = cfg(&["--disk", "path=/a,iommu=on,direct=on"]);
        assert!(check_fenceable(&ok).is_ok());
        for (extra, word) in [
            (
                &[
                    "--disk",
                    "path=/a,iommu=on,direct=on",
                    "--disk",
                    "path=/b,direct=on",
                ][..],
                "iommu=off",
            ),
            (&["--disk", "path=/a,iommu=on"][..], "direct=off"),
            (
                &[
                    "--disk",
                    "path=/a,iommu=on,direct=on",
                    "--device",
                    "path=/sys/bus/pci/devices/0000:00:10.0",
                ][..],
                "passed-through",
            ),
            (
                &[
                    "--device",
                    "path=/sys/bus/pci/devices/0000:00:10.0,iommu=on",
                ][..],
                "passed-through",
            ),
        ] {
            let e = check_fenceable(&cfg(extra)).expect_err("refused");
            assert!(e.contains(word), "{extra:?}: {e}");
        }
    }
}
