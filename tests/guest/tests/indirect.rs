//! indirect: the guest agent (a VFIO userspace driver in L2) posts a READ
//! whose only descriptor carries VRING_DESC_F_INDIRECT and points at an
//! IOVA that is not mapped, but that is the guest-physical address of a
//! valid table (see `tests/guest-agent/src/indirect.rs`). A strict device
//! must not read it: nothing may land (`landed_bytes=0`), however it
//! reports the broken request (NEEDS_RESET, IOERR, or no completion).
//!
//! `VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS=1` inverts the check: the control
//! against a VMM that follows indirect tables at guest-physical addresses
//! (upstream Cloud Hypervisor), where the READ must land.
//! `VIRTIO_IOMMU_TEST_VMM_NAME` goes in front of the summary line.

use guest_tests::{
    assert_agent_pass, bed_or_skip, expect_violations, field_num, report_timing, with_vmm_name,
    DiskSpec, Scenario,
};
use std::time::Duration;

#[test]
fn indirect() {
    let Some(bed) = bed_or_skip("indirect") else {
        return;
    };
    let mut s = Scenario::new("indirect");
    s.disks = vec![DiskSpec::new("d0", 64, true)];
    s.timeout = Duration::from_secs(180);
    let out = bed.run(&s).expect("guest run");
    report_timing("indirect", &out);
    let r = assert_agent_pass(&out, "indirect");
    eprintln!("{}", with_vmm_name(&format!("indirect: {}", r.line)));
    let landed = field_num(&r.fields, "landed_bytes");
    if expect_violations() {
        assert!(
            landed > 0,
            "the control VMM was expected to read the indirect table at its guest-physical \
             address and land the READ, but nothing landed: the test has lost its power; {}",
            out.describe()
        );
        return;
    }
    assert_eq!(
        landed,
        0,
        "the device read an indirect table through an address no mapping allows \
         ({landed} bytes of the READ landed); {}",
        out.describe()
    );
}
