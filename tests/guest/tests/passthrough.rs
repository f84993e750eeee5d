//! passthrough: a PCI device of L1 (the outer QEMU's virtio-blk-pci behind
//! its emulated Intel IOMMU, bound to vfio-pci in L1) passed through to L2
//! with `--device path=/sys/bus/pci/devices/...`.
//!
//! - `passthrough_probe`: with `iommu=on` the device sits in an L2 IOMMU
//!   group of type DMA behind the virtio-iommu; with `iommu=off` in none.
//! - `passthrough_integrity`: strict L2, verified O_DIRECT I/O from several
//!   threads through both passed-through devices; every MAP and UNMAP of
//!   the iommu=on one reached the VFIO container (the VMM's exit report).

use guest_tests::{assert_agent_pass, bed_or_skip, report_timing, DiskSpec, Outcome, Scenario};
use std::time::Duration;

/// One emulated disk of the VMM beside two passed-through ones, one behind
/// the virtio-iommu and one not.
fn disks() -> Vec<DiskSpec> {
    vec![
        DiskSpec::new("d0", 64, true),
        DiskSpec::new("p0", 64, true).passed_through(),
        DiskSpec::new("p1", 64, false).passed_through(),
    ]
}

/// The L1 binding lines and the VMM's exit report for passed-through
/// devices, for the test log.
fn vfio_lines(out: &Outcome) -> Vec<String> {
    let mut v = out.lines_with("L1-VFIO ");
    v.extend(out.lines_with("vfio "));
    v
}

#[test]
fn passthrough_probe() {
    let Some(bed) = bed_or_skip("passthrough_probe") else {
        return;
    };
    let mut s = Scenario::new("probe");
    s.disks = disks();
    s.timeout = Duration::from_secs(240);
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_probe", &out);
    for l in vfio_lines(&out) {
        eprintln!("passthrough_probe: {l}");
    }
    let r = assert_agent_pass(&out, "probe");
    eprintln!("passthrough_probe: {}", r.line);
    let ids = |k: &str| r.fields.get(k).cloned().unwrap_or_default();
    assert_eq!(ids("ids_on"), "d0,p0", "{}", r.line);
    assert_eq!(ids("ids_off"), "p1", "{}", r.line);
}
