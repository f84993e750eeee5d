//! passthrough: a PCI device of L1 (the outer QEMU's virtio-blk-pci behind
//! its emulated Intel IOMMU, bound to vfio-pci in L1) passed through to L2
//! with `--device path=/sys/bus/pci/devices/...`.
//!
//! - `passthrough_probe`: with `iommu=on` the device sits in an L2 IOMMU
//!   group of type DMA behind the virtio-iommu; with `iommu=off` in none.
//! - `passthrough_errors`: a path that is no PCI device, a device bound to
//!   no driver and a group held by another process each stop the VMM with
//!   a message that says so.
//! - `passthrough_integrity`: strict L2, verified O_DIRECT I/O from several
//!   threads through both passed-through devices; every MAP and UNMAP of
//!   the iommu=on one reached the VFIO container, and at exit the container
//!   holds exactly the domain's mappings (the VMM's exit report).
//! - `passthrough_churn`: thousands of MAP/UNMAP cycles from L2's own VFIO
//!   user (the agent's virtio-blk driver) with verified I/O between them,
//!   without a single container error.
//! - `passthrough_map_refused`: L1's container takes only 32 mappings
//!   (`dma_entry_limit`) and L2 maps 256 pages. Each MAP the container
//!   refuses must be answered S_DEVERR and rolled back (the container
//!   still mirrors the domain), a READ into a refused page must land
//!   nothing, and after a reset the device works. (Linux's virtio-iommu
//!   driver sends MAPs asynchronously and ignores their status, so L2's
//!   VFIO never sees the refusal.)
//! - `passthrough_unmap_blocked`: after UNMAP, a READ into the unmapped
//!   IOVA lands nothing; the IOMMU below (QEMU's Intel IOMMU, in L1)
//!   refuses the DMA and L1's kernel logs the fault.
//!   `passthrough_unmap_blocked_control` runs the same with UNMAPs that
//!   never reach the container (`_skip_container_unmap=on`) and must see
//!   the data land: the test can tell.
//!
//! QEMU's emulated devices do not wait for in-flight DMA when their IOMMU
//! mapping goes away, so a race of UNMAP against in-flight DMA on this bed
//! would measure QEMU, not this project: these tests check propagation and
//! blocking, the dma_race tests check the race on the VMM's own devices.

use guest_tests::{
    assert_agent_pass, bed_or_skip, env_num, field_num, report_timing, AgentResult, DiskSpec,
    Outcome, Scenario, VMM_ENV,
};
use std::time::Duration;

/// One emulated disk of the VMM beside two passed-through ones, one behind
/// the virtio-iommu and one not.
fn disks() -> Vec<DiskSpec> {
    vec![
        DiskSpec::new("d0", 64, true),
        DiskSpec::new("p0", 64, true).passed_through(),
        DiskSpec::new("p1", 64, false).passed_through(),
    ]
}

/// The L1 binding lines and the VMM's exit report for passed-through
/// devices, for the test log.
fn vfio_lines(out: &Outcome) -> Vec<String> {
    let mut v = out.lines_with("L1-VFIO ");
    v.extend(out.lines_with("vfio "));
    v
}

#[test]
fn passthrough_probe() {
    let Some(bed) = bed_or_skip("passthrough_probe") else {
        return;
    };
    let mut s = Scenario::new("probe");
    s.disks = disks();
    s.timeout = Duration::from_secs(240);
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_probe", &out);
    for l in vfio_lines(&out) {
        eprintln!("passthrough_probe: {l}");
    }
    let r = assert_agent_pass(&out, "probe");
    eprintln!("passthrough_probe: {}", r.line);
    let ids = |k: &str| r.fields.get(k).cloned().unwrap_or_default();
    assert_eq!(ids("ids_on"), "d0,p0", "{}", r.line);
    assert_eq!(ids("ids_off"), "p1", "{}", r.line);
    if std::env::var_os(VMM_ENV).is_none() {
        // QEMU's virtio-blk-pci has its virtio registers in a BAR of their
        // own, which VFIO lets the VMM map into the guest.
        for id in ["p0", "p1"] {
            let f = vfio_report(&out, id);
            assert!(
                field_num(&f, "bar_areas_mmapped") >= 1,
                "{id}: no BAR mapped: {f:?}"
            );
        }
    }
}

/// Wrong `--device` values, each tried by a VMM started in L1 before the
/// scenario's own: (name, device path, how L1 prepares the case, what the
/// error must say).
const BAD_DEVICES: [(&str, &str, &str, &str); 3] = [
    (
        "missing",
        "/sys/bus/pci/devices/0000:00:1f.7",
        "",
        "not a PCI device",
    ),
    // The host bridge: a PCI device bound to no driver.
    (
        "unbound",
        "/sys/bus/pci/devices/0000:00:00.0",
        "",
        "bound to no driver",
    ),
    // p0's group held open by the shell: the VMM cannot have it.
    (
        "busy",
        "/sys/bus/pci/devices/0000:00:10.0",
        "exec 3<>/dev/vfio/$(basename $(readlink /sys/bus/pci/devices/0000:00:10.0/iommu_group))",
        "the group is in use",
    ),
];

#[test]
fn passthrough_errors() {
    if std::env::var_os(VMM_ENV).is_some() {
        eprintln!("passthrough_errors: checks the reference VMM's messages only");
        return;
    }
    let Some(bed) = bed_or_skip("passthrough_errors") else {
        return;
    };
    let mut s = Scenario::new("probe");
    s.disks = vec![DiskSpec::new("p0", 64, true).passed_through()];
    s.timeout = Duration::from_secs(180);
    for (name, path, prepare, _) in BAD_DEVICES {
        s.l1_prelude.push_str(&format!(
            "{prepare}\n/vmm/vmm --kernel /l2/vmlinux --serial off --device path={path},iommu=on \
             2>&1 | sed 's/^/L1-BADDEV {name}: /'\nexec 3>&-\n"
        ));
    }
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_errors", &out);
    for (name, _, _, says) in BAD_DEVICES {
        let lines = out.lines_with(&format!("L1-BADDEV {name}: "));
        eprintln!("passthrough_errors: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains(says)),
            "{name}: expected an error saying {says:?}, got {lines:?}; {}",
            out.describe()
        );
    }
    // The group the failed attempt could not take is free again.
    let r = assert_agent_pass(&out, "probe");
    assert_eq!(
        r.fields.get("ids_on").map(String::as_str),
        Some("p0"),
        "{}",
        r.line
    );
}

#[test]
fn passthrough_map_refused() {
    let Some(bed) = bed_or_skip("passthrough_map_refused") else {
        return;
    };
    let mut s = Scenario::new("map-limit");
    s.disks = vec![DiskSpec::new("p0", 64, true).passed_through()];
    s.params = vec!["limit_disk=p0".into(), "max_maps=256".into()];
    // Read when a container is opened: the VMM's, started next.
    s.l1_prelude = "echo 32 >/sys/module/vfio_iommu_type1/parameters/dma_entry_limit".into();
    s.timeout = Duration::from_secs(180);
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_map_refused", &out);
    let r = assert_agent_pass(&out, "map-limit");
    eprintln!("passthrough_map_refused: {}", r.line);
    assert_eq!(field_num(&r.fields, "landed_bytes"), 0, "{}", r.line);
    // The READ went to the last page: DATA_IOVA + 255 * 8 KiB.
    assert_l1_fault(&out, "0x801fe000");
    if std::env::var_os(VMM_ENV).is_none() {
        let f = vfio_report(&out, "p0");
        eprintln!("p0: {f:?}");
        assert!(
            field_num(&f, "map_errors") >= 1,
            "no container refusal counted: {f:?}"
        );
        assert_eq!(field_num(&f, "mismatches"), 0, "{f:?}");
        assert_eq!(
            f.get("container_matches_domain").map(String::as_str),
            Some("yes"),
            "{f:?}"
        );
        let deverr = out
            .lines_with("requests map S_DEVERR: ")
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
            .sum::<u64>();
        assert_eq!(
            deverr,
            field_num(&f, "map_errors"),
            "every container refusal must be a MAP answered S_DEVERR; {}",
            out.describe()
        );
    }
}

/// L1's kernel logged a DMA remapping fault of the passed-through device at
/// `addr` (`DMAR: [DMA Write NO_PASID] Request device [00:10.0] fault addr
/// 0x...`).
fn assert_l1_fault(out: &Outcome, addr: &str) {
    let faults = out.lines_with("DMAR: [DMA");
    for l in &faults {
        eprintln!("L1: {l}");
    }
    assert!(
        faults
            .iter()
            .any(|l| l.contains("[00:10.0]") && l.contains(&format!("fault addr {addr} "))),
        "L1 logged no DMA fault of 00:10.0 at {addr}: {faults:?}; {}",
        out.describe()
    );
}

/// The VMM's exit report line of passed-through device `id`, as fields.
fn vfio_report(out: &Outcome, id: &str) -> std::collections::HashMap<String, String> {
    out.exit_report(&format!("vfio {id}: "), "host=")
}

/// Checks the iommu=on device's report: maps and unmaps went through,
/// none failed, and the container mirrors the domain.
fn assert_container_mirrors_domain(out: &Outcome, id: &str, min_maps: u64) {
    let f = vfio_report(out, id);
    eprintln!("{id}: {f:?}");
    assert!(
        field_num(&f, "maps") >= min_maps && field_num(&f, "unmaps") > 0,
        "too few container maps/unmaps for {id}: {f:?}"
    );
    assert_eq!(
        (field_num(&f, "map_errors"), field_num(&f, "unmap_errors")),
        (0, 0),
        "container errors for {id}: {f:?}"
    );
    assert_eq!(
        f.get("container_matches_domain").map(String::as_str),
        Some("yes"),
        "{id}: the container does not hold the domain's mappings at exit: {f:?}"
    );
    assert_eq!(
        field_num(&f, "mismatches"),
        0,
        "{id}: the container differed from the domain while the guest ran: {f:?}"
    );
}

#[test]
fn passthrough_integrity() {
    let Some(bed) = bed_or_skip("passthrough_integrity") else {
        return;
    };
    let mib = env_num("VIRTIO_IOMMU_TEST_INTEGRITY_MIB", 16);
    let mut s = Scenario::new("integrity");
    s.disks = disks();
    s.cpus = 2;
    s.params = vec![format!("mib={mib}"), "threads=4".into()];
    s.timeout = Duration::from_secs(300);
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_integrity", &out);
    for l in vfio_lines(&out) {
        eprintln!("passthrough_integrity: {l}");
    }
    let r = assert_agent_pass(&out, "integrity");
    eprintln!("passthrough_integrity: {}", r.line);
    assert_eq!(
        r.fields.get("strict").map(String::as_str),
        Some("1"),
        "{}",
        r.line
    );
    if std::env::var_os(VMM_ENV).is_none() {
        assert_container_mirrors_domain(&out, "p0", 100);
        // L2 detaches everything at power-off, so the exit comparison is
        // of two empty sets; the ones made while the kernel driver had its
        // domain attached (rings and buffers mapped) are what counts.
        let f = vfio_report(&out, "p0");
        assert!(
            field_num(&f, "checks") > 0 && field_num(&f, "max_checked_mappings") > 0,
            "no comparison covered a live domain: {f:?}"
        );
        let off = vfio_report(&out, "p1");
        assert_eq!(off.get("iommu").map(String::as_str), Some("off"), "{off:?}");
    }
}

#[test]
fn passthrough_churn() {
    let Some(bed) = bed_or_skip("passthrough_churn") else {
        return;
    };
    let cycles = env_num("VIRTIO_IOMMU_TEST_CHURN_CYCLES", 2000);
    let mut s = Scenario::new("churn");
    s.disks = vec![DiskSpec::new("p0", 64, true).passed_through()];
    s.params = vec![format!("cycles={cycles}"), "churn_disk=p0".into()];
    s.timeout = Duration::from_secs(300);
    let out = bed.run(&s).expect("guest run");
    report_timing("passthrough_churn", &out);
    let r = assert_agent_pass(&out, "churn");
    eprintln!("passthrough_churn: {}", r.line);
    assert_eq!(field_num(&r.fields, "cycles"), cycles, "{}", r.line);
    if std::env::var_os(VMM_ENV).is_none() {
        // Each cycle maps and unmaps once; the rings add a few more.
        assert_container_mirrors_domain(&out, "p0", cycles);
    }
}

/// Runs `unmap-blocked` on a passed-through iommu=on disk; returns the run
/// and the agent's summary fields (`landed_bytes=`, `completed=`, ...),
/// which it prints whether it passes or fails.
fn unmap_blocked(control: bool) -> Option<(Outcome, Option<AgentResult>, Summary)> {
    let test = if control {
        "passthrough_unmap_blocked_control"
    } else {
        "passthrough_unmap_blocked"
    };
    let bed = bed_or_skip(test)?;
    let mut d = DiskSpec::new("p0", 64, true).passed_through();
    if control {
        d = d.with_vmm_opts("_skip_container_unmap=on");
    }
    let mut s = Scenario::new("unmap-blocked");
    s.disks = vec![d];
    s.params = vec!["blocked_disk=p0".into()];
    s.timeout = Duration::from_secs(180);
    let out = bed.run(&s).expect("guest run");
    report_timing(test, &out);
    let r = out.agent_result("unmap-blocked");
    let summary = out
        .lines_with("unmap-blocked: disk=")
        .pop()
        .map(|l| guest_tests::parse_kv(&l["unmap-blocked: ".len()..]))
        .unwrap_or_default();
    eprintln!("{test}: {summary:?}");
    Some((out, r, summary))
}

type Summary = std::collections::HashMap<String, String>;

#[test]
fn passthrough_unmap_blocked() {
    let Some((out, r, summary)) = unmap_blocked(false) else {
        return;
    };
    let r = r.unwrap_or_else(|| panic!("no unmap-blocked result; {}", out.describe()));
    assert_eq!(r.status, "pass", "{}; {}", r.line, out.describe());
    assert_eq!(field_num(&summary, "landed_bytes"), 0, "{summary:?}");
    // The IOMMU below refused the DMA at the unmapped IOVA (the agent's
    // DATA_IOVA), and L1's kernel says so.
    assert_l1_fault(&out, "0x80000000");
    if std::env::var_os(VMM_ENV).is_none() {
        let f = vfio_report(&out, "p0");
        assert_eq!(field_num(&f, "unmaps_skipped"), 0, "{f:?}");
        assert_container_mirrors_domain(&out, "p0", 1);
    }
}

#[test]
fn passthrough_unmap_blocked_control() {
    if std::env::var_os(VMM_ENV).is_some() {
        eprintln!("passthrough_unmap_blocked_control: only the reference VMM has the control");
        return;
    }
    let Some((out, r, summary)) = unmap_blocked(true) else {
        return;
    };
    let r = r.unwrap_or_else(|| panic!("no unmap-blocked result; {}", out.describe()));
    // With UNMAPs that never reach the container the READ must land:
    // otherwise the test above could not tell a strict VMM from a broken one.
    assert_eq!(r.status, "fail", "the control passed: {}", r.line);
    assert!(
        field_num(&summary, "landed_bytes") > 0,
        "the control failed, but not because data landed: {summary:?} {}",
        r.line
    );
    let f = vfio_report(&out, "p0");
    assert!(field_num(&f, "unmaps_skipped") > 0, "{f:?}");
}
