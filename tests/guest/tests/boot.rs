//! boot: the VMM under test boots L2 to the agent with 2 vCPUs and 512 MiB,
//! and exits with status 0 when the guest powers off.

use guest_tests::{assert_agent_pass, bed_or_skip, report_timing, Scenario};
use std::time::Duration;

#[test]
fn boot() {
    let Some(bed) = bed_or_skip("boot") else {
        return;
    };
    let mut s = Scenario::new("boot");
    s.cpus = 2;
    s.timeout = Duration::from_secs(150);
    let out = bed.run(&s).expect("guest run");
    report_timing("boot", &out);
    let r = assert_agent_pass(&out, "boot");
    eprintln!("boot: {}", r.line);
    assert_eq!(
        r.fields.get("cpus").map(String::as_str),
        Some("0-1"),
        "{}",
        r.line
    );
    let mem: u64 = r.fields["mem_kib"].parse().unwrap();
    assert!(mem > 256 * 1024 && mem <= 512 * 1024, "{}", r.line);
    assert_eq!(out.vmm_exit(), Some(0), "{}", out.describe());
}
