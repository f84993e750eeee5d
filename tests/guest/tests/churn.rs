//! churn: thousands of VFIO MAP/UNMAP cycles in L2 with verified I/O
//! between them, through the guest agent's userspace virtio-blk driver.

use guest_tests::{assert_agent_pass, bed_or_skip, env_num, report_timing, DiskSpec, Scenario};
use std::time::Duration;

#[test]
fn churn() {
    let Some(bed) = bed_or_skip("churn") else {
        return;
    };
    let cycles = env_num("VIRTIO_IOMMU_TEST_CHURN_CYCLES", 2000);
    let mut s = Scenario::new("churn");
    s.disks = vec![DiskSpec::new("d0", 64, true)];
    s.params = vec![format!("cycles={cycles}")];
    // A run takes about a minute on the nested bed; a hung L2 (see the
    // README) costs the whole timeout before the retry.
    s.timeout = Duration::from_secs(240);
    let out = bed.run(&s).expect("guest run");
    report_timing("churn", &out);
    let r = assert_agent_pass(&out, "churn");
    eprintln!("churn: {}", r.line);
    assert_eq!(
        r.fields.get("cycles").and_then(|v| v.parse::<u64>().ok()),
        Some(cycles)
    );
}
