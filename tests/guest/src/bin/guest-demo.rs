//! The project's main job, for a user:
//!
//! 1. boot a Linux guest whose disk sits behind the strict virtio-iommu,
//!    let it write and read back data through that disk (and through one
//!    outside the IOMMU), power off, and show what the guest saw and the
//!    IOMMU's metrics;
//! 2. show what the project is for: a short race of UNMAP against a disk
//!    READ in flight, once with the strict device and once with `--iommu
//!    drain=off` (what upstream VMMs do), in words.
//!
//! `ci/demo` builds the images and the reference VMM, then runs this.
//! `VIRTIO_IOMMU_TEST_VMM` names another VMM (Cloud Hypervisor CLI): the
//! race then runs against a throttled disk, and the drain=off comparison
//! (a reference-VMM option) is left out.

use guest_tests::{bed_or_skip, env_num, Bed, DiskSpec, Outcome, RaceSummary, Scenario, VMM_ENV};
use std::time::Duration;

/// Rounds of the race (each about 0.2 s of guest time with the injected
/// delay, seconds with a throttled disk).
const RACE_ROUNDS: u64 = 20;
/// How long the reference VMM holds each READ (`--disk ...,delay_us=`).
const RACE_DELAY_US: u64 = 50_000;

/// What one race run showed.
struct Race {
    summary: RaceSummary,
    changed_max: u64,
    drains: Option<String>,
}

/// Boots the race scenario: `drain_off` adds `--iommu drain=off`.
fn race(bed: &Bed, reference_vmm: bool, drain_off: bool) -> Result<(Race, Outcome), String> {
    let mut s = Scenario::new("dma-race");
    let disk = DiskSpec::new("slow", 256, true);
    s.disks = vec![if reference_vmm {
        disk.with_vmm_opts(&format!("delay_us={RACE_DELAY_US}"))
    } else {
        disk.throttled(2_000_000)
    }];
    let rounds = env_num("VIRTIO_IOMMU_DEMO_RACE_ROUNDS", RACE_ROUNDS);
    s.params = vec![
        format!("rounds={rounds}"),
        "variants=unmap".into(),
        "pause_ms=20".into(),
    ];
    if drain_off {
        s.vmm_args = vec!["--iommu".into(), "drain=off".into()];
    }
    s.timeout = Duration::from_secs(180 + rounds * if reference_vmm { 1 } else { 8 });
    let out = bed.run(&s)?;
    let summary = out
        .lines_with("dma-race unmap:")
        .iter()
        .find_map(|l| RaceSummary::parse(l))
        .ok_or_else(|| format!("no race summary; {}", out.describe()))?;
    let changed_max = out
        .lines_with("dma-race-detail unmap:")
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("changed_bytes_max="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let drains = out
        .lines
        .iter()
        .find(|l| l.contains("  drains: "))
        .map(|l| l.trim().to_string());
    Ok((
        Race {
            summary,
            changed_max,
            drains,
        },
        out,
    ))
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// Part 2: the race, strict and (reference VMM) without draining.
fn show_race(bed: &Bed) -> bool {
    let reference_vmm = std::env::var_os(VMM_ENV).is_none();
    println!();
    println!("demo: part 2, the race this project exists for");
    println!(
        "  In the guest, a userspace driver (VFIO) starts a 1 MiB disk READ into a buffer, \
         waits 20 ms, then unmaps the buffer (VFIO UNMAP_DMA, which sends the virtio-iommu \
         an UNMAP) and, as soon as that returns, fills the buffer with a canary: the page \
         is the guest's again. {}",
        if reference_vmm {
            format!(
                "The VMM holds every READ {} (--disk ...,delay_us={RACE_DELAY_US}), so it is \
                 still in flight when the UNMAP arrives.",
                ms(RACE_DELAY_US)
            )
        } else {
            "The disk is throttled, so the READ is still in flight when the UNMAP arrives."
                .to_string()
        }
    );
    println!(
        "  Any canary byte that changes afterwards is a write through a translation the \
         guest had already removed."
    );
    let mut ok = true;
    let runs: &[bool] = if reference_vmm {
        &[false, true]
    } else {
        &[false]
    };
    for &drain_off in runs {
        let label = if drain_off {
            "with --iommu drain=off (reply at once, as Cloud Hypervisor, QEMU and crosvm do)"
        } else {
            "strict (this project)"
        };
        eprintln!("demo: booting the race, {label}");
        let (r, out) = match race(bed, reference_vmm, drain_off) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("demo: race run failed: {e}");
                return false;
            }
        };
        let s = &r.summary;
        println!("  {label}: {} rounds", s.rounds);
        println!(
            "    each UNMAP returned after {} (median; min {}, max {})",
            ms(s.unmap_us.1),
            ms(s.unmap_us.0),
            ms(s.unmap_us.2)
        );
        if s.violations == 0 {
            println!(
                "    bytes written into the buffer after the UNMAP returned: 0, in every round"
            );
        } else {
            println!(
                "    the READ wrote into the buffer after the UNMAP returned in {} of {} rounds \
                 (up to {} bytes in a round)",
                s.violations, s.rounds, r.changed_max
            );
        }
        if let Some(d) = &r.drains {
            println!("    IOMMU metrics: {d}");
        }
        // The strict run must be clean, the control must not be.
        ok &= if drain_off {
            s.violations > 0
        } else {
            s.violations == 0
        };
        if !ok {
            eprintln!(
                "demo: the race did not come out as it must; {}",
                out.describe()
            );
        }
    }
    if reference_vmm {
        println!(
            "  Strict, each UNMAP waits for the READ it overlaps (the {} of the delay left \
             after the pause), and nothing lands after its reply. Without draining, the reply \
             comes at once and the READ lands in a page the guest already reused.",
            ms(RACE_DELAY_US.saturating_sub(20_000))
        );
    }
    ok
}

/// What the metrics lines mean.
fn explain_metrics() {
    println!();
    println!("demo: reading the metrics");
    println!(
        "  requests <type> <status>: requests the device answered. With iommu.strict=1 Linux \
         maps every DMA buffer just before the I/O and unmaps it right after (a block read \
         is three: header, data, status), so map and unmap counts track the guest's I/O \
         (a few mappings, e.g. of rings, stay mapped)."
    );
    println!(
        "  drains: UNMAP/DETACH/ATTACH requests that had to wait for DMA in flight, and how \
         long they waited (min/median<=/max/mean in µs; the median is the upper bound of its \
         histogram bucket). Linux unmaps a buffer only after its I/O completed, so a \
         well-behaved guest causes none: part 2 provokes them."
    );
    println!(
        "  revocations: waits that exceeded the grace period (100 ms) and asked the device \
         to cancel; queue areas revoked: leased virtqueue rings whose translation the \
         guest removed."
    );
}

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
        "demo: part 1, booting {} with --disk ...,iommu=on and --disk ...,iommu=off (route {:?})",
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
        "  queue areas",
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
    explain_metrics();
    let start = std::time::Instant::now();
    if !show_race(&bed) {
        eprintln!("demo: FAILED (race)");
        std::process::exit(1);
    }
    eprintln!(
        "demo: ok (integrity run {:.1}s, race {:.1}s)",
        out.elapsed.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}
