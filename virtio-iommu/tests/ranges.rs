//! Guest-chosen (address, length) pairs at the top of the 64-bit space, at
//! every public translation entry: `EndpointHandle::{translate, pin}`,
//! `vm_memory::Iommu` (and so `IommuMemory`), queue-area leases and
//! `QueueMemory`, and descriptor chains on the request queue. A range that
//! wraps, or that an entry cannot represent, is a translation fault (a
//! fault record and an error), never a panic and never a 0-byte success;
//! a range that fits is translated in full.

use std::sync::Arc;

use virtio_iommu::testing::{Buf, Harness};
use virtio_iommu::{AreaSpec, EndpointHandle, IommuConfig, Status, TranslateError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory, Permissions};

const ADDRS: [u64; 2] = [u64::MAX, u64::MAX - 15];
const LENS: [u64; 4] = [1, 16, 256, u64::MAX];
const TOP_PAGE: u64 = u64::MAX - 0xfff;

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Unattached, bypass off.
    Blocked,
    /// Attached to a domain that maps the top page.
    Attached,
    /// Unattached with the global bypass on.
    GlobalBypass,
    /// Attached to an ATTACH_F_BYPASS domain.
    BypassDomain,
}

const KINDS: [Kind; 4] = [
    Kind::Blocked,
    Kind::Attached,
    Kind::GlobalBypass,
    Kind::BypassDomain,
];

fn setup(kind: Kind) -> (Harness, EndpointHandle) {
    let mut h = Harness::new(IommuConfig {
        bypass: matches!(kind, Kind::GlobalBypass),
        ..Default::default()
    });
    let ep = h.dev.add_endpoint(1).unwrap();
    match kind {
        Kind::Blocked | Kind::GlobalBypass => {}
        Kind::Attached => {
            assert_eq!(h.attach(1, 1, 0), Some(Status::Ok));
            assert_eq!(h.map(1, TOP_PAGE, u64::MAX, 0x20_0000, 3), Some(Status::Ok));
        }
        Kind::BypassDomain => assert_eq!(h.attach(1, 1, 1), Some(Status::Ok)),
    }
    (h, ep)
}

/// The range's last byte, if it does not wrap.
fn last(addr: u64, len: u64) -> Option<u64> {
    addr.checked_add(len - 1)
}

fn faults(h: &Harness) -> u64 {
    let m = h.dev.metrics().snapshot();
    m.faults_reported + m.faults_dropped
}

#[test]
fn endpoint_translate_and_pin_translate_what_fits_and_fault_the_rest() {
    for kind in KINDS {
        for addr in ADDRS {
            for len in LENS {
                let (h, ep) = setup(kind);
                let fits = last(addr, len).is_some() && !matches!(kind, Kind::Blocked);
                let what = format!("{kind:?} {addr:#x}+{len:#x}");
                let before = faults(&h);
                match ep.translate(addr, len, Permissions::Read) {
                    Ok(r) => {
                        assert!(fits, "{what}: translated a range that does not fit");
                        let total: u64 = r.as_slice().iter().map(|r| r.len).sum();
                        assert_eq!(total, len, "{what}: translated in full");
                    }
                    Err(e) => {
                        assert!(!fits, "{what}: {e}");
                        assert!(faults(&h) > before, "{what}: no fault for {e}");
                    }
                }
                let before = faults(&h);
                match ep.pin(addr, len, Permissions::Read) {
                    Ok(p) => {
                        assert!(fits, "{what}: pinned a range that does not fit");
                        assert_eq!(p.len(), len);
                    }
                    Err(e) => {
                        assert!(!fits, "{what}: {e}");
                        assert!(faults(&h) > before, "{what}: no fault for {e}");
                    }
                }
                assert_eq!(ep.pins_in_flight(), 0, "{what}");
            }
        }
    }
}

#[test]
fn vm_memory_iommu_refuses_wrapping_ranges_with_a_fault() {
    // The IOTLB behind `vm_memory::Iommu` holds end-exclusive u64 ranges:
    // a range must end below the last byte of the space. Everything else
    // that reaches the top is refused with a fault; nothing panics, and
    // nothing succeeds with fewer bytes than asked for.
    for kind in KINDS {
        for addr in ADDRS {
            for len in LENS {
                let (h, ep) = setup(kind);
                let what = format!("{kind:?} {addr:#x}+{len:#x}");
                let Ok(length) = usize::try_from(len) else {
                    continue;
                };
                let fits =
                    last(addr, len).is_some_and(|l| l < u64::MAX) && !matches!(kind, Kind::Blocked);
                let before = faults(&h);
                let got =
                    vm_memory::Iommu::translate(&ep, GuestAddress(addr), length, Permissions::Read)
                        .map(|it| it.map(|r| r.length).sum::<usize>());
                match got {
                    Ok(total) => {
                        assert!(fits, "{what}: translated a range that does not fit");
                        assert_eq!(total, length, "{what}: translated in full");
                    }
                    Err(e) => {
                        assert!(!fits, "{what}: {e}");
                        assert!(faults(&h) > before, "{what}: no fault for {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn iommu_memory_accesses_at_the_top_fail_cleanly() {
    for kind in KINDS {
        let (h, ep) = setup(kind);
        let mem: IommuMemory<GuestMemoryMmap, _> = IommuMemory::new(h.mem.clone(), ep, true, ());
        let mut buf = [0u8; 256];
        for addr in ADDRS {
            assert!(
                mem.read_slice(&mut buf, GuestAddress(addr)).is_err(),
                "{kind:?}"
            );
            assert!(
                mem.write_slice(&buf[..16], GuestAddress(addr)).is_err(),
                "{kind:?}"
            );
        }
        assert!(mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
    }
}

#[test]
fn queue_area_leases_translate_what_fits_and_fault_the_rest() {
    for kind in KINDS {
        for addr in ADDRS {
            for len in LENS {
                let (h, ep) = setup(kind);
                let what = format!("{kind:?} {addr:#x}+{len:#x}");
                let fits = last(addr, len).is_some() && !matches!(kind, Kind::Blocked);
                let spec = [AreaSpec {
                    iova: addr,
                    len,
                    access: Permissions::Read,
                }];
                let before = faults(&h);
                match ep.lease_queue_areas(&spec, Arc::new(|| {})) {
                    Ok(a) => {
                        assert!(fits, "{what}: leased a range that does not fit");
                        let total: u64 = a.areas().flat_map(|(_, g)| g).map(|r| r.len).sum();
                        assert_eq!(total, len);
                    }
                    Err(e) => {
                        assert!(!fits, "{what}: {e}");
                        assert!(faults(&h) > before, "{what}: no fault for {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn queue_memory_accesses_at_the_top_fail_cleanly() {
    for kind in [Kind::Attached, Kind::GlobalBypass, Kind::BypassDomain] {
        let (h, ep) = setup(kind);
        // A lease over a low area (identity or unmapped: lease what works).
        let area = [AreaSpec {
            iova: TOP_PAGE,
            len: 0x800,
            access: Permissions::Read,
        }];
        let areas = ep.lease_queue_areas(&area, Arc::new(|| {})).unwrap();
        let phys = h.mem.clone();
        let mem = areas.memory(&phys).unwrap();
        let mut buf = [0u8; 256];
        for addr in ADDRS {
            // Inside the lease (attached: GPA 0x200000 + ..., in RAM) or
            // not; for the bypass kinds the identity GPA is outside RAM.
            // A 256-byte read from there reaches past the area either way:
            // an error, no panic.
            assert!(
                mem.read_slice(&mut buf, GuestAddress(addr)).is_err(),
                "{kind:?}"
            );
        }
        // Wrapping reads are translation faults.
        let before = faults(&h);
        assert!(mem
            .read_slice(&mut buf, GuestAddress(u64::MAX - 15))
            .is_err());
        assert!(faults(&h) > before, "{kind:?}: wrapping read not reported");
    }
}

#[test]
fn request_queue_chains_with_descriptors_at_the_top_are_refused_and_the_device_keeps_serving() {
    let mut h = Harness::new(IommuConfig::default());
    h.dev.add_endpoint(1).unwrap();
    for addr in ADDRS {
        for len in [1u32, 16, 256, u32::MAX] {
            let bufs = [
                Buf {
                    addr: GuestAddress(addr),
                    len,
                    write: false,
                },
                Buf {
                    addr: GuestAddress(addr),
                    len,
                    write: true,
                },
            ];
            let (_, used) = h.submit(&bufs).expect("never parks");
            assert_eq!(used, 0, "{addr:#x}+{len:#x}: nothing written");
        }
    }
    assert_eq!(h.attach(1, 1, 0), Some(Status::Ok), "still serving");
    assert!(h.dev.metrics().snapshot().malformed >= 8);
}

#[test]
fn map_and_unmap_reaching_the_top_of_the_space_keep_the_iotlb_sane() {
    // A mapping that ends at 2^64 - 1, used through IommuMemory and then
    // unmapped: the IOTLB's fills and invalidations must not overflow.
    let (mut h, ep) = setup(Kind::Attached);
    let mem: IommuMemory<GuestMemoryMmap, _> =
        IommuMemory::new(h.mem.clone(), ep.clone(), true, ());
    mem.write_obj(0x55aa_u16, GuestAddress(TOP_PAGE + 0x10))
        .unwrap();
    assert_eq!(
        h.mem.read_obj::<u16>(GuestAddress(0x20_0010)).unwrap(),
        0x55aa
    );
    assert_eq!(h.unmap(1, TOP_PAGE, u64::MAX), Some(Status::Ok));
    assert!(mem.read_obj::<u16>(GuestAddress(TOP_PAGE + 0x10)).is_err());
    assert_eq!(
        ep.translate(TOP_PAGE, 16, Permissions::Read).unwrap_err(),
        TranslateError::NotMapped(TOP_PAGE)
    );
}
