//! dma-race: a READ is in flight (slowed by a throttled backing disk) while
//! the guest UNMAPs (variant `unmap`) or detaches (variant `detach`) its
//! buffer; the device must not write into the buffer after the UNMAP or
//! DETACH has completed.
//!
//! `VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS=1` inverts the check for the `unmap`
//! variant: a bed self-test against a VMM known to reply without draining.

use guest_tests::{bed_or_skip, env_num, report_timing, DiskSpec, RaceSummary, Route, Scenario};
use std::time::Duration;

#[test]
fn dma_race() {
    let Some(bed) = bed_or_skip("dma_race") else {
        return;
    };
    let rounds = env_num("VIRTIO_IOMMU_TEST_RACE_ROUNDS", 12);
    let bps = env_num("VIRTIO_IOMMU_TEST_RACE_BPS", 2_000_000);
    let expect_violations =
        std::env::var("VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS").as_deref() == Ok("1");
    let mut s = Scenario::new("dma-race");
    s.disks = vec![DiskSpec::new("slow", 256, true).throttled(bps)];
    s.params = vec![format!("rounds={rounds}"), "variants=unmap,detach".into()];
    // Pause between notify and UNMAP (control runs: make it longer than the
    // READ takes, then no violation may show either).
    if let Ok(ms) = std::env::var("VIRTIO_IOMMU_TEST_RACE_PAUSE_MS") {
        s.params.push(format!("pause_ms={ms}"));
    }
    s.timeout = Duration::from_secs(120 + rounds * 8);
    let out = bed.run(&s).expect("guest run");
    report_timing("dma_race", &out);
    assert!(!out.timed_out, "run timed out; {}", out.describe());
    out.assert_single_boot();
    for l in out.lines_with("dma-race") {
        eprintln!("{l}");
    }
    let sums: Vec<RaceSummary> = out
        .lines_with("dma-race ")
        .iter()
        .filter_map(|l| RaceSummary::parse(l))
        .collect();
    let result = out
        .agent_result("dma-race")
        .unwrap_or_else(|| panic!("no AGENT-RESULT for dma-race; {}", out.describe()));
    eprintln!("dma_race: {}", result.line);
    for v in ["unmap", "detach"] {
        let sum = sums
            .iter()
            .find(|x| x.variant == v)
            .unwrap_or_else(|| panic!("no summary for variant {v}; {}", out.describe()));
        assert_eq!(sum.rounds, rounds, "variant {v}; {}", out.describe());
    }
    let unmap = sums.iter().find(|x| x.variant == "unmap").unwrap();
    if expect_violations {
        assert!(
            unmap.violations > 0,
            "expected the VMM under test to write after UNMAP, saw none; {}",
            out.describe()
        );
        return;
    }
    for sum in &sums {
        assert_eq!(
            sum.violations,
            0,
            "device wrote into the buffer after {} returned in {} of {} rounds; {}",
            sum.variant,
            sum.violations,
            sum.rounds,
            out.describe()
        );
    }
    if bed.route == Route::Nested {
        // With the throttled disk the READ must really have been in flight.
        assert_eq!(result.status, "pass", "{}; {}", result.line, out.describe());
    }
    assert_eq!(
        out.vmm_exit(),
        Some(0),
        "VMM exit status; {}",
        out.describe()
    );
}
