//! Snapshot/restore validation and external mapper propagation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_iommu::state::{IommuState, StateError};
use virtio_iommu::testing::{Harness, RecordingMapper};
use virtio_iommu::{EndpointOptions, IommuConfig, MapFlags, Mapping, Status};
use vm_memory::Permissions;

const RW: u32 = 3;

fn populated() -> Harness {
    let mut h = Harness::new(IommuConfig::default());
    for ep in [1, 2, 3] {
        h.dev.add_endpoint(ep).unwrap();
    }
    assert_eq!(h.attach(10, 1, 0), Some(Status::Ok));
    assert_eq!(h.attach(10, 2, 0), Some(Status::Ok));
    assert_eq!(h.attach(11, 3, 1), Some(Status::Ok));
    assert_eq!(h.map(10, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.map(10, 0x4000, 0x7fff, 0x9000, 1), Some(Status::Ok));
    h
}

fn fresh() -> Harness {
    let mut h = Harness::new(IommuConfig::default());
    for ep in [1, 2, 3] {
        h.dev.add_endpoint(ep).unwrap();
    }
    h
}

#[test]
fn snapshot_round_trips_through_serde_and_restores_translation() {
    let h = populated();
    let state = h.dev.snapshot().unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let back: IommuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let mut g = fresh();
    g.dev.restore(&back).unwrap();
    assert_eq!(g.dev.snapshot().unwrap(), state);
    let ep = g.dev.endpoint(2).unwrap();
    assert_eq!(
        ep.translate(0x4100, 8, Permissions::Read)
            .unwrap()
            .as_slice()[0]
            .gpa,
        0x9100
    );
    assert!(
        ep.translate(0x4100, 8, Permissions::Write).is_err(),
        "flags restored"
    );
    assert!(g.dev.endpoint(3).unwrap().is_bypassed());
    // The restored device keeps working.
    assert_eq!(g.unmap(10, 0x1000, 0x1fff), Some(Status::Ok));
    assert_eq!(g.dev.address_space().mapping_count(), 1);
}

fn expect_rejected(mutate: impl FnOnce(&mut IommuState), what: &str) {
    let mut state = populated().dev.snapshot().unwrap();
    mutate(&mut state);
    let mut g = fresh();
    let err = g.dev.restore(&state).expect_err(what);
    // Nothing changed on failure.
    assert_eq!(g.dev.address_space().domain_count(), 0, "{what}: {err}");
}

#[test]
fn restore_rejects_invalid_state() {
    expect_rejected(|s| s.version = 99, "version");
    expect_rejected(|s| s.config.page_size_mask = 0x2000, "config mismatch");
    expect_rejected(|s| s.acked_features |= 1 << 3, "unoffered feature");
    expect_rejected(
        |s| s.endpoints.push(s.endpoints[0].clone()),
        "duplicate endpoint",
    );
    expect_rejected(|s| s.endpoints[0].id = 0x77, "unknown endpoint");
    expect_rejected(
        |s| s.endpoints[0].domain = Some(99),
        "attached to missing domain",
    );
    expect_rejected(|s| s.domains[0].id = 0x1_0000, "domain outside range");
    expect_rejected(
        |s| s.domains.push(s.domains[0].clone()),
        "domain listed twice",
    );
    expect_rejected(
        |s| {
            for e in &mut s.endpoints {
                e.domain = None;
            }
        },
        "domain without endpoints",
    );
    let bad_mapping = |m: Mapping| {
        move |s: &mut IommuState| {
            let d = s.domains.iter_mut().find(|d| d.id == 10).unwrap();
            d.mappings.push(m);
        }
    };
    let m = |iova, end, gpa, flags| Mapping {
        iova,
        iova_end: end,
        gpa,
        flags: MapFlags::from_bits(flags).unwrap(),
    };
    expect_rejected(bad_mapping(m(0x1800, 0x2fff, 0, RW)), "overlap");
    expect_rejected(bad_mapping(m(0x10_0001, 0x10_0fff, 0, RW)), "unaligned");
    expect_rejected(bad_mapping(m(0x20_0000, 0x10_0fff, 0, RW)), "empty");
    expect_rejected(bad_mapping(m(0xfee0_0000, 0xfee0_0fff, 0, RW)), "reserved");
    expect_rejected(
        bad_mapping(m(0x20_0000, 0x20_1fff, u64::MAX - 0xfff, RW)),
        "gpa overflow",
    );
    expect_rejected(
        |s| {
            let d = s.domains.iter_mut().find(|d| d.id == 11).unwrap();
            d.mappings.push(Mapping {
                iova: 0,
                iova_end: 0xfff,
                gpa: 0,
                flags: MapFlags::READ,
            });
        },
        "bypass domain with mappings",
    );
    expect_rejected(
        |s| {
            let d = s.domains.iter_mut().find(|d| d.id == 10).unwrap();
            for i in 0..(1 << 20) {
                d.mappings.push(Mapping {
                    iova: 0x1_0000_0000 + i * 0x1000,
                    iova_end: 0x1_0000_0fff + i * 0x1000,
                    gpa: 0,
                    flags: MapFlags::READ,
                });
            }
        },
        "too many mappings",
    );
}

#[test]
fn snapshot_is_refused_while_a_request_is_draining() {
    let mut h = populated();
    let pin = h
        .dev
        .endpoint(1)
        .unwrap()
        .pin(0x1000, 8, Permissions::Read)
        .unwrap();
    h.req_driver
        .add(
            &h.mem,
            &[
                virtio_iommu::testing::Buf {
                    addr: vm_memory::GuestAddress(0x20_0000),
                    len: 28,
                    write: false,
                },
                virtio_iommu::testing::Buf {
                    addr: vm_memory::GuestAddress(0x20_1000),
                    len: 4,
                    write: true,
                },
            ],
        )
        .unwrap();
    let mut req = vec![4u8, 0, 0, 0];
    req.extend_from_slice(&virtio_iommu::testing::unmap_body(10, 0x1000, 0x1fff));
    vm_memory::Bytes::write_slice(&h.mem, &req, vm_memory::GuestAddress(0x20_0000)).unwrap();
    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
    assert_eq!(h.dev.snapshot().unwrap_err(), StateError::Busy);
    drop(pin);
    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
    assert!(h.dev.snapshot().is_ok());
}

fn with_mapper() -> (Harness, Arc<RecordingMapper>) {
    let mut h = Harness::new(IommuConfig::default());
    let mapper = Arc::new(RecordingMapper::default());
    h.dev
        .add_endpoint_with(
            1,
            EndpointOptions {
                mapper: Some(mapper.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    h.dev.add_endpoint(2).unwrap();
    (h, mapper)
}

#[test]
fn map_and_unmap_are_propagated_to_external_mappers() {
    let (mut h, mapper) = with_mapper();
    assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x8000, RW), Some(Status::Ok));
    assert_eq!(
        *mapper.mapped.lock().unwrap(),
        vec![(0x1000, 0x8000, 0x2000)]
    );
    assert_eq!(
        h.dev.address_space().domain_mappings(1),
        Some(vec![(0x1000, 0x2000)])
    );
    assert_eq!(h.unmap(1, 0, 0xffff), Some(Status::Ok));
    assert!(mapper.mapped.lock().unwrap().is_empty());
    assert_eq!(h.dev.address_space().domain_mappings(1), Some(vec![]));
    assert_eq!(h.dev.address_space().domain_mappings(9), None);
}

#[test]
fn mapper_failure_rolls_map_back_and_returns_deverr() {
    let (mut h, mapper) = with_mapper();
    assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
    mapper.fail.store(true, Ordering::SeqCst);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x8000, RW), Some(Status::DevErr));
    assert_eq!(h.dev.address_space().mapping_count(), 0);
    assert_eq!(h.dev.metrics().snapshot().mapper_errors, 1);
    mapper.fail.store(false, Ordering::SeqCst);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x8000, RW), Some(Status::Ok));
}

#[test]
fn attach_maps_existing_mappings_and_detach_unmaps_them() {
    let (mut h, mapper) = with_mapper();
    assert_eq!(h.attach(1, 2, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x8000, RW), Some(Status::Ok));
    assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
    assert_eq!(mapper.mapped.lock().unwrap().len(), 1);
    assert_eq!(h.detach(1, 1), Some(Status::Ok));
    assert!(mapper.mapped.lock().unwrap().is_empty());
    // A failing mapper on ATTACH leaves the endpoint unattached.
    mapper.fail.store(true, Ordering::SeqCst);
    assert_eq!(h.attach(1, 1, 0), Some(Status::DevErr));
    assert_eq!(h.dev.address_space().attached_domain(1), None);
    // Mapper endpoints cannot join bypass domains.
    assert_eq!(h.attach(5, 1, 1), Some(Status::Unsupp));
}
