//! One test per device-normative statement of the virtio-iommu section of
//! the virtio specification (1.3), driven through a real split virtqueue.

use virtio_iommu::config::{ReservedKind, ReservedRegion};
use virtio_iommu::protocol::{features::*, req_type, CONFIG_BYPASS_OFFSET};
use virtio_iommu::testing::{attach_body, map_body, Harness};
use virtio_iommu::{IommuConfig, Limits, Status};
use vm_memory::Permissions;

const RW: u32 = 3;
const EP: u32 = 8;

fn harness() -> Harness {
    let mut h = Harness::new(IommuConfig::default());
    h.dev.add_endpoint(EP).unwrap();
    h.dev.add_endpoint(EP + 1).unwrap();
    h
}

fn attached() -> Harness {
    let mut h = harness();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    h
}

// --- Feature bits ---------------------------------------------------------

#[test]
fn device_should_offer_map_unmap() {
    let h = harness();
    assert_ne!(h.dev.device_features() & (1 << VIRTIO_IOMMU_F_MAP_UNMAP), 0);
    assert_ne!(h.dev.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
}

#[test]
fn device_should_not_offer_deprecated_bypass_with_bypass_config() {
    let f = harness().dev.device_features();
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS), 0);
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    for bit in [
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_MMIO,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
}

// --- Configuration layout ---------------------------------------------------

#[test]
fn device_must_set_at_least_one_bit_in_page_size_mask() {
    let h = harness();
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1000);
    assert!(Harness::new(IommuConfig::default())
        .dev
        .config()
        .validate()
        .is_ok());
    assert!(virtio_iommu::VirtioIommu::new(IommuConfig {
        page_size_mask: 0,
        ..Default::default()
    })
    .is_err());
}

#[test]
fn config_reports_input_range_domain_range_and_probe_size() {
    let h = Harness::new(IommuConfig {
        address_width_bits: 39,
        domain_start: 1,
        domain_end: 100,
        probe_size: 256,
        ..Default::default()
    });
    let mut b = [0u8; 40];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0);
    assert_eq!(
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
        (1 << 39) - 1
    );
    assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 100);
    assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 256);
    assert_eq!(b[36], 0);
}

#[test]
fn device_must_not_present_bypass_other_than_0_or_1() {
    let mut h = harness();
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[2]);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0xff]);
    let mut b = [0u8; 1];
    h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 0);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 1);
}

#[test]
fn bypass_is_writable_only_with_bypass_config_negotiated() {
    let mut h = harness();
    h.dev
        .ack_features(h.dev.device_features() & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    let mut b = [0u8; 1];
    h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 0);
}

#[test]
fn other_config_fields_are_read_only() {
    let mut h = harness();
    h.dev.write_config(0, &[0xff; 8]);
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1000);
}

#[test]
fn bypass_should_not_change_on_device_reset_but_restores_on_system_reset() {
    let mut h = Harness::new(IommuConfig {
        bypass: true,
        ..Default::default()
    });
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    h.dev.reset();
    let mut b = [0u8; 1];
    h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 0);
    h.dev.system_reset();
    h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 1);
}

// --- Device initialization ---------------------------------------------------

#[test]
fn when_the_device_is_reset_endpoints_are_not_attached() {
    let mut h = attached();
    assert_eq!(h.map(1, 0, 0xfff, 0x1000, RW), Some(Status::Ok));
    h.dev.reset();
    assert_eq!(h.dev.address_space().attached_domain(EP), None);
    assert_eq!(h.dev.address_space().domain_count(), 0);
    assert!(!h.dev.endpoint(EP).unwrap().is_translating());
}

// --- Device operations ---------------------------------------------------------

#[test]
fn device_should_set_status_ok_on_success() {
    let mut h = harness();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x2000, RW), Some(Status::Ok));
}

#[test]
fn unrecognized_type_is_not_written_and_used_length_is_zero() {
    let mut h = harness();
    for t in [0u8, 6, 7, 0x80, 0xff] {
        let r = h.request(&[t, 0, 0, 0, 1, 2, 3, 4], 4);
        assert_eq!(r.used_len, 0, "type {t}");
        assert_eq!(r.written, vec![0xee; 4], "type {t}");
    }
    // The device keeps serving.
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
}

#[test]
fn device_must_ignore_reserved_of_head_and_zero_reserved_of_tail() {
    let mut h = harness();
    let mut r = vec![req_type::ATTACH, 0xaa, 0xbb, 0xcc];
    r.extend_from_slice(&attach_body(1, EP, 0));
    let reply = h.request(&r, 4);
    assert_eq!(reply.used_len, 4);
    assert_eq!(reply.written, vec![0, 0, 0, 0]);
}

#[test]
fn unattached_endpoints_not_in_bypass_cannot_access_memory() {
    let h = harness();
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.translate(0x1000, 8, Permissions::Read).is_err());
    assert!(ep.pin(0x1000, 8, Permissions::Write).is_err());
}

#[test]
fn unattached_endpoints_with_bypass_one_see_identity_even_without_negotiation() {
    let mut h = Harness::new(IommuConfig {
        bypass: true,
        ..Default::default()
    });
    h.dev
        .ack_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    let ep = h.dev.add_endpoint(EP).unwrap();
    let r = ep.translate(0x1234, 8, Permissions::Write).unwrap();
    assert_eq!(r.as_slice()[0].gpa, 0x1234);
}

// --- ATTACH --------------------------------------------------------------------

fn attach_raw(
    h: &mut Harness,
    domain: u32,
    ep: u32,
    flags: u32,
    reserved: [u8; 4],
) -> Option<Status> {
    let mut b = Vec::new();
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&ep.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&reserved);
    h.simple(req_type::ATTACH, &b)
}

#[test]
fn attach_with_reserved_nonzero_must_be_inval() {
    let mut h = harness();
    assert_eq!(
        attach_raw(&mut h, 1, EP, 0, [0, 0, 1, 0]),
        Some(Status::Inval)
    );
    assert_eq!(h.dev.address_space().attached_domain(EP), None);
}

#[test]
fn attach_with_unrecognized_flag_must_be_inval() {
    let mut h = harness();
    assert_eq!(attach_raw(&mut h, 1, EP, 2, [0; 4]), Some(Status::Inval));
    // ATTACH_F_BYPASS is unknown unless BYPASS_CONFIG was negotiated.
    h.dev
        .ack_features(h.dev.device_features() & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(attach_raw(&mut h, 1, EP, 1, [0; 4]), Some(Status::Inval));
}

#[test]
fn attach_of_unknown_endpoint_must_be_noent() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0x999, 0), Some(Status::NoEnt));
}

#[test]
fn attach_of_second_endpoint_to_a_domain_is_supported() {
    let mut h = attached();
    assert_eq!(h.attach(1, EP + 1, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    for ep in [EP, EP + 1] {
        let r = h
            .dev
            .endpoint(ep)
            .unwrap()
            .translate(0x1000, 4, Permissions::Read);
        assert_eq!(r.unwrap().as_slice()[0].gpa, 0x5000);
    }
}

#[test]
fn attach_with_bypass_flag_inconsistent_with_domain_should_be_inval() {
    let mut h = attached();
    assert_eq!(h.attach(1, EP + 1, 1), Some(Status::Inval));
    assert_eq!(h.attach(2, EP + 1, 1), Some(Status::Ok));
    assert_eq!(h.attach(2, EP, 0), Some(Status::Inval));
}

#[test]
fn attach_moves_endpoint_out_of_its_previous_domain() {
    let mut h = attached();
    assert_eq!(h.attach(1, EP + 1, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.attach(2, EP, 0), Some(Status::Ok));
    assert_eq!(h.dev.address_space().attached_domain(EP), Some(2));
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.translate(0x1000, 4, Permissions::Read).is_err());
    // It behaves as DETACH then ATTACH: DETACH from 1 now fails.
    assert_eq!(h.detach(1, EP), Some(Status::Inval));
    // Domain 1 still serves the other endpoint.
    assert!(h
        .dev
        .endpoint(EP + 1)
        .unwrap()
        .translate(0x1000, 4, Permissions::Read)
        .is_ok());
}

#[test]
fn attach_move_of_last_endpoint_frees_the_old_domain() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.attach(2, EP, 0), Some(Status::Ok));
    assert_eq!(h.dev.address_space().domain_count(), 1);
    assert_eq!(h.dev.address_space().mapping_count(), 0);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::NoEnt));
}

#[test]
fn attach_bypass_domain_puts_endpoints_in_bypass_mode() {
    let mut h = harness();
    assert_eq!(h.attach(3, EP, 1), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.is_bypassed());
    assert_eq!(
        ep.translate(0xabc000, 8, Permissions::Write)
            .unwrap()
            .as_slice()[0]
            .gpa,
        0xabc000
    );
}

#[test]
fn attach_to_domain_outside_domain_range_is_range() {
    let mut h = Harness::new(IommuConfig {
        domain_start: 1,
        domain_end: 10,
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(0, EP, 0), Some(Status::Range));
    assert_eq!(h.attach(11, EP, 0), Some(Status::Range));
    assert_eq!(h.map(11, 0, 0xfff, 0, RW), Some(Status::Range));
    assert_eq!(h.unmap(11, 0, 0xfff), Some(Status::Range));
    assert_eq!(h.detach(11, EP), Some(Status::Range));
    assert_eq!(h.attach(10, EP, 0), Some(Status::Ok));
}

#[test]
fn attach_beyond_max_domains_is_nomem() {
    let mut h = Harness::new(IommuConfig {
        limits: Limits {
            max_domains: 2,
            ..Default::default()
        },
        ..Default::default()
    });
    for ep in 0..3 {
        h.dev.add_endpoint(ep).unwrap();
    }
    assert_eq!(h.attach(1, 0, 0), Some(Status::Ok));
    assert_eq!(h.attach(2, 1, 0), Some(Status::Ok));
    assert_eq!(h.attach(3, 2, 0), Some(Status::NoMem));
    // Joining an existing domain needs no new one.
    assert_eq!(h.attach(2, 2, 0), Some(Status::Ok));
}

#[test]
fn attach_to_the_same_domain_again_is_a_no_op() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.dev.address_space().mapping_count(), 1);
}

// --- DETACH --------------------------------------------------------------------

#[test]
fn detach_must_ignore_reserved() {
    let mut h = attached();
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&EP.to_le_bytes());
    b.extend_from_slice(&[0xff; 8]);
    assert_eq!(h.simple(req_type::DETACH, &b), Some(Status::Ok));
}

#[test]
fn detach_of_unknown_endpoint_must_be_noent() {
    let mut h = attached();
    assert_eq!(h.detach(1, 0x777), Some(Status::NoEnt));
}

#[test]
fn detach_of_endpoint_not_in_that_domain_is_inval() {
    let mut h = attached();
    assert_eq!(h.detach(2, EP), Some(Status::Inval));
    assert_eq!(h.detach(1, EP + 1), Some(Status::Inval));
    assert_eq!(h.dev.address_space().attached_domain(EP), Some(1));
}

#[test]
fn after_detach_the_endpoint_cannot_access_the_domain() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.translate(0x1000, 4, Permissions::Read).is_ok());
    assert_eq!(h.detach(1, EP), Some(Status::Ok));
    assert!(ep.translate(0x1000, 4, Permissions::Read).is_err());
    // The last endpoint left: the domain and its mappings are gone.
    assert_eq!(h.dev.address_space().domain_count(), 0);
    assert_eq!(h.dev.address_space().mapping_count(), 0);
}

#[test]
fn after_detach_with_bypass_the_endpoint_is_in_bypass_mode() {
    let mut h = attached();
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert!(!h.dev.endpoint(EP).unwrap().is_bypassed());
    assert_eq!(h.detach(1, EP), Some(Status::Ok));
    assert!(h.dev.endpoint(EP).unwrap().is_bypassed());
}

// --- MAP -------------------------------------------------------------------------

#[test]
fn map_not_aligned_on_the_page_granule_should_be_range() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1001, 0x1fff, 0x5000, RW), Some(Status::Range));
    assert_eq!(h.map(1, 0x1000, 0x1ffe, 0x5000, RW), Some(Status::Range));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5800, RW), Some(Status::Range));
    assert_eq!(h.dev.address_space().mapping_count(), 0);
}

#[test]
fn map_granule_follows_page_size_mask() {
    let mut h = Harness::new(IommuConfig {
        page_size_mask: 0x20_0000 | 0x1_0000,
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x1000, RW), Some(Status::Range));
    assert_eq!(h.map(1, 0x1_0000, 0x1_ffff, 0x1_0000, RW), Some(Status::Ok));
}

#[test]
fn map_outside_input_range_is_range() {
    let mut h = Harness::new(IommuConfig {
        address_width_bits: 32,
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(
        h.map(1, 0xffff_f000, 0x1_0000_0fff, 0, RW),
        Some(Status::Range)
    );
    assert_eq!(h.map(1, 0xffff_f000, 0xffff_ffff, 0, RW), Some(Status::Ok));
}

#[test]
fn map_with_phys_end_overflowing_is_range() {
    let mut h = attached();
    assert_eq!(
        h.map(1, 0x1000, 0x2fff, 0xffff_ffff_ffff_f000, RW),
        Some(Status::Range)
    );
}

#[test]
fn map_with_virt_end_below_virt_start_is_inval() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x2000, 0xfff, 0x2000, RW), Some(Status::Inval));
}

#[test]
fn map_over_an_existing_mapping_should_be_inval() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x2000, 0x3fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x3000, 0x4fff, 0x9000, RW), Some(Status::Inval));
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x9000, RW), Some(Status::Inval));
    assert_eq!(h.map(1, 0x4000, 0x4fff, 0x9000, RW), Some(Status::Ok));
}

#[test]
fn map_with_unrecognized_flag_must_be_inval() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, 8), Some(Status::Inval));
    assert_eq!(
        h.map(1, 0x1000, 0x1fff, 0x5000, 0x8000_0001),
        Some(Status::Inval)
    );
}

#[test]
fn map_mmio_flag_needs_the_mmio_feature() {
    let mut h = attached();
    h.dev
        .ack_features(h.dev.device_features() & !(1 << VIRTIO_IOMMU_F_MMIO));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, 4 | 2), Some(Status::Inval));
    h.dev.ack_features(h.dev.device_features());
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, 4 | 2), Some(Status::Ok));
}

#[test]
fn map_on_unknown_domain_should_be_noent() {
    let mut h = attached();
    assert_eq!(h.map(2, 0x1000, 0x1fff, 0x5000, RW), Some(Status::NoEnt));
}

#[test]
fn map_on_bypass_domain_should_be_inval() {
    let mut h = harness();
    assert_eq!(h.attach(4, EP, 1), Some(Status::Ok));
    assert_eq!(h.map(4, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Inval));
}

#[test]
fn device_must_not_allow_writes_to_a_range_mapped_without_write() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, 1), Some(Status::Ok));
    assert_eq!(h.map(1, 0x2000, 0x2fff, 0x6000, 2), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.translate(0x1000, 8, Permissions::Read).is_ok());
    assert!(ep.pin(0x1000, 8, Permissions::Write).is_err());
    assert!(ep.pin(0x2000, 8, Permissions::Write).is_ok());
    assert!(ep.pin(0x2000, 8, Permissions::Read).is_err());
    // A range spanning both needs both permissions on every piece.
    assert!(ep.pin(0x1ff0, 0x20, Permissions::Read).is_err());
}

#[test]
fn map_without_map_unmap_negotiated_is_unsupp() {
    let mut h = attached();
    h.dev.ack_features(1 << VIRTIO_F_VERSION_1);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Unsupp));
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Some(Status::Unsupp));
}

#[test]
fn device_should_reject_map_overlapping_a_resv_mem_region() {
    let mut h = attached();
    assert_eq!(
        h.map(1, 0xfee0_0000, 0xfee0_0fff, 0xfee0_0000, RW),
        Some(Status::Inval)
    );
    assert_eq!(
        h.map(1, 0xfe00_0000, 0xffff_ffff, 0x1000_0000, RW),
        Some(Status::Inval)
    );
    assert_eq!(h.map(1, 0xfed0_0000, 0xfedf_ffff, 0, RW), Some(Status::Ok));
}

#[test]
fn map_beyond_mapping_limits_is_nomem() {
    let mut h = Harness::new(IommuConfig {
        limits: Limits {
            max_mappings_per_domain: 2,
            max_mappings_total: 3,
            ..Default::default()
        },
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    h.dev.add_endpoint(EP + 1).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.attach(2, EP + 1, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x2000, 0x2fff, 0, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x3000, 0x3fff, 0, RW), Some(Status::NoMem));
    assert_eq!(h.map(2, 0x1000, 0x1fff, 0, RW), Some(Status::Ok));
    assert_eq!(h.map(2, 0x2000, 0x2fff, 0, RW), Some(Status::NoMem));
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Some(Status::Ok));
    assert_eq!(h.map(2, 0x2000, 0x2fff, 0, RW), Some(Status::Ok));
}

// --- UNMAP ---------------------------------------------------------------------

#[test]
fn unmap_examples_of_the_specification_through_the_queue() {
    // (maps, unmap, expected status, mappings left)
    type Case = (&'static [(u64, u64)], (u64, u64), Status, usize);
    let cases: [Case; 7] = [
        (&[], (0, 0x4fff), Status::Ok, 0),
        (&[(0, 0x9fff)], (0, 0x9fff), Status::Ok, 0),
        (&[(0, 0x4fff), (0x5000, 0x9fff)], (0, 0x9fff), Status::Ok, 0),
        (&[(0, 0x9fff)], (0, 0x4fff), Status::Range, 1),
        (&[(0, 0x4fff), (0x5000, 0x9fff)], (0, 0x4fff), Status::Ok, 1),
        (&[(0, 0x4fff)], (0, 0x9fff), Status::Ok, 0),
        (&[(0, 0x4fff), (0xa000, 0xefff)], (0, 0xefff), Status::Ok, 0),
    ];
    for (i, (maps, unmap, status, left)) in cases.into_iter().enumerate() {
        let mut h = attached();
        for &(s, e) in maps {
            assert_eq!(h.map(1, s, e, 0x10_0000 + s, RW), Some(Status::Ok));
        }
        assert_eq!(
            h.unmap(1, unmap.0, unmap.1),
            Some(status),
            "example {}",
            i + 1
        );
        assert_eq!(
            h.dev.address_space().mapping_count(),
            left,
            "example {}",
            i + 1
        );
    }
}

#[test]
fn unmap_that_would_split_a_mapping_should_be_range_and_remove_nothing() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x5000, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x3000, 0x3fff, 0x9000, RW), Some(Status::Ok));
    assert_eq!(h.unmap(1, 0x2000, 0x3fff), Some(Status::Range));
    assert_eq!(h.dev.address_space().mapping_count(), 2);
}

#[test]
fn unmap_with_reserved_nonzero_is_inval_and_not_performed() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0x1000u64.to_le_bytes());
    b.extend_from_slice(&0x1fffu64.to_le_bytes());
    b.extend_from_slice(&[0, 1, 0, 0]);
    assert_eq!(h.simple(req_type::UNMAP, &b), Some(Status::Inval));
    assert_eq!(h.dev.address_space().mapping_count(), 1);
}

#[test]
fn unmap_on_unknown_domain_should_be_noent() {
    let mut h = attached();
    assert_eq!(h.unmap(7, 0, 0xfff), Some(Status::NoEnt));
}

#[test]
fn unmap_on_bypass_domain_should_be_inval() {
    let mut h = harness();
    assert_eq!(h.attach(4, EP, 1), Some(Status::Ok));
    assert_eq!(h.unmap(4, 0, 0xfff), Some(Status::Inval));
}

#[test]
fn after_unmap_the_range_is_not_translatable() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Some(Status::Ok));
    assert!(ep.translate(0x1000, 1, Permissions::Read).is_err());
}

// --- PROBE -----------------------------------------------------------------------

fn probe(h: &mut Harness, ep: u32, writable: u32) -> virtio_iommu::testing::Reply {
    let mut r = vec![req_type::PROBE, 0, 0, 0];
    r.extend_from_slice(&ep.to_le_bytes());
    r.extend_from_slice(&[0xaa; 64]);
    h.request(&r, writable)
}

#[test]
fn probe_of_unknown_endpoint_should_be_noent() {
    let mut h = harness();
    let r = probe(&mut h, 0x4242, 512 + 4);
    assert_eq!(r.status, Some(Status::NoEnt));
}

#[test]
fn probe_reports_msi_region_fills_the_rest_with_zeroes_and_ignores_reserved() {
    let mut h = harness();
    let r = probe(&mut h, EP, 512 + 4);
    assert_eq!(r.used_len, 516);
    assert_eq!(r.status, Some(Status::Ok));
    let p = &r.written;
    assert_eq!(
        u16::from_le_bytes([p[0], p[1]]),
        1,
        "RESV_MEM type, reserved bits zero"
    );
    assert_eq!(
        u16::from_le_bytes([p[2], p[3]]),
        20,
        "length without the header"
    );
    assert_eq!(p[4], 1, "MSI subtype");
    assert_eq!(&p[5..8], &[0, 0, 0]);
    assert_eq!(
        u64::from_le_bytes(p[8..16].try_into().unwrap()),
        0xfee0_0000
    );
    assert_eq!(
        u64::from_le_bytes(p[16..24].try_into().unwrap()),
        0xfeef_ffff
    );
    assert!(p[24..512].iter().all(|&b| b == 0), "remaining bytes zeroed");
    assert_eq!(&p[513..516], &[0, 0, 0]);
}

#[test]
fn probe_places_properties_length_plus_four_apart() {
    let mut h = Harness::new(IommuConfig::default());
    h.dev
        .add_endpoint_with(
            EP,
            virtio_iommu::EndpointOptions {
                reserved_regions: vec![ReservedRegion {
                    start: 0,
                    end: 0xfff,
                    kind: ReservedKind::Reserved,
                }],
                ..Default::default()
            },
        )
        .unwrap();
    let r = probe(&mut h, EP, 516);
    let p = &r.written;
    let len0 = u16::from_le_bytes([p[2], p[3]]) as usize;
    let second = len0 + 4;
    assert_eq!(u16::from_le_bytes([p[second], p[second + 1]]), 1);
    assert_eq!(p[second + 4], 0, "RESERVED subtype");
    // MAP over the endpoint's own reserved region is refused too.
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0, 0xfff, 0, RW), Some(Status::Inval));
}

#[test]
fn probe_with_properties_smaller_than_probe_size_should_be_inval_without_properties() {
    let mut h = harness();
    let r = probe(&mut h, EP, 100);
    assert_eq!(r.used_len, 100);
    assert_eq!(r.status, Some(Status::Inval));
    assert!(
        r.written[..96].iter().all(|&b| b == 0),
        "no property written"
    );
}

#[test]
fn probe_not_offered_is_not_written_and_used_length_is_zero() {
    let mut h = Harness::new(IommuConfig {
        offer_probe: false,
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.dev.device_features() & (1 << VIRTIO_IOMMU_F_PROBE), 0);
    let r = probe(&mut h, EP, 516);
    assert_eq!(r.used_len, 0);
    assert!(r.written.iter().all(|&b| b == 0xee));
}

// --- Malformed chains --------------------------------------------------------------

#[test]
fn request_without_room_for_a_tail_is_returned_unwritten() {
    let mut h = harness();
    let r = h.request(&[req_type::ATTACH, 0, 0, 0, 1, 0, 0, 0], 3);
    assert_eq!(r.used_len, 0);
    assert_eq!(r.written, vec![0xee; 3]);
    let r = h.request(&[req_type::ATTACH, 0, 0, 0], 0);
    assert_eq!(r.used_len, 0);
}

#[test]
fn request_too_short_for_its_type_is_inval() {
    let mut h = harness();
    for t in [
        req_type::ATTACH,
        req_type::DETACH,
        req_type::MAP,
        req_type::UNMAP,
    ] {
        assert_eq!(h.simple(t, &[1, 0, 0]), Some(Status::Inval), "type {t}");
    }
    assert_eq!(h.request(&[], 4).status, Some(Status::Inval));
    assert_eq!(h.request(&[1, 0], 4).status, Some(Status::Inval));
}

#[test]
fn readable_descriptor_after_writable_is_malformed() {
    use virtio_iommu::testing::{Buf, BUF_BASE};
    use vm_memory::{Bytes, GuestAddress};
    let mut h = attached();
    let mut req = vec![req_type::MAP, 0, 0, 0];
    req.extend_from_slice(&map_body(1, 0x1000, 0x1fff, 0, RW));
    h.mem.write_slice(&req, GuestAddress(BUF_BASE)).unwrap();
    let bufs = [
        Buf {
            addr: GuestAddress(BUF_BASE),
            len: 4,
            write: false,
        },
        Buf {
            addr: GuestAddress(BUF_BASE + 0x1000),
            len: 4,
            write: true,
        },
        Buf {
            addr: GuestAddress(BUF_BASE + 4),
            len: 32,
            write: false,
        },
    ];
    let (_, len) = h.submit(&bufs).unwrap();
    assert_eq!(len, 0);
    assert_eq!(h.dev.address_space().mapping_count(), 0);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Some(Status::Ok));
}

#[test]
fn request_split_over_many_small_descriptors_is_parsed() {
    use virtio_iommu::testing::{Buf, BUF_BASE};
    use vm_memory::{Bytes, GuestAddress};
    let mut h = attached();
    let mut req = vec![req_type::MAP, 0, 0, 0];
    req.extend_from_slice(&map_body(1, 0x1000, 0x1fff, 0x3000, RW));
    h.mem.write_slice(&req, GuestAddress(BUF_BASE)).unwrap();
    let mut bufs: Vec<Buf> = (0..req.len() as u64)
        .map(|i| Buf {
            addr: GuestAddress(BUF_BASE + i),
            len: 1,
            write: false,
        })
        .collect();
    bufs.push(Buf {
        addr: GuestAddress(BUF_BASE + 0x1000),
        len: 2,
        write: true,
    });
    bufs.push(Buf {
        addr: GuestAddress(BUF_BASE + 0x2000),
        len: 2,
        write: true,
    });
    h.mem
        .write_slice(&[0xee; 2], GuestAddress(BUF_BASE + 0x1000))
        .unwrap();
    let (_, len) = h.submit(&bufs).unwrap();
    assert_eq!(len, 4);
    let mut b = [0xffu8; 2];
    h.mem
        .read_slice(&mut b, GuestAddress(BUF_BASE + 0x1000))
        .unwrap();
    assert_eq!(b[0], Status::Ok as u8);
    assert_eq!(h.dev.address_space().mapping_count(), 1);
}

#[test]
fn huge_descriptor_lengths_are_not_trusted() {
    use virtio_iommu::testing::{Buf, BUF_BASE};
    use vm_memory::GuestAddress;
    let mut h = attached();
    // Lengths far beyond guest memory: reading or writing them fails
    // without the device allocating anything of that size.
    let bufs = [
        Buf {
            addr: GuestAddress(BUF_BASE),
            len: u32::MAX,
            write: false,
        },
        Buf {
            addr: GuestAddress(BUF_BASE + 0x1000),
            len: u32::MAX,
            write: true,
        },
    ];
    let (_, len) = h.submit(&bufs).unwrap();
    assert_eq!(len, 0);
    assert_eq!(h.attach(2, EP + 1, 0), Some(Status::Ok));
}

// --- Fault reporting -------------------------------------------------------------

#[test]
fn translation_faults_are_reported_on_the_event_queue() {
    use virtio_iommu::testing::Buf;
    use vm_memory::{Bytes, GuestAddress};
    let mut h = attached();
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.pin(0x7000, 16, Permissions::Write).is_err());
    let un = h.dev.endpoint(EP + 1).unwrap();
    assert!(un.translate(0x1000, 1, Permissions::Read).is_err());
    assert_eq!(h.dev.pending_faults(), 2);
    for i in 0..2u64 {
        h.ev_driver
            .add(
                &h.mem,
                &[Buf {
                    addr: GuestAddress(0x20_0000 + i * 64),
                    len: 24,
                    write: true,
                }],
            )
            .unwrap();
    }
    assert!(h.dev.process_events(&mut h.evq, &h.mem).unwrap());
    let (_, len) = h.ev_driver.pop_used(&h.mem).unwrap();
    assert_eq!(len, 24);
    let mut rec = [0u8; 24];
    h.mem.read_slice(&mut rec, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(rec[0], 2, "R_MAPPING");
    assert_eq!(&rec[1..4], &[0, 0, 0]);
    assert_eq!(
        u32::from_le_bytes(rec[4..8].try_into().unwrap()),
        2 | 0x100,
        "WRITE|ADDRESS"
    );
    assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), EP);
    assert_eq!(u32::from_le_bytes(rec[12..16].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(rec[16..24].try_into().unwrap()), 0x7000);
    h.ev_driver.pop_used(&h.mem).unwrap();
    h.mem.read_slice(&mut rec, GuestAddress(0x20_0040)).unwrap();
    assert_eq!(rec[0], 1, "R_DOMAIN");
    assert_eq!(u32::from_le_bytes(rec[4..8].try_into().unwrap()), 1, "READ");
    assert_eq!(h.dev.metrics().snapshot().faults_delivered, 2);
}

#[test]
fn fault_queue_is_bounded_and_drops_are_counted() {
    let mut h = Harness::new(IommuConfig {
        limits: Limits {
            max_pending_faults: 4,
            ..Default::default()
        },
        ..Default::default()
    });
    let ep = h.dev.add_endpoint(EP).unwrap();
    for _ in 0..100 {
        assert!(ep.translate(0, 1, Permissions::Read).is_err());
    }
    assert_eq!(h.dev.pending_faults(), 4);
    assert_eq!(h.dev.metrics().snapshot().faults_dropped, 96);
    // No event buffers: delivering does nothing and keeps the faults.
    assert!(!h.dev.process_events(&mut h.evq, &h.mem).unwrap());
    assert_eq!(h.dev.pending_faults(), 4);
}

// --- Metrics -------------------------------------------------------------------------

#[test]
fn metrics_count_requests_by_type_and_status() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Some(Status::Inval));
    let m = h.dev.metrics();
    assert_eq!(m.requests(req_type::ATTACH, Status::Ok), 1);
    assert_eq!(m.requests(req_type::MAP, Status::Ok), 1);
    assert_eq!(m.requests(req_type::MAP, Status::Inval), 1);
}

#[test]
fn fault_report_is_not_split_over_buffers_too_small_for_it() {
    use virtio_iommu::testing::Buf;
    use vm_memory::GuestAddress;
    let mut h = attached();
    let ep = h.dev.endpoint(EP).unwrap();
    assert!(ep.translate(0x7000, 1, Permissions::Read).is_err());
    h.ev_driver
        .add(
            &h.mem,
            &[Buf {
                addr: GuestAddress(0x20_0000),
                len: 16,
                write: true,
            }],
        )
        .unwrap();
    assert!(h.dev.process_events(&mut h.evq, &h.mem).unwrap());
    assert_eq!(
        h.ev_driver.pop_used(&h.mem).unwrap().1,
        0,
        "returned unwritten"
    );
    assert_eq!(h.dev.pending_faults(), 1, "kept for a buffer that fits");
    h.ev_driver
        .add(
            &h.mem,
            &[Buf {
                addr: GuestAddress(0x20_0000),
                len: 64,
                write: true,
            }],
        )
        .unwrap();
    assert!(h.dev.process_events(&mut h.evq, &h.mem).unwrap());
    assert_eq!(h.ev_driver.pop_used(&h.mem).unwrap().1, 24);
}

#[test]
fn device_should_not_present_overlapping_resv_mem_properties() {
    let mut h = Harness::new(IommuConfig::default());
    let overlapping = ReservedRegion {
        start: 0xfef0_0000,
        end: 0xfef0_ffff,
        kind: ReservedKind::Reserved,
    };
    assert!(h
        .dev
        .add_endpoint_with(
            EP,
            virtio_iommu::EndpointOptions {
                reserved_regions: vec![
                    overlapping,
                    ReservedRegion {
                        start: 0xfeef_0000,
                        ..overlapping
                    }
                ],
                ..Default::default()
            },
        )
        .is_err());
    let msi_twice = ReservedRegion {
        start: 0x1000,
        end: 0x1fff,
        kind: ReservedKind::Msi,
    };
    assert!(
        h.dev
            .add_endpoint_with(
                EP,
                virtio_iommu::EndpointOptions {
                    reserved_regions: vec![msi_twice],
                    ..Default::default()
                },
            )
            .is_err(),
        "a second MSI region for the endpoint"
    );
}
