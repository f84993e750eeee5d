//! faults: injected backend faults on `iommu=on` disks, seen from a real
//! L2 guest (the agent's `faults` scenario) and from the VMM's exit report.
//!
//! - `flaky` fails every 7th request (`fail_every=7`): the guest sees IOERR
//!   for exactly those requests, the other requests' data is verified, and
//!   an UNMAP after the errors replies at once (no pin left behind); the
//!   VMM's report counts exactly requests/7 errors and nothing in flight.
//! - `stuck` never completes a request covering sector 65536 (`stall_at`):
//!   the UNMAP of its buffer replies after the IOMMU's revoke grace (100
//!   ms) plus a small bound, the guest sees IOERR, nothing lands after the
//!   reply, and the `good` disk is served all along.
//!
//! `faults_drain_off_control` runs the same scenario with `--iommu
//! drain=off` and must fail: without an UNMAP that waits there is no
//! revocation, and the stalled READ never completes.
//!
//! Fault injection is the reference VMM's: with another VMM the tests are
//! skipped.

use guest_tests::{
    assert_agent_pass, bed_or_skip, field_num, report_timing, DiskSpec, Outcome, Scenario, VMM_ENV,
};
use std::time::Duration;

const FAIL_EVERY: u64 = 7;
const STALL_SECTOR: u64 = 65536;

/// The counters of the VMM's exit line for disk `id` (`virtio-blk ID.img:
/// engine=... requests=N ioerr=N ...`).
fn disk_report(out: &Outcome, id: &str) -> std::collections::HashMap<String, String> {
    out.exit_report(&format!("virtio-blk {id}"), "engine=")
}

fn scenario() -> Scenario {
    let mut s = Scenario::new("faults");
    s.disks = vec![
        DiskSpec::new("flaky", 64, true).with_vmm_opts(&format!("fail_every={FAIL_EVERY}")),
        DiskSpec::new("stuck", 64, true).with_vmm_opts(&format!("stall_at={STALL_SECTOR}")),
        DiskSpec::new("good", 64, true),
    ];
    s.params = vec![
        format!("fail_every={FAIL_EVERY}"),
        format!("stall_sector={STALL_SECTOR}"),
        "ndisks=3".into(),
    ];
    s.timeout = Duration::from_secs(240);
    s
}

/// The bed, unless the tests cannot run here or another VMM is under test.
fn bed(test: &str) -> Option<guest_tests::Bed> {
    if std::env::var_os(VMM_ENV).is_some() {
        guest_tests::skip(
            test,
            "fault injection is the reference VMM's; another VMM is under test",
        );
        return None;
    }
    bed_or_skip(test)
}

#[test]
fn faults() {
    let Some(bed) = bed("faults") else {
        return;
    };
    let out = bed.run(&scenario()).expect("guest run");
    report_timing("faults", &out);
    for l in out.lines.iter().filter(|l| l.starts_with("faults ")) {
        eprintln!("{l}");
    }
    let r = assert_agent_pass(&out, "faults");
    eprintln!("faults: {}", r.line);

    let flaky = disk_report(&out, "flaky");
    let (requests, ioerr) = (field_num(&flaky, "requests"), field_num(&flaky, "ioerr"));
    assert_eq!(
        ioerr,
        requests / FAIL_EVERY,
        "flaky: the VMM failed other requests than every {FAIL_EVERY}th: {flaky:?}"
    );
    assert!(
        r.fields
            .get("flaky_ioerr")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0 && n <= ioerr),
        "flaky: the guest's errors do not match the VMM's ({ioerr}): {}",
        r.line
    );
    assert_eq!(field_num(&flaky, "in_flight"), 0, "{flaky:?}");
    assert_eq!(
        field_num(&flaky, "cancelled"),
        0,
        "nothing was revoked on flaky"
    );

    let stuck = disk_report(&out, "stuck");
    let rounds: u64 = r
        .fields
        .get("stuck_rounds")
        .and_then(|v| v.parse().ok())
        .expect("stuck_rounds");
    assert_eq!(
        field_num(&stuck, "cancelled"),
        rounds,
        "every stalled READ is cancelled by its revocation: {stuck:?}"
    );
    assert_eq!(field_num(&stuck, "in_flight"), 0, "{stuck:?}");
    let good = disk_report(&out, "good");
    assert_eq!(field_num(&good, "ioerr"), 0, "{good:?}");
    let revocations = out
        .lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("revocations: "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the IOMMU metrics' revocations line");
    assert!(
        revocations >= rounds,
        "{revocations} revocations for {rounds} stalled READs"
    );
}

#[test]
fn faults_drain_off_control() {
    let Some(bed) = bed("faults_drain_off_control") else {
        return;
    };
    let mut s = scenario();
    s.params.push("stuck_rounds=1".into());
    s.vmm_args = vec!["--iommu".into(), "drain=off".into()];
    let out = bed.run(&s).expect("guest run");
    report_timing("faults_drain_off_control", &out);
    let r = out
        .agent_result("faults")
        .unwrap_or_else(|| panic!("no agent result; {}", out.describe()));
    eprintln!("faults_drain_off_control: {}", r.line);
    assert!(
        r.status == "fail" && r.line.contains("never completed"),
        "with drain=off the stalled READ cannot be revoked, yet the scenario did not fail \
         on it: the stuck check has lost its power; {}",
        r.line
    );
}
