//! Bed self-test: L1 boots under QEMU TCG with an emulated SVM CPU, loads
//! kvm-amd, and /dev/kvm can create a VM and a vCPU; L1's init holds a VM
//! and then brings its second CPU online. Needs no VMM.

use guest_tests::{detect_route, report_timing, skip, Bed, Route};
use std::time::Duration;

#[test]
fn l1_kvm() {
    if detect_route() == Route::Direct {
        skip(
            "l1_kvm",
            "host has hardware virtualization; the L1 layer is not used",
        );
        return;
    }
    let bed = match Bed::get_l1_only() {
        Ok(b) => b,
        Err(r) => {
            skip("l1_kvm", &r);
            return;
        }
    };
    let out = bed.boot_l1(Duration::from_secs(120)).expect("L1 boot");
    report_timing("l1_kvm", &out);
    assert!(!out.timed_out, "L1 timed out; {}", out.describe());
    assert!(
        !out.lines_with("L1-KVM dev=present").is_empty(),
        "/dev/kvm missing in L1; {}",
        out.describe()
    );
    let r = out
        .agent_result("kvm-check")
        .unwrap_or_else(|| panic!("no kvm-check result; {}", out.describe()));
    assert_eq!(r.status, "pass", "{}; {}", r.line, out.describe());
    assert!(
        !out.lines_with("L1-CPUS online=0-1").is_empty(),
        "L1 did not bring its second CPU online; {}",
        out.describe()
    );
    assert!(
        !out.lines_with("L1-INIT done").is_empty(),
        "L1 init did not finish; {}",
        out.describe()
    );
}
