//! Blocking invalidation through the real request queue: UNMAP, DETACH and
//! ATTACH-move reply only after the pins they overlap are released.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_iommu::protocol::req_type;
use virtio_iommu::testing::{attach_body, detach_body, map_body, unmap_body, Harness};
use virtio_iommu::{IommuConfig, Pin, Status};
use vm_memory::{Bytes, GuestAddress, Permissions};

const RW: u32 = 3;
const EP: u32 = 8;

fn setup() -> Harness {
    let mut h = Harness::new(IommuConfig {
        revoke_grace: Duration::from_millis(20),
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    h.dev.add_endpoint(EP + 1).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x10_000, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x2000, 0x2fff, 0x11_000, RW), Some(Status::Ok));
    assert_eq!(h.map(1, 0x8000, 0x8fff, 0x40_000, RW), Some(Status::Ok));
    h
}

fn pin(h: &Harness, ep: u32, iova: u64, len: u64, access: Permissions) -> Pin {
    h.dev.endpoint(ep).unwrap().pin(iova, len, access).unwrap()
}

/// A revocable pin of 0x1000..0x1008 whose revoke hook sends on the
/// returned channel.
fn revocable_pin(h: &Harness) -> (Pin, std::sync::mpsc::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let hook = Arc::new(move || {
        let _ = tx.send(());
    });
    let pin = h
        .dev
        .endpoint(EP)
        .unwrap()
        .pin_revocable(0x1000, 8, Permissions::Write, hook)
        .unwrap();
    (pin, rx)
}

fn process(h: &mut Harness) -> bool {
    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap()
}

#[test]
fn unmap_reply_waits_for_the_overlapping_pin() {
    let mut h = setup();
    let ep = h.dev.endpoint(EP).unwrap();
    let pin = ep.pin(0x1800, 0x100, Permissions::Write).unwrap();
    assert_eq!(pin.ranges()[0].gpa, 0x10_800);
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x2fff));
    assert!(!process(&mut h), "reply published while DMA in flight");
    assert_eq!(h.posted_status(0), 0xee);
    assert!(h.req_driver.pop_used(&h.mem).is_none());
    // The translation is already gone: no new DMA can start.
    assert!(ep.pin(0x1800, 8, Permissions::Write).is_err());
    assert!(h.dev.drain_eventfd().read().is_err(), "no completion yet");
    drop(pin);
    assert_eq!(h.dev.drain_eventfd().read().unwrap(), 1);
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
    assert_eq!(h.req_driver.pop_used(&h.mem).unwrap().1, 4);
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.drains, 1);
    assert_eq!(m.drain_wait.count, 1);
}

#[test]
fn unmap_of_other_range_does_not_wait_for_a_pin() {
    let mut h = setup();
    let ep = h.dev.endpoint(EP).unwrap();
    let _pin = ep.pin(0x1000, 0x1000, Permissions::Read).unwrap();
    assert_eq!(h.unmap(1, 0x8000, 0x8fff), Some(Status::Ok));
    assert_eq!(h.dev.metrics().snapshot().drains, 0);
}

#[test]
fn requests_behind_a_parked_one_complete_after_it_in_order() {
    let mut h = setup();
    let pin = pin(&h, EP, 0x2000, 8, Permissions::Read);
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x2000, 0x2fff));
    h.post(1, req_type::MAP, &map_body(1, 0x2000, 0x2fff, 0x99_000, RW));
    assert!(!process(&mut h));
    assert!(!process(&mut h), "later request must not overtake");
    assert_eq!(h.posted_status(1), 0xee);
    drop(pin);
    assert!(process(&mut h));
    let (a, _) = h.req_driver.pop_used(&h.mem).unwrap();
    let (b, _) = h.req_driver.pop_used(&h.mem).unwrap();
    assert!(a != b);
    assert_eq!(h.posted_status(0), Status::Ok as u8);
    assert_eq!(h.posted_status(1), Status::Ok as u8);
    let r = h
        .dev
        .endpoint(EP)
        .unwrap()
        .translate(0x2000, 8, Permissions::Read)
        .unwrap();
    assert_eq!(r.as_slice()[0].gpa, 0x99_000);
}

#[test]
fn detach_waits_for_the_endpoints_pins() {
    let mut h = setup();
    let pin = pin(&h, EP, 0x8000, 16, Permissions::Write);
    h.post(0, req_type::DETACH, &detach_body(1, EP));
    assert!(!process(&mut h));
    drop(pin);
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
}

#[test]
fn attach_moving_the_endpoint_waits_for_its_pins() {
    let mut h = setup();
    let pin = pin(&h, EP, 0x8000, 16, Permissions::Write);
    h.post(0, req_type::ATTACH, &attach_body(2, EP, 0));
    assert!(!process(&mut h));
    assert_eq!(h.dev.address_space().attached_domain(EP), Some(2));
    drop(pin);
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
}

/// One pin in every shard of the endpoint (one handle per queue), each
/// over 0x8000; `PIN_SHARDS` is at most 8.
fn pin_every_shard(h: &Harness) -> Vec<Pin> {
    let ep = h.dev.endpoint(EP).unwrap();
    (0..8u16)
        .map(|q| ep.on_queue(q).pin(0x8000, 16, Permissions::Write).unwrap())
        .collect()
}

#[test]
fn invalidations_wait_for_the_pins_of_every_shard() {
    // UNMAP, DETACH and ATTACH-move: each pin (one per shard) released on
    // its own keeps the reply back until the last one.
    for (kind, body) in [
        (req_type::UNMAP, unmap_body(1, 0x8000, 0x8fff)),
        (req_type::DETACH, detach_body(1, EP)),
        (req_type::ATTACH, attach_body(2, EP, 0)),
    ] {
        let mut h = setup();
        let mut pins = pin_every_shard(&h);
        h.post(0, kind, &body);
        assert!(!process(&mut h));
        // Released last-shard first: the primary's pin goes last.
        while let Some(p) = pins.pop() {
            assert!(!process(&mut h), "request {kind} replied with pins held");
            drop(p);
        }
        assert!(process(&mut h), "request {kind}");
        assert_eq!(h.posted_status(0), Status::Ok as u8);
    }
}

#[test]
fn the_pin_limit_is_the_endpoints_whatever_the_shards() {
    let mut h = Harness::new(IommuConfig {
        limits: virtio_iommu::Limits {
            max_pins_per_endpoint: 10,
            ..Default::default()
        },
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x10_000, RW), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    // One queue's handle reaches the whole limit (its shard's share first,
    // then the other shards'), and not one pin more, from any queue.
    let held: Vec<Pin> = (0..10)
        .map(|_| ep.on_queue(0).pin(0x1000, 8, Permissions::Read).unwrap())
        .collect();
    assert_eq!(ep.pins_in_flight(), 10);
    for q in 0..8u16 {
        assert_eq!(
            ep.on_queue(q)
                .pin(0x1000, 8, Permissions::Read)
                .unwrap_err(),
            virtio_iommu::TranslateError::TooManyPins
        );
    }
    // A range that does not translate is reported as such, not as a limit.
    assert_eq!(
        ep.pin(0x5000, 8, Permissions::Read).unwrap_err(),
        virtio_iommu::TranslateError::NotMapped(0x5000)
    );
    drop(held);
    assert_eq!(ep.pins_in_flight(), 0);
    assert!(ep.on_queue(3).pin(0x1000, 8, Permissions::Read).is_ok());
}

#[test]
fn pins_of_other_endpoints_in_the_domain_are_waited_for_on_unmap() {
    let mut h = setup();
    assert_eq!(h.attach(1, EP + 1, 0), Some(Status::Ok));
    let pin = pin(&h, EP + 1, 0x1000, 8, Permissions::Read);
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x1fff));
    assert!(!process(&mut h));
    drop(pin);
    assert!(process(&mut h));
}

#[test]
fn pin_spanning_contiguous_mappings_merges_gpa_ranges() {
    let h = setup();
    let ep = h.dev.endpoint(EP).unwrap();
    let pin = ep.pin(0x1f00, 0x200, Permissions::Read).unwrap();
    assert_eq!(
        pin.ranges().len(),
        1,
        "0x1000->0x10000 and 0x2000->0x11000 are contiguous"
    );
    assert_eq!(pin.ranges()[0].len, 0x200);
    assert!(
        ep.pin(0x2f00, 0x200, Permissions::Read).is_err(),
        "hole at 0x3000"
    );
}

#[test]
fn pin_is_send_and_owned() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    let h = setup();
    let pin = pin(&h, EP, 0x1000, 8, Permissions::Read);
    assert_send(&pin);
    let handle = std::thread::spawn(move || pin.len());
    assert_eq!(handle.join().unwrap(), 8);
}

#[test]
fn revoke_hook_is_called_after_the_grace_period_and_reply_still_waits() {
    let mut h = setup();
    let revoked = Arc::new(AtomicUsize::new(0));
    let r = revoked.clone();
    let pin: Pin = h
        .dev
        .endpoint(EP)
        .unwrap()
        .pin_revocable(
            0x1000,
            8,
            Permissions::Write,
            Arc::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x1fff));
    assert!(!process(&mut h));
    let deadline = h.dev.revoke_deadline().unwrap();
    assert_eq!(h.dev.revoke_deadline_after(Instant::now()), Some(deadline));
    assert_eq!(
        h.dev.revoke_deadline_after(deadline),
        None,
        "a passed deadline is not a next one"
    );
    assert_eq!(h.dev.revoke_overdue(Instant::now()), 0, "too early");
    assert_eq!(revoked.load(Ordering::SeqCst), 0);
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    assert_eq!(h.dev.revoke_overdue(Instant::now()), 1);
    assert_eq!(h.dev.revoke_overdue(Instant::now()), 0, "each hook once");
    assert_eq!(revoked.load(Ordering::SeqCst), 1);
    assert!(!process(&mut h), "revocation does not reply early");
    drop(pin);
    assert!(process(&mut h));
    assert_eq!(h.dev.metrics().snapshot().revocations, 1);
}

#[test]
fn blocking_wait_revokes_and_returns_when_the_holder_releases() {
    let mut h = setup();
    let (pin, rx) = revocable_pin(&h);
    // The "I/O": completes only when cancelled.
    let io = std::thread::spawn(move || {
        rx.recv().unwrap();
        drop(pin);
    });
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x1fff));
    assert!(!process(&mut h));
    assert!(h.dev.wait_parked(Duration::from_secs(30)));
    assert!(process(&mut h));
    io.join().unwrap();
}

#[test]
fn wait_parked_gives_up_after_its_timeout() {
    let mut h = setup();
    // A holder that ignores revocation: the wait must still end.
    let pin = pin(&h, EP, 0x1000, 8, Permissions::Write);
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x1fff));
    assert!(!process(&mut h));
    let t = std::time::Instant::now();
    assert!(!h.dev.wait_parked(Duration::from_millis(20)));
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(pin);
    assert!(h.dev.wait_parked(Duration::from_millis(20)));
    assert!(process(&mut h));
}

#[test]
fn reset_completes_only_after_the_pins_of_every_endpoint_are_released() {
    let mut h = setup();
    let pin = pin(&h, EP, 0x1000, 8, Permissions::Write);
    // The reset returns at once; it is pending while the pin is held.
    assert!(!h.dev.reset(), "a pin is in flight");
    assert!(h.dev.reset_pending());
    assert!(!h.dev.endpoint(EP).unwrap().is_translating());
    assert!(h.dev.snapshot().is_err(), "no snapshot while draining");
    drop(pin);
    assert!(!h.dev.reset_pending());
    assert!(h.dev.reset(), "nothing in flight: complete at once");
}

#[test]
fn a_pending_reset_revokes_its_blockers_after_the_grace_period() {
    let mut h = setup();
    let (pin, rx) = revocable_pin(&h);
    assert!(!h.dev.reset());
    // The transport polls the reset (the driver reads the status).
    let t = std::time::Instant::now();
    while rx.try_recv().is_err() {
        assert!(h.dev.reset_pending());
        assert!(t.elapsed() < Duration::from_secs(30), "never revoked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(t.elapsed() >= h.dev.config().revoke_grace / 2);
    drop(pin);
    assert!(!h.dev.reset_pending());
    assert_eq!(h.dev.metrics().snapshot().revocations, 1);
}

#[test]
fn iommu_memory_translates_through_the_handle_and_enforces_permissions() {
    use vm_memory::{GuestMemoryMmap, IommuMemory};
    let mut h = setup();
    assert_eq!(h.map(1, 0x5000, 0x5fff, 0x20_000, 1), Some(Status::Ok));
    let ep = h.dev.endpoint(EP).unwrap();
    let mem: IommuMemory<GuestMemoryMmap, _> = IommuMemory::new(h.mem.clone(), ep, true, ());
    mem.write_obj(0xdead_beef_u32, GuestAddress(0x1ffe))
        .unwrap();
    // Two mappings, GPA-contiguous: the u32 straddles them.
    let v: u32 = h.mem.read_obj(GuestAddress(0x10_ffe)).unwrap();
    assert_eq!(v, 0xdead_beef);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x1ffe)).unwrap(),
        0xdead_beef
    );
    assert!(mem.read_obj::<u32>(GuestAddress(0x5000)).is_ok());
    assert!(
        mem.write_obj(1u32, GuestAddress(0x5000)).is_err(),
        "read-only"
    );
    assert!(
        mem.read_obj::<u32>(GuestAddress(0x7000)).is_err(),
        "unmapped"
    );
    assert_eq!(h.unmap(1, 0x1000, 0x2fff), Some(Status::Ok));
    assert!(
        mem.read_obj::<u32>(GuestAddress(0x1ffe)).is_err(),
        "IOTLB invalidated"
    );
}
