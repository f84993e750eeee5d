//! The project's main job, for a user: boot a Linux guest whose disk sits
//! behind the strict virtio-iommu, let it write and read back data through
//! that disk (and through one outside the IOMMU), power off, and show what
//! the guest saw and the IOMMU's metrics.
//!
//! `ci/demo` builds the images and the reference VMM, then runs this.
//! `VIRTIO_IOMMU_TEST_VMM` names another VMM (Cloud Hypervisor CLI).

use guest_tests::{bed_or_skip, DiskSpec, Scenario};
use std::time::Duration;

fn main() {
    let Some(bed) = bed_or_skip("demo") else {
        return;
    };
    let mut s = Scenario::new("integrity");
    s.disks = vec![
        DiskSpec::new("d0", 128, true),
        DiskSpec::new("d1", 128, false),
    ];
    s.cpus = 2;
    s.params = vec!["mib=16".into(), "threads=2".into()];
    s.timeout = Duration::from_secs(300);
    eprintln!(
        "demo: booting {} with --disk ...,iommu=on and --disk ...,iommu=off (route {:?})",
        bed.vmm.display(),
        bed.route
    );
    let out = match bed.run(&s) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: guest run failed: {e}");
            std::process::exit(1);
        }
    };
    // The guest's view of the IOMMU and its disks, the agent's verdict,
    // and the VMM's closing report (metrics).
    let keep = [
        "virtio_iommu",
        "iommu",
        "VIOT",
        "virtio_blk",
        "AGENT",
        "probe disk",
        "integrity",
        "virtio-iommu metrics",
        "  requests",
        "  malformed",
        "  faults",
        "  drains",
        "  revocations",
        "  mapper",
        "guest stopped",
        "L1-RESULT",
    ];
    for l in &out.lines {
        if keep.iter().any(|k| l.contains(k)) {
            println!("{l}");
        }
    }
    println!("demo: full serial log: {}", out.log_path.display());
    let pass = out
        .agent_result("integrity")
        .is_some_and(|r| r.status == "pass");
    if out.timed_out || !pass || out.vmm_exit() != Some(0) {
        eprintln!("demo: FAILED; {}", out.describe());
        std::process::exit(1);
    }
    eprintln!("demo: ok in {:.1}s", out.elapsed.as_secs_f64());
}
