//! integrity: strict-mode L2 guest, O_DIRECT writes and reads of random
//! blocks from several threads on iommu=on and iommu=off disks, verified.
//! One iommu=on disk has two request queues (`num_queues=2`, both used by
//! the guest's two vCPUs), each with its own leased rings.
//!
//! The disks run on io_uring, except d0 (`_disable_io_uring=on`), which
//! keeps the worker-thread backend under test; with the reference VMM the
//! test reads the engines back from the VMM's exit report.

use guest_tests::{
    assert_agent_pass, bed_or_skip, env_num, report_timing, DiskSpec, Scenario, VMM_ENV,
};
use std::time::Duration;

#[test]
fn integrity() {
    let Some(bed) = bed_or_skip("integrity") else {
        return;
    };
    let mib = env_num("VIRTIO_IOMMU_TEST_INTEGRITY_MIB", 32);
    let mut s = Scenario::new("integrity");
    s.disks = vec![
        DiskSpec::new("d0", 128, true).with_vmm_opts("_disable_io_uring=on"),
        DiskSpec::new("d1", 128, false),
        DiskSpec::new("d2", 128, true).with_vmm_opts("num_queues=2"),
    ];
    s.cpus = 2;
    s.params = vec![format!("mib={mib}"), "threads=4".into()];
    s.timeout = Duration::from_secs(300);
    let out = bed.run(&s).expect("guest run");
    report_timing("integrity", &out);
    let r = assert_agent_pass(&out, "integrity");
    eprintln!("integrity: {}", r.line);
    let written: u64 = r
        .fields
        .get("written_kib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        written >= mib * 1024 * 9 / 10,
        "wrote too little: {}",
        r.line
    );
    assert_eq!(
        r.fields.get("strict").map(String::as_str),
        Some("1"),
        "{}",
        r.line
    );
    let queues = r.fields.get("queues").cloned().unwrap_or_default();
    assert!(
        queues.split(',').any(|q| q == "d2:2"),
        "the guest did not use two queues on the num_queues=2 disk (queues={queues}); {}",
        out.describe()
    );
    if std::env::var_os(VMM_ENV).is_none() {
        // The reference VMM's exit report: one line per disk.
        let engines: Vec<&String> = out
            .lines
            .iter()
            .filter(|l| l.starts_with("virtio-blk ") && l.contains("engine="))
            .collect();
        let on = |e: &str| engines.iter().filter(|l| l.contains(e)).count();
        assert!(
            engines.len() == 3 && on("engine=workers") == 1 && on("engine=io_uring") == 2,
            "expected d0 on worker threads and d1, d2 on io_uring: {engines:?}; {}",
            out.describe()
        );
        assert!(
            engines.iter().all(|l| l.contains(" ioerr=0 ")),
            "I/O errors on a healthy disk: {engines:?}"
        );
    }
}
