//! dma-race fence: an UNMAP over a READ the host cannot cancel replies in
//! bounded time, and nothing the guest sees changes after the reply.
//!
//! The race disk is backed by an L1 disk the outer QEMU throttles to
//! `VIRTIO_IOMMU_TEST_FENCE_BPS` (32 KiB/s): the racing READ (256 KiB,
//! behind a 64 KiB filler) takes about ten seconds once issued, and the
//! VMM's cancellation after its revocation grace cannot stop it. L2 runs
//! two vCPUs: while one makes the UNMAP, a writer on the other writes a
//! word in every page being invalidated (the pages a fence replaces).
//!
//! - `dma_race_fence`: the VMM with `--platform iommu_fence_ms=200` (Cloud
//!   Hypervisor's option; the reference VMM's `--iommu fence_ms=200`). Each
//!   UNMAP must reply within the grace (100 ms) + 200 ms + a margin for the
//!   nested bed (`VIRTIO_IOMMU_TEST_FENCE_MARGIN_MS`, 700), with 0
//!   violations (the canary written after the reply survives the READ's
//!   late DMA), 0 lost writes, and the READ ending with an error; I/O
//!   after the fences is verified.
//! - `dma_race_fence_shared_memory`: the same with guest RAM a memfd
//!   mapped shared (`--memory shared=on`): pages are punched out of it.
//! - `dma_race_fence_off_control`: the same without `fence_ms`; the UNMAP
//!   must wait for the READ (its fastest round longer than the fenced
//!   bound), which shows the fence is what bounds it.
//!
//! - `dma_race_fence_unheld_control` (reference VMM only): fencing with the
//!   vCPUs running (`--iommu _fence_hold=off`, an unsafe test mode) must
//!   lose some of the writer's writes: the writer can see a broken fence.
//!
//! Rounds: `VIRTIO_IOMMU_TEST_FENCE_ROUNDS` (3, also for the unheld
//! control) and
//! `VIRTIO_IOMMU_TEST_FENCE_OFF_ROUNDS` (2). Prints `dma-race fence: ...`
//! and `dma-race fence-off: ...`.

use guest_tests::{
    bed_or_skip, env_num, report_timing, with_vmm_name, DiskSpec, Outcome, RaceSummary, Route,
    Scenario,
};
use std::time::Duration;

/// The crate's default revocation grace.
const GRACE_MS: u64 = 100;
/// What the fencing run configures.
const FENCE_MS: u64 = 200;

fn scenario(variant: &str, rounds: u64, vmm_args: &[String], shared: bool) -> Scenario {
    let bps = env_num("VIRTIO_IOMMU_TEST_FENCE_BPS", 32 * 1024);
    let mut s = Scenario::new("dma-race");
    s.cpus = 2;
    if shared {
        s.memory_opts = Some("shared=on".into());
    }
    s.disks = vec![DiskSpec::new("slow", 256, true)
        .throttled(bps)
        .with_vmm_opts("direct=on")];
    s.params = vec![
        "race_kib=256".into(),
        "filler_kib=64".into(),
        format!("rounds={rounds}"),
        format!("variants={variant}"),
        "pause_ms=20".into(),
    ];
    s.vmm_args = vmm_args.to_vec();
    // Each round waits for its READ (320 KiB at `bps`), then four verified
    // write/read cycles of up to 128 KiB each.
    let read_s = 320 * 1024 / bps.max(1) + 1;
    s.timeout = Duration::from_secs(150 + rounds * (read_s * 2 + 10) + 4 * (read_s + 5));
    s
}

fn run(
    test: &str,
    variant: &str,
    rounds: u64,
    vmm_args: &[String],
    shared: bool,
) -> Option<(Outcome, RaceSummary)> {
    let bed = bed_or_skip(test)?;
    if bed.route != Route::Nested {
        eprintln!("SKIP: {test}: needs the nested route (a throttled L1 disk)");
        return None;
    }
    let out = bed
        .run(&scenario(variant, rounds, vmm_args, shared))
        .expect("guest run");
    report_timing(test, &out);
    assert!(!out.timed_out, "run timed out; {}", out.describe());
    out.assert_single_boot();
    for l in out.lines_with("dma-race") {
        eprintln!("{}", with_vmm_name(&l));
    }
    let r = out
        .agent_result("dma-race")
        .unwrap_or_else(|| panic!("no AGENT-RESULT for dma-race; {}", out.describe()));
    assert_eq!(r.status, "pass", "agent: {}; {}", r.line, out.describe());
    let sum = out
        .lines_with("dma-race ")
        .iter()
        .filter_map(|l| RaceSummary::parse(l))
        .find(|s| s.variant == variant)
        .unwrap_or_else(|| panic!("no dma-race {variant} summary; {}", out.describe()));
    assert_eq!(sum.rounds, rounds, "{}", out.describe());
    assert_eq!(
        out.vmm_exit(),
        Some(0),
        "VMM exit status; {}",
        out.describe()
    );
    Some((out, sum))
}

/// `status_err=N` of the variant's detail line.
fn read_errors(out: &Outcome, variant: &str) -> u64 {
    out.lines_with(&format!("dma-race-detail {variant}:"))
        .first()
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("status_err="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no dma-race-detail {variant} line; {}", out.describe()))
}

fn bound_us() -> u64 {
    (GRACE_MS + FENCE_MS + env_num("VIRTIO_IOMMU_TEST_FENCE_MARGIN_MS", 700)) * 1000
}

#[test]
fn dma_race_fence() {
    fenced("dma_race_fence", false);
}

#[test]
fn dma_race_fence_shared_memory() {
    fenced("dma_race_fence_shared_memory", true);
}

/// The fenced run, guest RAM private (anonymous) or `shared` (a memfd).
fn fenced(test: &str, shared: bool) {
    let rounds = env_num("VIRTIO_IOMMU_TEST_FENCE_ROUNDS", 3);
    let args = ["--platform".into(), format!("iommu_fence_ms={FENCE_MS}")];
    let Some((out, sum)) = run(test, "fence", rounds, &args, shared) else {
        return;
    };
    assert_eq!(
        sum.violations,
        0,
        "canary overwritten after the reply; {}",
        out.describe()
    );
    assert_eq!(
        sum.lost_writes,
        Some(0),
        "guest writes into the fenced pages were lost; {}",
        out.describe()
    );
    assert!(
        sum.unmap_us.2 <= bound_us(),
        "UNMAP took up to {} us, beyond grace + fence_ms + margin ({} us); {}",
        sum.unmap_us.2,
        bound_us(),
        out.describe()
    );
    assert_eq!(
        read_errors(&out, "fence"),
        rounds,
        "every fenced READ must end with an error; {}",
        out.describe()
    );
    let fences = out.lines_with("virtio-iommu: DMA the host cannot cancel");
    assert!(
        fences.len() as u64 >= rounds,
        "the VMM reported {} fences for {rounds} rounds; {}",
        fences.len(),
        out.describe()
    );
    for f in fences {
        eprintln!("{f}");
    }
}

#[test]
fn dma_race_fence_off_control() {
    let rounds = env_num("VIRTIO_IOMMU_TEST_FENCE_OFF_ROUNDS", 2);
    let Some((out, sum)) = run(
        "dma_race_fence_off_control",
        "fence-off",
        rounds,
        &[],
        false,
    ) else {
        return;
    };
    assert_eq!(sum.violations, 0, "{}", out.describe());
    assert!(
        sum.unmap_us.0 > bound_us(),
        "without fencing the UNMAP should wait for the READ, but its fastest round took \
         {} us (the fenced bound is {} us): the control has lost its power; {}",
        sum.unmap_us.0,
        bound_us(),
        out.describe()
    );
}

#[test]
fn dma_race_fence_unheld_control() {
    let rounds = env_num("VIRTIO_IOMMU_TEST_FENCE_ROUNDS", 3);
    let args = [
        "--iommu".into(),
        format!("fence_ms={FENCE_MS},_fence_hold=off"),
    ];
    let Some((out, sum)) = run(
        "dma_race_fence_unheld_control",
        "fence",
        rounds,
        &args,
        false,
    ) else {
        return;
    };
    assert!(
        sum.lost_writes.is_some_and(|n| n > 0),
        "a fence with the vCPUs running lost none of the writer's writes in {rounds} rounds: \
         the lost-write check has lost its power; {}",
        out.describe()
    );
}
