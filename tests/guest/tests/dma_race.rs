//! dma-race: a READ is in flight (slowed by a throttled backing disk) while
//! the guest UNMAPs (variant `unmap`) or detaches (variant `detach`) its
//! buffer; the device must not write into the buffer after the UNMAP or
//! DETACH has completed.
//!
//! `VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS=1` inverts the check for the `unmap`
//! variant: a bed self-test against a VMM known to reply without draining.
//!
//! `VIRTIO_IOMMU_TEST_RACE_DELAY_US=N` replaces the throttled disk by the
//! reference VMM's fault injection (`--disk ...,delay_us=N`): every READ
//! stays in flight N µs, so rounds are short and the UNMAP latency must
//! cover what is left of the delay after the pause (the drain waited).
//! `VIRTIO_IOMMU_TEST_RACE_DETACH_ROUNDS` (default: the same as rounds)
//! and `VIRTIO_IOMMU_TEST_RACE_SETTLE_MS` (1500) tune the detach variant.

use guest_tests::{bed_or_skip, env_num, report_timing, DiskSpec, RaceSummary, Route, Scenario};
use std::time::Duration;

#[test]
fn dma_race() {
    let Some(bed) = bed_or_skip("dma_race") else {
        return;
    };
    let rounds = env_num("VIRTIO_IOMMU_TEST_RACE_ROUNDS", 12);
    let detach_rounds = env_num("VIRTIO_IOMMU_TEST_RACE_DETACH_ROUNDS", rounds);
    let bps = env_num("VIRTIO_IOMMU_TEST_RACE_BPS", 2_000_000);
    let delay_us = env_num("VIRTIO_IOMMU_TEST_RACE_DELAY_US", 0);
    let pause_ms = env_num("VIRTIO_IOMMU_TEST_RACE_PAUSE_MS", 20);
    let expect_violations =
        std::env::var("VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS").as_deref() == Ok("1");
    let mut s = Scenario::new("dma-race");
    let disk = DiskSpec::new("slow", 256, true);
    s.disks = vec![if delay_us > 0 {
        disk.with_vmm_opts(&format!("delay_us={delay_us}"))
    } else {
        disk.throttled(bps)
    }];
    // Pause between notify and UNMAP (control runs: make it longer than the
    // READ takes, then no violation may show either).
    s.params = vec![
        format!("rounds={rounds}"),
        format!("detach_rounds={detach_rounds}"),
        "variants=unmap,detach".into(),
        format!("pause_ms={pause_ms}"),
    ];
    if let Ok(ms) = std::env::var("VIRTIO_IOMMU_TEST_RACE_SETTLE_MS") {
        s.params.push(format!("settle_ms={ms}"));
    }
    // Per round: the pause, the READ and the checks' sleeps; nested TCG
    // multiplies guest time, so leave a wide margin.
    // Injected delays make rounds short (about 0.15 s each on the nested
    // bed); throttled disks take seconds.
    let secs = if delay_us > 0 {
        120 + rounds / 2 + detach_rounds
    } else {
        120 + (rounds + detach_rounds) * 8
    };
    s.timeout = Duration::from_secs(secs);
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
    for (v, n) in [("unmap", rounds), ("detach", detach_rounds)] {
        let sum = sums
            .iter()
            .find(|x| x.variant == v)
            .unwrap_or_else(|| panic!("no summary for variant {v}; {}", out.describe()));
        assert_eq!(sum.rounds, n, "variant {v}; {}", out.describe());
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
    if delay_us > 0 {
        // The READ was submitted `pause_ms` before the UNMAP and takes
        // `delay_us`: a drain that really waited shows most of the rest.
        let left_us = delay_us.saturating_sub(pause_ms * 1000);
        assert!(
            unmap.unmap_us.1 >= left_us / 2,
            "UNMAP median {} us does not cover the injected delay ({} us left after the pause); {}",
            unmap.unmap_us.1,
            left_us,
            out.describe()
        );
        assert_eq!(result.status, "pass", "{}; {}", result.line, out.describe());
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
