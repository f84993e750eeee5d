//! VFIO device passthrough (`--device path=/sys/bus/pci/devices/<BDF>`).
//!
//! A host PCI device bound to vfio-pci becomes a PCI function of the guest
//! ([`pci::VfioPciFunction`]), with a VFIO container of its own. Its DMA
//! goes through the host IOMMU, programmed through that container
//! ([`dma`]):
//! - `iommu=on`: the device is an endpoint of the virtio-iommu (a VIOT
//!   entry; an IOMMU group in the guest). The container holds exactly the
//!   mappings of the domain the endpoint is attached to, none while it is
//!   detached: the crate propagates MAP before it replies (a container
//!   failure rolls the MAP back, `S_DEVERR`) and replies to UNMAP, DETACH
//!   and a moving ATTACH only after the container's `UNMAP_DMA` returned,
//!   which is the host kernel's promise that the device can no longer
//!   reach the range. A bypass domain is refused for it (`S_UNSUPP`): that
//!   would need all of RAM in the container.
//! - `iommu=off`: all of guest RAM is mapped at its guest-physical
//!   addresses at boot, as Cloud Hypervisor does.
//!
//! Interrupts are MSI-X only; INTx and I/O BARs are not passed through.

pub mod bar_map;
pub mod dma;
pub mod pci;

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd};

/// The KVM VFIO device as vfio-ioctls shares it between containers.
pub type KvmVfioDevice = Arc<VfioDeviceFd>;

/// The KVM VFIO pseudo-device of a VM (one per VM; KVM refuses a second):
/// KVM learns which groups the VM uses (for DMA coherency on hosts whose
/// IOMMU does not enforce snooping).
pub fn kvm_vfio_device(vm: &VmFd) -> Result<KvmVfioDevice, String> {
    let mut d = kvm_bindings::kvm_create_device {
        type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let fd = vm.create_device(&mut d).map_err(|e| {
        format!("KVM_CREATE_DEVICE(VFIO): {e} (is the host kernel's kvm built with VFIO support?)")
    })?;
    Ok(Arc::new(VfioDeviceFd::new_from_kvm(fd)))
}

/// Checks that `path` is a PCI device bound to vfio-pci and in an IOMMU
/// group; returns its host address (`0000:00:10.0`) and group number.
pub fn check_bound(path: &Path) -> Result<(String, u32), String> {
    let p = path.display();
    if !path.join("config").exists() {
        return Err(format!(
            "{p}: not a PCI device (expected /sys/bus/pci/devices/<segment:bus:device.function>)"
        ));
    }
    let bdf = path
        .canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| format!("{p}: cannot resolve the device's address"))?;
    let bind = |unbind: &str| {
        format!(
            "bind it to vfio-pci first: echo vfio-pci >{p}/driver_override;{unbind} \
             echo {bdf} >/sys/bus/pci/drivers_probe"
        )
    };
    match std::fs::read_link(path.join("driver")) {
        Ok(d) if d.file_name().is_some_and(|n| n == "vfio-pci") => {}
        Ok(d) => {
            let drv = d.file_name().map(|n| n.to_string_lossy().into_owned());
            let unbind = format!(" echo {bdf} >{p}/driver/unbind;");
            return Err(format!(
                "{p}: bound to {}, not vfio-pci; {}",
                drv.unwrap_or_default(),
                bind(&unbind)
            ));
        }
        Err(_) => return Err(format!("{p}: bound to no driver; {}", bind(""))),
    }
    let group = std::fs::read_link(path.join("iommu_group"))
        .ok()
        .and_then(|g| g.file_name()?.to_str()?.parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "{p}: in no IOMMU group: the host runs without an IOMMU \
                 (boot it with intel_iommu=on or amd_iommu=on)"
            )
        })?;
    Ok((bdf, group))
}

/// Opens the device at `path` in a new container of its own.
pub fn open(
    path: &Path,
    kvm_vfio: &KvmVfioDevice,
) -> Result<(Arc<VfioContainer>, Arc<VfioDevice>, String), String> {
    let (bdf, group) = check_bound(path)?;
    let p = path.display();
    let container = Arc::new(
        VfioContainer::new(Some(kvm_vfio.clone()))
            .map_err(|e| format!("{p}: {e} (is the vfio module loaded? modprobe vfio-pci)"))?,
    );
    let device = VfioDevice::new(path, container.clone(), false).map_err(|e| {
        use vfio_ioctls::VfioError as E;
        let hint = match &e {
            E::GroupViable => format!(
                "every device in /sys/kernel/iommu_groups/{group}/devices must be bound to \
                 vfio-pci or to no driver"
            ),
            E::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => {
                "the group is in use (another VMM or VFIO user holds it)".into()
            }
            E::OpenGroup(..) => format!("cannot open /dev/vfio/{group}"),
            _ => "see the kernel log (dmesg)".into(),
        };
        format!("{p}: {e}: {hint}")
    })?;
    Ok((container, Arc::new(device), bdf))
}

/// A passed-through device's summary, printed at exit (`vfio NAME: ...`).
pub struct PassthroughReport {
    /// `id=` or the host address.
    pub name: String,
    /// Host PCI address.
    pub host: String,
    /// Address in the guest.
    pub guest: crate::pci::Bdf,
    /// `iommu=on`: the container's ledger and the IOMMU to compare it with.
    pub translated: Option<(Arc<dma::Ledger>, crate::virtio::iommu::IommuInspector)>,
    /// `iommu=off`: bytes of RAM mapped at boot.
    pub ram_mapped: u64,
    /// BAR areas mapped into the guest (the rest of the BARs trap).
    pub mmapped_areas: usize,
    /// Comparisons of the container with the domain made while the guest
    /// ran ([`PassthroughReport::check`]).
    pub checks: u64,
    /// Those that found a difference.
    pub mismatches: u64,
    /// The most domain mappings a comparison covered.
    pub max_checked_mappings: usize,
}

/// The container's and the domain's mappings, taken together.
struct Mirror {
    container: Vec<(u64, u64)>,
    /// The endpoint's domain; `None` while it is not attached.
    domain: Option<u32>,
    domain_maps: Vec<(u64, u64)>,
}

impl PassthroughReport {
    /// Compares the container's mappings with the domain's now (`iommu=on`
    /// only), with no request running in between; counts a mismatch.
    pub fn check(&mut self) {
        let Some(m) = self.mirror() else {
            return;
        };
        self.checks += 1;
        self.mismatches += u64::from(m.container != m.domain_maps);
        self.max_checked_mappings = self.max_checked_mappings.max(m.domain_maps.len());
    }

    /// Both sides, read under the IOMMU's lock (no request runs between
    /// the two reads, and requests are what change the container); `None`
    /// for an `iommu=off` device.
    fn mirror(&self) -> Option<Mirror> {
        let (ledger, iommu) = self.translated.as_ref()?;
        Some(iommu.with_endpoint_domain(u32::from(self.guest.id()), |d| {
            let (domain, domain_maps) = match d {
                Some((dom, maps)) => (Some(dom), maps),
                None => (None, Vec::new()),
            };
            Mirror {
                container: ledger.mappings(),
                domain,
                domain_maps,
            }
        }))
    }
}

impl std::fmt::Display for PassthroughReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        write!(
            f,
            "vfio {}: host={} guest={} bar_areas_mmapped={}",
            self.name, self.host, self.guest, self.mmapped_areas
        )?;
        let (Some((ledger, _)), Some(m)) = (&self.translated, self.mirror()) else {
            return write!(f, " iommu=off ram_mapped_mib={}", self.ram_mapped >> 20);
        };
        let domain = m.domain.map_or("none".to_string(), |d| d.to_string());
        let bytes = |v: &[(u64, u64)]| v.iter().map(|m| m.1).sum::<u64>();
        write!(
            f,
            concat!(
                " iommu=on maps={} unmaps={} map_errors={} unmap_errors={} unmaps_skipped={}",
                " container_mappings={} container_kib={} domain={} domain_mappings={}",
                " container_matches_domain={} checks={} mismatches={} max_checked_mappings={}"
            ),
            ledger.maps.load(Relaxed),
            ledger.unmaps.load(Relaxed),
            ledger.map_errors.load(Relaxed),
            ledger.unmap_errors.load(Relaxed),
            ledger.unmaps_skipped.load(Relaxed),
            m.container.len(),
            bytes(&m.container) >> 10,
            domain,
            m.domain_maps.len(),
            if m.container == m.domain_maps {
                "yes"
            } else {
                "no"
            },
            self.checks,
            self.mismatches,
            self.max_checked_mappings
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs device directory.
    fn fake(driver: Option<&str>, group: Option<&str>) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "vfio-check-{}-{}-{}",
            std::process::id(),
            driver.unwrap_or("none"),
            group.unwrap_or("none")
        ));
        let _ = std::fs::remove_dir_all(&root);
        let dev = root.join("0000:00:10.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
        if let Some(d) = driver {
            symlink(format!("../drivers/{d}"), dev.join("driver")).unwrap();
        }
        if let Some(g) = group {
            symlink(format!("../groups/{g}"), dev.join("iommu_group")).unwrap();
        }
        dev
    }

    #[test]
    fn binding_checks_say_what_to_do() {
        let ok = fake(Some("vfio-pci"), Some("7"));
        assert_eq!(check_bound(&ok).unwrap(), ("0000:00:10.0".into(), 7));
        let e = check_bound(&fake(Some("virtio-pci"), Some("7"))).unwrap_err();
        assert!(
            e.contains("bound to virtio-pci") && e.contains("driver_override"),
            "{e}"
        );
        let e = check_bound(&fake(None, Some("7"))).unwrap_err();
        assert!(e.contains("no driver") && !e.contains("unbind"), "{e}");
        let e = check_bound(&fake(Some("vfio-pci"), None)).unwrap_err();
        assert!(e.contains("intel_iommu=on"), "{e}");
        let e = check_bound(Path::new("/nonexistent/0000:00:01.0")).unwrap_err();
        assert!(e.contains("not a PCI device"), "{e}");
    }
}
