//! probe: virtio-iommu is bound in L2, `iommu=on` disks sit in strict DMA
//! groups, `iommu=off` disks have no group.

use guest_tests::{assert_agent_pass, bed_or_skip, report_timing, DiskSpec, Scenario};
use std::time::Duration;

#[test]
fn probe() {
    let Some(bed) = bed_or_skip("probe") else {
        return;
    };
    let mut s = Scenario::new("probe");
    s.disks = vec![
        DiskSpec::new("d0", 64, true),
        DiskSpec::new("d1", 64, false),
        DiskSpec::new("d2", 64, true),
    ];
    s.timeout = Duration::from_secs(180);
    let out = bed.run(&s).expect("guest run");
    report_timing("probe", &out);
    let r = assert_agent_pass(&out, "probe");
    eprintln!("probe: {}", r.line);
    // Labels, not kernel names: enumeration order differs between VMMs.
    let ids = |k: &str| r.fields.get(k).cloned().unwrap_or_default();
    assert_eq!(ids("ids_on"), "d0,d2", "{}", r.line);
    assert_eq!(ids("ids_off"), "d1", "{}", r.line);
}
