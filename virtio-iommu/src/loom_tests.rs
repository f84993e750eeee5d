//! Model checks of the pin/drain protocol (run with `--cfg loom`).
//!
//! Each model has two device threads that look a range up and pin it, then
//! "access" the page (read a flag at the start and at the end of the
//! access) and release; the invalidating thread removes the translation
//! through the real [`AddressSpace`] code, waits for the drain like the
//! engine does, and then reclaims the page. The invariant: no access sees
//! the page reclaimed. loom explores every interleaving (within its
//! preemption bound), including a lookup racing with the removal.

use loom::sync::atomic::AtomicBool;
use loom::thread;
use std::sync::atomic::Ordering::SeqCst;
use vm_memory::Permissions;

use crate::address_space::AddressSpace;
use crate::config::IommuConfig;
use crate::events::FaultQueue;
use crate::metrics::Metrics;
use crate::protocol::Status;
use crate::sync::Arc;
use crate::tracker::{EndpointCore, Shared};

fn space() -> AddressSpace {
    let config = IommuConfig {
        reserved_regions: Vec::new(),
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        bypass: std::sync::atomic::AtomicBool::new(false),
        metrics: Arc::new(Metrics::default()),
        faults: FaultQueue::new(4),
        limits: config.limits,
    });
    AddressSpace::new(config, shared)
}

fn device_thread(ep: Arc<EndpointCore>, reclaimed: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if let Ok((ranges, slot, serial)) = ep.translate(0x1000, 8, Permissions::Write, Some(None))
        {
            assert_eq!(ranges.as_slice()[0].gpa, 0x9000);
            // The DMA: it must neither start nor still run after the reply.
            assert!(!reclaimed.load(SeqCst), "access began after the reply");
            thread::yield_now();
            assert!(
                !reclaimed.load(SeqCst),
                "access still running after the reply"
            );
            ep.release(slot, serial);
        }
    })
}

/// Runs the model: `invalidate` removes the translation and returns the
/// drain; `wait` says whether to honour it (false models a broken device).
fn model(invalidate: fn(&mut AddressSpace) -> crate::address_space::Outcome, wait: bool) {
    static SCHEDULES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    struct Report;
    impl Drop for Report {
        fn drop(&mut self) {
            eprintln!(
                "loom: {} schedules explored",
                SCHEDULES.swap(0, std::sync::atomic::Ordering::SeqCst)
            );
        }
    }
    let _report = Report;
    loom::model(move || {
        SCHEDULES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut s = space();
        let a = s.add_endpoint_core(1, None, Vec::new()).unwrap();
        let b = s.add_endpoint_core(2, None, Vec::new()).unwrap();
        assert_eq!(s.attach(5, 1, false).status, Status::Ok);
        assert_eq!(s.attach(5, 2, false).status, Status::Ok);
        assert_eq!(
            s.map(5, 0x1000, 0x1fff, 0x9000, crate::MapFlags::READ_WRITE),
            Status::Ok
        );
        let reclaimed = Arc::new(AtomicBool::new(false));
        let t1 = device_thread(a, reclaimed.clone());
        let t2 = device_thread(b, reclaimed.clone());
        let out = invalidate(&mut s);
        assert_eq!(out.status, Status::Ok);
        if let (Some(d), true) = (out.drain, wait) {
            d.wait();
        }
        // Reply published: the guest reuses the page.
        reclaimed.store(true, SeqCst);
        t1.join().unwrap();
        t2.join().unwrap();
    });
}

#[test]
fn unmap_waits_for_every_overlapping_pin() {
    model(|s| s.unmap(5, 0x1000, 0x1fff), true);
}

#[test]
fn detach_waits_for_the_endpoints_pins() {
    // Detaching endpoint 1 only; endpoint 2 keeps its translation, so the
    // model reclaims only when both are gone: detach both.
    model(
        |s| {
            let first = s.detach(5, 1);
            if let Some(d) = first.drain {
                d.wait();
            }
            s.detach(5, 2)
        },
        true,
    );
}

#[test]
fn attach_move_waits_for_the_endpoints_pins() {
    model(
        |s| {
            let first = s.attach(6, 1, false);
            if let Some(d) = first.drain {
                d.wait();
            }
            s.attach(6, 2, false)
        },
        true,
    );
}

/// The checker can fail: a device that replies without waiting for the
/// drain is caught.
#[test]
#[should_panic(expected = "after the reply")]
fn replying_without_draining_is_caught() {
    model(|s| s.unmap(5, 0x1000, 0x1fff), false);
}
