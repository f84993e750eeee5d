//! dma-race: a READ is in flight (slowed by a throttled backing disk, or
//! by the reference VMM's injected delay) while the guest takes memory
//! back from the device; the device must not touch that memory after the
//! guest's operation returned. Variants (one L2 boot runs them all):
//!
//! - `unmap`: UNMAP of the READ's buffer;
//! - `detach`: closing the VFIO container (DETACH) under the READ;
//! - `ring`: UNMAP of the virtqueue rings' own mapping (the request's
//!   header, status and data stay mapped); the used ring is canaried, and
//!   the device should stop the queue with DEVICE_NEEDS_RESET;
//! - `reset`: device reset (status 0, then the status reads 0) under the
//!   READ, then UNMAP of its buffer.
//!
//! `VIRTIO_IOMMU_TEST_EXPECT_VIOLATIONS=1` inverts the check: every variant
//! run but `reset` must show violations (a control against a VMM known to
//! reply without draining, such as upstream Cloud Hypervisor).
//! `VIRTIO_IOMMU_TEST_RACE_VARIANTS=unmap,ring` runs only those variants.
//! `VIRTIO_IOMMU_TEST_VMM_NAME=fork` puts the VMM's name in front of every
//! summary line the test prints (`fork dma-race unmap: rounds=...`).
//! `VIRTIO_IOMMU_TEST_RACE_KIB` and `..._FILLER_KIB` (1024 each) size the
//! racing READ and the READ queued before it.
//! `VIRTIO_IOMMU_TEST_RACE_DISK_OPTS` is appended to the throttled race
//! disk's `--disk` value: `direct=on` for a VMM that would otherwise read
//! it through L1's page cache (rounds past the disk's 63 slots would then
//! find their blocks cached and no READ in flight).
//!
//! `VIRTIO_IOMMU_TEST_RACE_DELAY_US=N` replaces the throttled disk by the
//! reference VMM's fault injection (`--disk ...,delay_us=N`): every READ
//! stays in flight N µs, so rounds are short and the UNMAP latency must
//! cover what is left of the delay after the pause (the drain waited).
//! Rounds: `VIRTIO_IOMMU_TEST_RACE_ROUNDS` (unmap, default 12) and
//! `..._DETACH_ROUNDS`, `..._RING_ROUNDS`, `..._RESET_ROUNDS` (default: the
//! same); `VIRTIO_IOMMU_TEST_RACE_SETTLE_MS` (1500) is how long the agent
//! watches a canary; `VIRTIO_IOMMU_TEST_RACE_EXPECT_NEEDS_RESET=1` also
//! requires DEVICE_NEEDS_RESET after every ring round.
//!
//! `dma_race_restored` (Cloud Hypervisor, with [`CH_REMOTE_ENV`] naming its
//! `ch-remote`): the device runs on its rings, the VM is snapshotted and
//! restored in a new VMM process, then the `ring` variant runs
//! (`VIRTIO_IOMMU_TEST_RESTORE_RING_ROUNDS`, default 5): its first round
//! UNMAPs the rings the restored device runs on, so a device restored
//! without leasing its rings again writes the canaried used ring. Prints
//! `dma-race ring-restored: ...`.
//!
//! `dma_race_drain_off_control` runs the reference VMM with `--iommu
//! drain=off` (replies without waiting, rings never revoked: what upstream
//! VMMs do) and requires the `unmap` and `ring` variants to report
//! violations: the suite shows it can fail. Rounds: `VIRTIO_IOMMU_TEST_RACE_CONTROL_ROUNDS`
//! (default 10).

use guest_tests::{
    bed_or_skip, env_num, expect_violations, report_timing, with_vmm_name, Bed, DiskSpec, Outcome,
    RaceSummary, Route, Scenario, CH_REMOTE_ENV, VMM_ENV,
};
use std::time::Duration;

const VARIANTS: [&str; 4] = ["unmap", "detach", "ring", "reset"];

struct Rounds {
    unmap: u64,
    detach: u64,
    ring: u64,
    reset: u64,
}

impl Rounds {
    fn of(&self, variant: &str) -> u64 {
        match variant {
            "unmap" => self.unmap,
            "detach" => self.detach,
            "ring" => self.ring,
            _ => self.reset,
        }
    }
}

/// The race scenario for `variants` with `rounds`.
fn scenario(variants: &[&str], rounds: &Rounds, delay_us: u64, pause_ms: u64) -> Scenario {
    let bps = env_num("VIRTIO_IOMMU_TEST_RACE_BPS", 2_000_000);
    let mut s = Scenario::new("dma-race");
    let disk = DiskSpec::new("slow", 256, true);
    s.disks = vec![if delay_us > 0 {
        disk.with_vmm_opts(&format!("delay_us={delay_us}"))
    } else {
        match std::env::var("VIRTIO_IOMMU_TEST_RACE_DISK_OPTS") {
            Ok(opts) if !opts.is_empty() => disk.throttled(bps).with_vmm_opts(&opts),
            _ => disk.throttled(bps),
        }
    }];
    // Pause between notify and the invalidation (control runs: make it
    // longer than the READ takes, then no violation may show either).
    s.params = vec![
        format!("race_kib={}", env_num("VIRTIO_IOMMU_TEST_RACE_KIB", 1024)),
        format!(
            "filler_kib={}",
            env_num("VIRTIO_IOMMU_TEST_RACE_FILLER_KIB", 1024)
        ),
        format!("rounds={}", rounds.unmap),
        format!("detach_rounds={}", rounds.detach),
        format!("ring_rounds={}", rounds.ring),
        format!("reset_rounds={}", rounds.reset),
        format!("variants={}", variants.join(",")),
        format!("pause_ms={pause_ms}"),
    ];
    if let Ok(ms) = std::env::var("VIRTIO_IOMMU_TEST_RACE_SETTLE_MS") {
        s.params.push(format!("settle_ms={ms}"));
    }
    // Per round: the pause, the READ and the checks' sleeps, and for ring
    // and reset a re-initialisation of the device; nested TCG multiplies
    // guest time, so leave a wide margin. Injected delays make rounds
    // short (about 0.15 s each on the nested bed, 0.5 s with a device
    // re-initialisation); throttled disks take seconds.
    let n = |v: &str| {
        if variants.contains(&v) {
            rounds.of(v)
        } else {
            0
        }
    };
    let secs = if delay_us > 0 {
        120 + n("unmap") / 2 + n("detach") + 2 * (n("ring") + n("reset"))
    } else {
        120 + VARIANTS.iter().map(|v| n(v)).sum::<u64>() * 8
    };
    s.timeout = Duration::from_secs(secs);
    s
}

fn run(bed: &Bed, test: &str, s: &Scenario) -> (Outcome, Vec<RaceSummary>) {
    let out = bed.run(s).expect("guest run");
    report_timing(test, &out);
    assert!(!out.timed_out, "run timed out; {}", out.describe());
    out.assert_single_boot();
    for l in out.lines_with("dma-race") {
        eprintln!("{}", with_vmm_name(&l));
    }
    let sums: Vec<RaceSummary> = out
        .lines_with("dma-race ")
        .iter()
        .filter_map(|l| RaceSummary::parse(l))
        .collect();
    (out, sums)
}

fn summary<'a>(sums: &'a [RaceSummary], variant: &str, out: &Outcome) -> &'a RaceSummary {
    sums.iter()
        .find(|x| x.variant == variant)
        .unwrap_or_else(|| panic!("no summary for variant {variant}; {}", out.describe()))
}

#[test]
fn dma_race() {
    let Some(bed) = bed_or_skip("dma_race") else {
        return;
    };
    let unmap = env_num("VIRTIO_IOMMU_TEST_RACE_ROUNDS", 12);
    let rounds = Rounds {
        unmap,
        detach: env_num("VIRTIO_IOMMU_TEST_RACE_DETACH_ROUNDS", unmap),
        ring: env_num("VIRTIO_IOMMU_TEST_RACE_RING_ROUNDS", unmap),
        reset: env_num("VIRTIO_IOMMU_TEST_RACE_RESET_ROUNDS", unmap),
    };
    let delay_us = env_num("VIRTIO_IOMMU_TEST_RACE_DELAY_US", 0);
    let pause_ms = env_num("VIRTIO_IOMMU_TEST_RACE_PAUSE_MS", 20);
    let expect_violations = expect_violations();
    let expect_needs_reset =
        std::env::var("VIRTIO_IOMMU_TEST_RACE_EXPECT_NEEDS_RESET").as_deref() == Ok("1");
    let selected =
        std::env::var("VIRTIO_IOMMU_TEST_RACE_VARIANTS").unwrap_or_else(|_| VARIANTS.join(","));
    let variants: Vec<&str> = VARIANTS
        .iter()
        .copied()
        .filter(|v| selected.split(',').any(|s| s.trim() == *v))
        .collect();
    assert!(
        !variants.is_empty(),
        "VIRTIO_IOMMU_TEST_RACE_VARIANTS={selected} names none of {VARIANTS:?}"
    );
    let s = scenario(&variants, &rounds, delay_us, pause_ms);
    let (out, sums) = run(&bed, "dma_race", &s);
    let result = out
        .agent_result("dma-race")
        .unwrap_or_else(|| panic!("no AGENT-RESULT for dma-race; {}", out.describe()));
    eprintln!("dma_race: {}", result.line);
    for v in &variants {
        let sum = summary(&sums, v, &out);
        assert_eq!(sum.rounds, rounds.of(v), "variant {v}; {}", out.describe());
    }
    if expect_violations {
        // A reset waits for the device's own I/O in every VMM: no control.
        for v in variants.iter().filter(|v| **v != "reset") {
            assert!(
                summary(&sums, v, &out).violations > 0,
                "expected the VMM under test to write after the {v} invalidation, saw none: \
                 the control has lost its power; {}",
                out.describe()
            );
        }
        return;
    }
    for sum in &sums {
        assert_eq!(
            sum.violations,
            0,
            "device touched memory after {} returned in {} of {} rounds; {}",
            sum.variant,
            sum.violations,
            sum.rounds,
            out.describe()
        );
    }
    if expect_needs_reset && variants.contains(&"ring") {
        let ring = summary(&sums, "ring", &out);
        assert_eq!(
            ring.needs_reset,
            Some(ring.rounds),
            "the device did not report DEVICE_NEEDS_RESET after every ring UNMAP; {}",
            out.describe()
        );
    }
    if delay_us > 0 && variants.contains(&"unmap") {
        let unmap = summary(&sums, "unmap", &out);
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

#[test]
fn dma_race_drain_off_control() {
    let Some(bed) = bed_or_skip("dma_race_drain_off_control") else {
        return;
    };
    if std::env::var_os(VMM_ENV).is_some() {
        guest_tests::skip(
            "dma_race_drain_off_control",
            "--iommu drain=off is the reference VMM's option; another VMM is under test",
        );
        return;
    }
    let n = env_num("VIRTIO_IOMMU_TEST_RACE_CONTROL_ROUNDS", 10);
    let rounds = Rounds {
        unmap: n,
        detach: 0,
        ring: n,
        reset: n,
    };
    let delay_us = env_num("VIRTIO_IOMMU_TEST_RACE_DELAY_US", 50_000).max(1);
    let pause_ms = env_num("VIRTIO_IOMMU_TEST_RACE_PAUSE_MS", 20);
    let mut s = scenario(&["unmap", "ring", "reset"], &rounds, delay_us, pause_ms);
    s.vmm_args = vec!["--iommu".into(), "drain=off".into()];
    let (out, sums) = run(&bed, "dma_race_drain_off_control", &s);
    assert!(
        out.lines.iter().any(|l| l.contains("drain=off is unsafe")),
        "the VMM did not warn about drain=off; {}",
        out.describe()
    );
    for v in ["unmap", "ring", "reset"] {
        let sum = summary(&sums, v, &out);
        eprintln!(
            "dma_race_drain_off_control: {v}: {} violations in {} rounds",
            sum.violations, sum.rounds
        );
    }
    // The device under drain=off writes through the removed data and ring
    // translations (the READs are still in flight at the UNMAP); a reset
    // still waits for the device's own I/O, so that variant may pass.
    for v in ["unmap", "ring"] {
        assert!(
            summary(&sums, v, &out).violations > 0,
            "drain=off replies without waiting, yet no write after the {v} UNMAP was seen: \
             the dma-race check has lost its power; {}",
            out.describe()
        );
    }
}

#[test]
fn dma_race_restored() {
    let Some(bed) = bed_or_skip("dma_race_restored") else {
        return;
    };
    if std::env::var_os(CH_REMOTE_ENV).is_none() || bed.route != Route::Nested {
        guest_tests::skip(
            "dma_race_restored",
            &format!(
                "needs Cloud Hypervisor under test with {CH_REMOTE_ENV} naming its ch-remote, \
                 on the nested route"
            ),
        );
        return;
    }
    let n = env_num("VIRTIO_IOMMU_TEST_RESTORE_RING_ROUNDS", 5);
    let rounds = Rounds {
        unmap: 0,
        detach: 0,
        ring: n,
        reset: 0,
    };
    let pause_ms = env_num("VIRTIO_IOMMU_TEST_RACE_PAUSE_MS", 20);
    let mut s = scenario(&["ring"], &rounds, 0, pause_ms);
    // Guest time: the VM is paused (its clock stopped) from shortly after
    // the snapshot point until it is restored.
    s.params.push("snapshot_wait_s=30".into());
    s.snapshot_restore = true;
    s.timeout += Duration::from_secs(180);
    let (out, sums) = run(&bed, "dma_race_restored", &s);
    let index = |marker: &str| {
        out.lines
            .iter()
            .position(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("no {marker:?} line; {}", out.describe()))
    };
    let snapshot = &out.lines[index("L1-SNAPSHOT rc=")];
    eprintln!("dma_race_restored: {}", snapshot.trim());
    assert!(
        snapshot.contains("L1-SNAPSHOT rc=0 "),
        "snapshot failed: {snapshot}; {}",
        out.describe()
    );
    // The ring rounds ran in the restored VM.
    assert!(
        index("L1-RESTORE start") < index("AGENT-SNAPSHOT-RESUMED"),
        "the guest went on before the restore; {}",
        out.describe()
    );
    let ring = summary(&sums, "ring", &out);
    eprintln!(
        "{}",
        with_vmm_name(&format!(
            "dma-race ring-restored: rounds={} violations={} needs_reset={} unmap_us min/median/max={}/{}/{}",
            ring.rounds,
            ring.violations,
            ring.needs_reset.unwrap_or(0),
            ring.unmap_us.0,
            ring.unmap_us.1,
            ring.unmap_us.2
        ))
    );
    assert_eq!(ring.rounds, n, "{}", out.describe());
    if expect_violations() {
        assert!(
            ring.violations > 0,
            "expected the restored device to write its used ring after the UNMAP, saw no \
             write: the control has lost its power; {}",
            out.describe()
        );
        return;
    }
    assert_eq!(
        ring.violations,
        0,
        "the restored device wrote its used ring after the ring UNMAP; {}",
        out.describe()
    );
    assert_eq!(
        ring.needs_reset,
        Some(ring.rounds),
        "the restored device did not report DEVICE_NEEDS_RESET after every ring UNMAP; {}",
        out.describe()
    );
    let result = out
        .agent_result("dma-race")
        .unwrap_or_else(|| panic!("no AGENT-RESULT for dma-race; {}", out.describe()));
    assert_eq!(result.status, "pass", "{}; {}", result.line, out.describe());
    assert_eq!(
        out.vmm_exit(),
        Some(0),
        "VMM exit status; {}",
        out.describe()
    );
}
