//! Fences through the real request queue: after the revocation grace and
//! `fence_after`, the pins still holding an invalidation are handed to the
//! VMM as guest pages to fence; the reply follows the fence's completion,
//! never its claim, and a failed fence leaves the reply waiting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_iommu::protocol::req_type;
use virtio_iommu::testing::{unmap_body, Harness};
use virtio_iommu::{GpaRange, IommuConfig, Pin, Status};
use vm_memory::Permissions;

const RW: u32 = 3;
const EP: u32 = 8;
const GRACE: Duration = Duration::from_millis(10);
const FENCE_AFTER: Duration = Duration::from_millis(20);

fn setup(fence_after: Option<Duration>) -> Harness {
    let mut h = Harness::new(IommuConfig {
        revoke_grace: GRACE,
        fence_after,
        ..Default::default()
    });
    h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x10_000, RW), Some(Status::Ok));
    h
}

/// A revocable pin of `[iova, iova + len)`, as a block device holds one
/// across its I/O.
fn revocable_pin(h: &Harness, iova: u64, len: u64) -> Pin {
    h.dev
        .endpoint(EP)
        .unwrap()
        .pin_revocable(iova, len, Permissions::Write, Arc::new(|| {}))
        .unwrap()
}

fn process(h: &mut Harness) -> bool {
    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap()
}

/// Posts an UNMAP of 0x1000..0x2fff, which parks behind the pins.
fn unmap_parked(h: &mut Harness) {
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x2fff));
    assert!(!process(h), "replied with DMA in flight");
}

/// Posts the parked UNMAP and waits until its pins are due for a fence.
fn unmap_until_fence_deadline(h: &mut Harness) {
    unmap_parked(h);
    sleep_until(h.dev.fence_deadline().unwrap());
}

fn sleep_until(t: Instant) {
    std::thread::sleep(t.saturating_duration_since(Instant::now()));
}

#[test]
fn without_fence_after_nothing_is_ever_fenced() {
    let mut h = setup(None);
    let _pin = revocable_pin(&h, 0x1000, 8);
    unmap_parked(&mut h);
    assert_eq!(h.dev.fence_deadline(), None);
    assert!(h
        .dev
        .fences_due(Instant::now() + Duration::from_secs(3600))
        .is_none());
}

#[test]
fn a_pin_still_held_at_the_fence_deadline_is_fenced_and_the_unmap_replies() {
    let mut h = setup(Some(FENCE_AFTER));
    let pin = revocable_pin(&h, 0x1ff0, 0x20);
    let t = Instant::now();
    unmap_parked(&mut h);
    let deadline = h.dev.fence_deadline().unwrap();
    assert!(deadline >= t + GRACE + FENCE_AFTER);
    assert!(h.dev.fences_due(Instant::now()).is_none(), "too early");
    sleep_until(deadline);
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    // 0x1ff0..0x2010 translates to 0x10ff0..0x11010: two whole pages.
    assert_eq!(
        fence.ranges(),
        [GpaRange {
            gpa: 0x10_000,
            len: 0x2000
        }]
    );
    assert_eq!(fence.pages(), 2);
    assert!(h.dev.fences_due(Instant::now()).is_none(), "fenced once");
    assert_eq!(h.dev.fence_deadline(), None);
    // Claimed, not yet fenced: the reply still waits.
    assert!(!process(&mut h));
    assert!(h.dev.drain_eventfd().read().is_err());
    assert!(!pin.fenced());
    fence.complete();
    assert!(pin.fenced(), "the holder learns its pages were taken");
    assert_eq!(h.dev.drain_eventfd().read().unwrap(), 1);
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.fences, m.pages_fenced, m.fence_failures), (1, 2, 0));
    assert_eq!(m.fence_time.count, 1);
    // The fenced pin's DMA writes pages the guest no longer sees: a later
    // UNMAP of the same IOVAs, mapped again, does not wait for it.
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x20_000, RW), Some(Status::Ok));
    h.post(0, req_type::UNMAP, &unmap_body(1, 0x1000, 0x2fff));
    assert!(process(&mut h), "waited for a fenced pin");
    // Its I/O ends at last: nothing is released twice.
    drop(pin);
    assert!(h.dev.parked_drain().is_none());
}

#[test]
fn a_fence_the_vmm_drops_leaves_the_unmap_waiting_for_the_pin() {
    let mut h = setup(Some(FENCE_AFTER));
    let pin = revocable_pin(&h, 0x1000, 8);
    unmap_until_fence_deadline(&mut h);
    drop(h.dev.fences_due(Instant::now()).expect("a fence is due"));
    assert_eq!(h.dev.metrics().snapshot().fence_failures, 1);
    assert!(!pin.fenced(), "a failed fence took nothing");
    assert!(!process(&mut h), "a failed fence replied");
    assert!(h.dev.fences_due(Instant::now()).is_none());
    drop(pin);
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
}

#[test]
fn a_failed_fence_is_tried_again_later_and_a_successful_one_lets_the_unmap_reply() {
    let mut h = setup(Some(FENCE_AFTER));
    let pin = revocable_pin(&h, 0x1000, 8);
    unmap_until_fence_deadline(&mut h);
    let failed_at = Instant::now();
    drop(h.dev.fences_due(failed_at).expect("a fence is due"));
    // Not at once: the VMM could not fence (its vCPUs did not stop), and
    // trying again at once would hold them again.
    assert!(h.dev.fences_due(Instant::now()).is_none());
    let retry = h
        .dev
        .fence_deadline()
        .expect("the UNMAP is due for another fence");
    assert!(retry >= failed_at + FENCE_AFTER.max(virtio_iommu::FENCE_RETRY_MIN));
    // A second failure waits twice as long.
    sleep_until(retry);
    let second_at = Instant::now();
    drop(h.dev.fences_due(second_at).expect("due again"));
    let retry = h.dev.fence_deadline().expect("due once more");
    assert!(retry >= second_at + 2 * FENCE_AFTER.max(virtio_iommu::FENCE_RETRY_MIN));
    sleep_until(retry);
    let fence = h.dev.fences_due(Instant::now()).expect("due once more");
    assert!(!process(&mut h), "replied before the fence completed");
    fence.complete();
    assert!(pin.fenced());
    assert!(process(&mut h));
    assert_eq!(h.posted_status(0), Status::Ok as u8);
    assert_eq!(h.dev.metrics().snapshot().fence_failures, 2);
}

#[test]
fn a_pin_released_while_its_fence_runs_releases_the_drain_once() {
    let mut h = setup(Some(FENCE_AFTER));
    let pin = revocable_pin(&h, 0x1000, 8);
    unmap_until_fence_deadline(&mut h);
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    drop(pin);
    assert!(process(&mut h), "the release completes the drain");
    fence.complete();
    assert!(h.dev.parked_drain().is_none());
    assert_eq!(h.dev.metrics().snapshot().fences, 1);
}

#[test]
fn pins_that_cannot_be_revoked_are_not_fenced() {
    let mut h = setup(Some(FENCE_AFTER));
    let pin = h
        .dev
        .endpoint(EP)
        .unwrap()
        .pin(0x1000, 8, Permissions::Write)
        .unwrap();
    unmap_until_fence_deadline(&mut h);
    assert!(h.dev.fences_due(Instant::now()).is_none());
    drop(pin);
    assert!(process(&mut h));
}

#[test]
fn an_invalidation_that_finds_a_claimed_pin_waits_for_the_fence() {
    let mut h = setup(Some(FENCE_AFTER));
    let _pin = revocable_pin(&h, 0x1000, 8);
    unmap_until_fence_deadline(&mut h);
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    // A reset while the fence runs collects the claimed pin too.
    assert!(!h.dev.reset(), "reset completed with a claimed pin");
    assert!(h.dev.reset_pending());
    fence.complete();
    assert!(!h.dev.reset_pending(), "the fence released the reset too");
}

#[test]
fn fences_take_the_pins_of_several_ranges_in_page_order() {
    let mut h = setup(Some(FENCE_AFTER));
    assert_eq!(h.map(1, 0x8000, 0x8fff, 0x4_000, RW), Some(Status::Ok));
    let _a = revocable_pin(&h, 0x2000, 8);
    let _b = revocable_pin(&h, 0x8000, 0x1000);
    h.post(0, req_type::UNMAP, &unmap_body(1, 0, 0xffff));
    assert!(!process(&mut h));
    sleep_until(h.dev.fence_deadline().unwrap());
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    assert_eq!(
        fence.ranges(),
        [
            GpaRange {
                gpa: 0x4_000,
                len: 0x1000
            },
            GpaRange {
                gpa: 0x11_000,
                len: 0x1000
            }
        ]
    );
    fence.complete();
    assert!(process(&mut h));
}

#[test]
fn other_dma_into_a_fenced_page_is_revoked_and_new_dma_refused_until_the_fence_ends() {
    let mut h = setup(Some(FENCE_AFTER));
    // The same guest page through another IOVA, for a second request.
    assert_eq!(h.map(1, 0x5000, 0x5fff, 0x10_000, RW), Some(Status::Ok));
    let _stuck = revocable_pin(&h, 0x1000, 8);
    let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = told.clone();
    let ep = h.dev.endpoint(EP).unwrap();
    let other = ep
        .pin_revocable(
            0x5800,
            8,
            Permissions::Write,
            Arc::new(move || t.store(true, std::sync::atomic::Ordering::SeqCst)),
        )
        .unwrap();
    // Another guest page, through a mapping the UNMAP leaves alone.
    assert_eq!(h.map(1, 0x7000, 0x7fff, 0x20_000, RW), Some(Status::Ok));
    let elsewhere = revocable_pin(&h, 0x7000, 8);
    unmap_until_fence_deadline(&mut h);
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    assert_eq!(
        fence.ranges(),
        [GpaRange {
            gpa: 0x10_000,
            len: 0x1000
        }]
    );
    // Its DMA may land in the page the guest is about to lose: its holder
    // is told to end it, and learns that if the I/O could not be
    // cancelled its data went to a page the guest no longer has.
    assert!(told.load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        other.fenced(),
        "a pin sharing a fenced page must not report success"
    );
    // A pin elsewhere (another guest page) is not touched.
    assert!(!elsewhere.fenced());
    // New DMA into that page waits for the fence to end; the VMM's own
    // synchronous accesses (not revocable) follow the guest's new page.
    assert_eq!(
        ep.pin_revocable(0x5000, 8, Permissions::Write, Arc::new(|| {}))
            .unwrap_err(),
        virtio_iommu::TranslateError::Fenced
    );
    assert!(ep.pin(0x5000, 8, Permissions::Write).is_ok());
    fence.complete();
    assert!(ep
        .pin_revocable(0x5000, 8, Permissions::Write, Arc::new(|| {}))
        .is_ok());
    assert!(process(&mut h));
}

#[test]
fn write_sections_open_until_a_fence_claims_or_marks_the_pin() {
    let mut h = setup(Some(FENCE_AFTER));
    assert_eq!(h.map(1, 0x5000, 0x5fff, 0x10_000, RW), Some(Status::Ok));
    let stuck = revocable_pin(&h, 0x1000, 8);
    let other = revocable_pin(&h, 0x5800, 8);
    drop(
        stuck
            .write_section()
            .expect("not fenced: the holder may write"),
    );
    unmap_until_fence_deadline(&mut h);
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    assert!(stuck.write_section().is_none(), "claimed: no write");
    assert!(
        other.write_section().is_none(),
        "on a fenced page: no write"
    );
    fence.complete();
    assert!(stuck.write_section().is_none());
    assert!(process(&mut h));
}

#[test]
fn a_fence_waits_for_the_write_section_in_progress_on_its_pages() {
    let mut h = setup(Some(FENCE_AFTER));
    let stuck = Arc::new(revocable_pin(&h, 0x1000, 8));
    unmap_until_fence_deadline(&mut h);
    let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let writer = {
        let (stuck, written) = (stuck.clone(), written.clone());
        std::thread::spawn(move || {
            let section = stuck.write_section().expect("not claimed yet");
            opened_tx.send(()).unwrap();
            // A copy into the page, slower than the fence's claim.
            std::thread::sleep(Duration::from_millis(50));
            written.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(section);
        })
    };
    opened_rx.recv().unwrap();
    let fence = h.dev.fences_due(Instant::now()).expect("a fence is due");
    assert!(
        written.load(std::sync::atomic::Ordering::SeqCst),
        "the fence claimed the pin while its holder was still writing the page"
    );
    writer.join().unwrap();
    fence.complete();
    assert!(process(&mut h));
}
