//! Model checks of the pin/drain protocol (run with `--cfg loom`).
//!
//! Each model has two device threads that look a range up and pin it, then
//! "access" the page (read a flag at the start and at the end of the
//! access) and release; the invalidating thread removes the translation
//! through the real [`AddressSpace`] code, waits for the drain like the
//! engine does, and then reclaims the page. The invariant: no access sees
//! the page reclaimed. loom explores every interleaving (within its
//! preemption bound), including a lookup racing with the removal. The two
//! device threads pin through two endpoints, or through two shards of one
//! endpoint (the queues of one multi-queue device).

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
        fence_gate: Default::default(),
        bypass: crate::sync::AtomicBool::new(false),
        metrics: Arc::new(Metrics::default()),
        faults: FaultQueue::new(4),
        limits: config.limits,
        input_end: config.input_end(),
    });
    AddressSpace::new(config, shared)
}

/// Runs `model` with the broken variant `flag` switched on, and off again
/// afterwards (also when the model panics, as the should_panic tests
/// expect).
fn with_broken(flag: &'static std::sync::atomic::AtomicBool, model: impl FnOnce()) {
    struct Restore(&'static std::sync::atomic::AtomicBool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.store(false, SeqCst);
        }
    }
    let _restore = Restore(flag);
    flag.store(true, SeqCst);
    model();
}

/// `loom::model`, printing how many schedules it explored (also when a
/// schedule panics, as the models of broken devices must). The count is
/// shared: run the models with `--test-threads=1` (as `ci/test` does).
fn counted_model(f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    static SCHEDULES: AtomicUsize = AtomicUsize::new(0);
    struct Report;
    impl Drop for Report {
        fn drop(&mut self) {
            eprintln!("loom: {} schedules explored", SCHEDULES.swap(0, Relaxed));
        }
    }
    let _report = Report;
    loom::model(move || {
        SCHEDULES.fetch_add(1, Relaxed);
        f();
    });
}

/// A revoke hook running `f` (loom's `Arc` does not coerce to a trait
/// object itself).
fn hook(f: impl Fn() + Send + Sync + 'static) -> crate::tracker::RevokeHook {
    let f: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(f);
    Arc::from_std(f)
}

fn device_thread(
    ep: Arc<EndpointCore>,
    shard: usize,
    reclaimed: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if let Ok((ranges, at)) = ep.pin(shard, 0x1000, 8, Permissions::Write, None) {
            assert_eq!(at.shard, shard);
            assert_eq!(ranges.as_slice()[0].gpa, 0x9000);
            // The DMA: it must neither start nor still run after the reply.
            assert!(!reclaimed.load(SeqCst), "access began after the reply");
            thread::yield_now();
            assert!(
                !reclaimed.load(SeqCst),
                "access still running after the reply"
            );
            ep.release(at);
        }
    })
}

/// How the two device threads reach the page.
#[derive(Clone, Copy)]
enum Threads {
    /// Endpoints 1 and 2, both attached to domain 5.
    TwoEndpoints,
    /// Shards 0 and 1 of endpoint 1.
    OneEndpoint,
}

/// Runs the model: `invalidate` removes the translation and returns the
/// drain; `wait` says whether to honour it (false models a broken device).
fn model(
    threads: Threads,
    invalidate: fn(&mut AddressSpace) -> crate::address_space::Outcome,
    wait: bool,
) {
    counted_model(move || {
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
        let (t1, t2) = match threads {
            Threads::TwoEndpoints => (
                device_thread(a, 0, reclaimed.clone()),
                device_thread(b, 0, reclaimed.clone()),
            ),
            Threads::OneEndpoint => {
                drop(b);
                (
                    device_thread(a.clone(), 0, reclaimed.clone()),
                    device_thread(a, 1, reclaimed.clone()),
                )
            }
        };
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
    model(Threads::TwoEndpoints, |s| s.unmap(5, 0x1000, 0x1fff), true);
}

#[test]
fn unmap_waits_for_the_pins_of_every_shard() {
    model(Threads::OneEndpoint, |s| s.unmap(5, 0x1000, 0x1fff), true);
}

#[test]
fn detach_waits_for_the_pins_of_every_shard() {
    model(Threads::OneEndpoint, |s| s.detach(5, 1), true);
}

#[test]
fn attach_move_waits_for_the_pins_of_every_shard() {
    model(Threads::OneEndpoint, |s| s.attach(6, 1, false), true);
}

/// The checker can fail on shards: an invalidation that scans only the
/// primary shard misses the pin of the thread on shard 1.
#[test]
#[should_panic(expected = "after the reply")]
fn scanning_one_shard_only_is_caught() {
    crate::tracker::broken::SCAN_PRIMARY_ONLY.store(true, SeqCst);
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            crate::tracker::broken::SCAN_PRIMARY_ONLY.store(false, SeqCst);
        }
    }
    let _restore = Restore;
    model(Threads::OneEndpoint, |s| s.unmap(5, 0x1000, 0x1fff), true);
}

#[test]
fn sharded_lock_writer_excludes_readers_of_every_shard() {
    use crate::sync::ShardedRwLock;
    counted_model(|| {
        let l = Arc::new(ShardedRwLock::<u64, 2>::new(0));
        let readers: Vec<_> = (0..2)
            .map(|shard| {
                let l = l.clone();
                // loom's cell reports a read that races the write.
                thread::spawn(move || assert_eq!(*l.read(shard) % 2, 0))
            })
            .collect();
        {
            let mut w = l.write();
            *w += 1;
            thread::yield_now();
            *w += 1;
        }
        for r in readers {
            r.join().unwrap();
        }
    });
}

#[test]
fn detach_waits_for_the_endpoints_pins() {
    // Detaching endpoint 1 only; endpoint 2 keeps its translation, so the
    // model reclaims only when both are gone: detach both.
    model(
        Threads::TwoEndpoints,
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
        Threads::TwoEndpoints,
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
    model(Threads::TwoEndpoints, |s| s.unmap(5, 0x1000, 0x1fff), false);
}

// ------------------------------------------------------------- leases
//
// The queue-area models: the device translates its "ring" once through
// `EndpointCore::lease_areas` (the code `EndpointHandle::lease_queue_areas`
// runs) and then accesses it in sections; the invalidating thread removes
// the translation through the real address-space code, waits for the drain
// and reclaims the page. No section may see the page reclaimed, and the
// revoke hook must have been called by the time of the reply.

use crate::drain::Drain;
use crate::lease::Lease;

const RING: (u64, u64, Permissions) = (0x1000, 8, Permissions::Write);

/// One access section, as `AreaGuard` brackets it.
fn section(ep: &EndpointCore, lease: &Lease<Arc<Drain>>, reclaimed: &AtomicBool) -> bool {
    let _ = ep;
    if !lease.enter() {
        return false;
    }
    assert!(!reclaimed.load(SeqCst), "ring access began after the reply");
    thread::yield_now();
    assert!(
        !reclaimed.load(SeqCst),
        "ring access still running after the reply"
    );
    EndpointCore::exit_lease(lease);
    true
}

/// Runs a lease model. The device thread leases the ring (racing the
/// invalidation: rule 1) and runs `sections` sections; with `second`, a
/// second thread (a worker publishing used entries) shares the lease.
/// `setup` prepares the address space (returns the endpoint used),
/// `invalidate` removes the translation; `wait` false models a device
/// that replies without draining.
fn lease_model(
    setup: fn(&mut AddressSpace) -> Arc<EndpointCore>,
    invalidate: fn(&mut AddressSpace) -> crate::address_space::Outcome,
    second: bool,
    wait: bool,
) {
    counted_model(move || {
        let mut s = space();
        let ep = setup(&mut s);
        let reclaimed = Arc::new(AtomicBool::new(false));
        let told = Arc::new(AtomicBool::new(false));
        let lease = Arc::new(Lease::new());
        let hook = {
            let told = told.clone();
            hook(move || told.store(true, SeqCst))
        };
        // Leased before the threads start when a second thread shares it;
        // otherwise the device leases concurrently with the invalidation.
        let pre = second.then(|| ep.lease_areas(&[RING], lease.clone(), Some(hook.clone())));
        let dev = {
            let (ep, lease, reclaimed) = (ep.clone(), lease.clone(), reclaimed.clone());
            let hook = hook.clone();
            thread::spawn(move || {
                let leased = match pre {
                    Some(r) => r.is_ok(),
                    None => ep.lease_areas(&[RING], lease.clone(), Some(hook)).is_ok(),
                };
                if leased {
                    for _ in 0..2 {
                        section(&ep, &lease, &reclaimed);
                    }
                }
            })
        };
        let worker = second.then(|| {
            let (ep, lease, reclaimed) = (ep.clone(), lease.clone(), reclaimed.clone());
            thread::spawn(move || {
                section(&ep, &lease, &reclaimed);
            })
        });
        let out = invalidate(&mut s);
        if let (Some(d), true) = (out.drain, wait) {
            d.wait();
        }
        // Reply published: the guest reuses the ring's page.
        reclaimed.store(true, SeqCst);
        if lease.is_closed() {
            assert!(
                told.load(SeqCst),
                "lease closed but the device was not told"
            );
        }
        dev.join().unwrap();
        if let Some(w) = worker {
            w.join().unwrap();
        }
    });
}

fn attached(s: &mut AddressSpace) -> Arc<EndpointCore> {
    let ep = s.add_endpoint_core(1, None, Vec::new()).unwrap();
    assert_eq!(s.attach(5, 1, false).status, Status::Ok);
    assert_eq!(
        s.map(5, 0x1000, 0x1fff, 0x9000, crate::MapFlags::READ_WRITE),
        Status::Ok
    );
    ep
}

fn bypassed(s: &mut AddressSpace) -> Arc<EndpointCore> {
    let ep = s.add_endpoint_core(1, None, Vec::new()).unwrap();
    assert!(s.set_bypass(true).is_none());
    ep
}

#[test]
fn lease_alone_close_waits_for_open_sections() {
    // The protocol without the tracker: two sections against one close.
    counted_model(|| {
        let lease: Arc<Lease<Arc<AtomicBool>>> = Arc::new(Lease::new());
        let reclaimed = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (lease, reclaimed) = (lease.clone(), reclaimed.clone());
                thread::spawn(move || {
                    if lease.enter() {
                        assert!(!reclaimed.load(SeqCst));
                        thread::yield_now();
                        assert!(!reclaimed.load(SeqCst));
                        for w in lease.exit() {
                            w.store(true, SeqCst);
                        }
                    }
                })
            })
            .collect();
        let released = Arc::new(AtomicBool::new(false));
        let closed = lease.close(|| released.clone());
        if closed.waiting {
            while !released.load(SeqCst) {
                thread::yield_now();
            }
        }
        reclaimed.store(true, SeqCst);
        assert!(!lease.enter(), "a closed lease never opens again");
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn unmap_of_a_leased_ring_waits_for_open_sections() {
    lease_model(attached, |s| s.unmap(5, 0x1000, 0x1fff), false, true);
}

#[test]
fn unmap_of_a_leased_ring_waits_for_every_sharing_thread() {
    lease_model(attached, |s| s.unmap(5, 0x1000, 0x1fff), true, true);
}

#[test]
fn detach_revokes_a_leased_ring() {
    lease_model(attached, |s| s.detach(5, 1), false, true);
}

#[test]
fn attach_move_revokes_a_leased_ring() {
    lease_model(attached, |s| s.attach(6, 1, false), false, true);
}

#[test]
fn bypass_off_revokes_a_ring_leased_through_bypass() {
    lease_model(
        bypassed,
        |s| crate::address_space::Outcome {
            status: Status::Ok,
            drain: s.set_bypass(false),
        },
        false,
        true,
    );
}

#[test]
fn reset_revokes_a_leased_ring() {
    lease_model(
        attached,
        |s| crate::address_space::Outcome {
            status: Status::Ok,
            drain: s.reset(),
        },
        false,
        true,
    );
}

/// The checker can fail: replying without waiting for the open sections
/// of the ring's lease is caught.
#[test]
#[should_panic(expected = "after the reply")]
fn replying_without_waiting_for_ring_sections_is_caught() {
    lease_model(attached, |s| s.unmap(5, 0x1000, 0x1fff), true, false);
}

// ------------------------------------------------------------- fences
//
// The fence models: a revocable pin whose DMA the host cannot cancel. The
// fencer claims the pins blocking the invalidation (`Fence::claim`, the
// code `VirtioIommu::fences_due` runs), takes the guest's page away (the
// model's `fenced` flag: from then on the DMA writes a page the guest no
// longer sees) and completes the fence. No DMA may write the guest's page
// after the reply, whether the drain ends by the pin's release or by the
// fence, and no release may be counted twice.

use crate::fence::Fence;

/// What the fencer does with the fence it claims.
#[derive(Clone, Copy, PartialEq)]
enum Fencer {
    /// Fences the page, then completes the fence.
    Completes,
    /// Cannot fence: drops the fence.
    Fails,
}

fn fence_model(fencer: Fencer) {
    counted_model(move || {
        let mut s = space();
        let ep = attached(&mut s);
        let reclaimed = Arc::new(AtomicBool::new(false));
        let fenced = Arc::new(AtomicBool::new(false));
        let (_, at) = ep
            .pin(0, 0x1000, 8, Permissions::Write, Some(hook(|| {})))
            .expect("mapped");
        let dev = {
            let (ep, reclaimed, fenced) = (ep.clone(), reclaimed.clone(), fenced.clone());
            thread::spawn(move || {
                // The uncancellable DMA, still writing.
                for _ in 0..2 {
                    assert!(
                        !reclaimed.load(SeqCst) || fenced.load(SeqCst),
                        "DMA wrote the guest's page after the reply"
                    );
                    thread::yield_now();
                }
                ep.release(at);
            })
        };
        let out = s.unmap(5, 0x1000, 0x1fff);
        assert_eq!(out.status, Status::Ok);
        let fencing = out.drain.clone().map(|d| {
            let fenced = fenced.clone();
            let shared = s.shared.clone();
            thread::spawn(move || {
                if let Some(f) = Fence::claim([&d], &shared, [&ep], std::time::Duration::ZERO) {
                    assert_eq!(f.ranges()[0].gpa, 0x9000);
                    if fencer == Fencer::Completes {
                        // The guest's page is replaced before the fence
                        // completes.
                        fenced.store(true, SeqCst);
                        f.complete();
                    }
                }
            })
        });
        if let Some(d) = &out.drain {
            d.wait();
        }
        // Reply published: the guest reuses its page.
        reclaimed.store(true, SeqCst);
        dev.join().unwrap();
        if let Some(t) = fencing {
            t.join().unwrap();
        }
        if let Some(d) = &out.drain {
            assert_eq!(d.remaining(), 0, "a release was counted twice");
        }
    });
}

#[test]
fn a_reply_follows_the_release_or_the_fence_of_every_pin() {
    fence_model(Fencer::Completes);
}

#[test]
fn a_failed_fence_leaves_the_reply_waiting_for_the_release() {
    fence_model(Fencer::Fails);
}

/// The checker can fail: a fence that lets the pin go when it claims it,
/// before the guest's page is replaced, is caught.
#[test]
#[should_panic(expected = "after the reply")]
fn releasing_at_claim_time_is_caught() {
    with_broken(&crate::tracker::broken::FENCE_RELEASES_AT_CLAIM, || {
        fence_model(Fencer::Completes)
    });
}

/// The gate model: the stuck pin is held throughout; while the fencer
/// claims it, fences the page and completes, a second device pins the
/// same guest page through another IOVA (revocably: a block request) and
/// notes which generation of the page its DMA would write (the fencer
/// replaces generation 0 by generation 1). A pin that writes generation 0
/// after the page was replaced must have been revoked and must report
/// `fenced` (its request ends with an error instead of reporting data the
/// guest cannot see).
fn fence_gate_model() {
    counted_model(|| {
        let mut s = space();
        let ep = attached(&mut s);
        assert_eq!(
            s.map(5, 0x3000, 0x3fff, 0x9000, crate::MapFlags::READ_WRITE),
            Status::Ok
        );
        let (_, stuck) = ep
            .pin(0, 0x1000, 8, Permissions::Write, Some(hook(|| {})))
            .unwrap();
        let generation = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        let told = Arc::new(AtomicBool::new(false));
        let dev = {
            let (ep, generation, told) = (ep.clone(), generation.clone(), told.clone());
            thread::spawn(move || {
                let revoke = {
                    let told = told.clone();
                    hook(move || told.store(true, SeqCst))
                };
                match ep.pin(1, 0x3000, 8, Permissions::Write, Some(revoke)) {
                    Ok((_, at)) => {
                        // The I/O is issued: it pins this generation.
                        let mine = generation.load(SeqCst);
                        thread::yield_now();
                        if mine == 0 && generation.load(SeqCst) == 1 {
                            assert!(told.load(SeqCst), "DMA into a fenced page was not revoked");
                            // Its data went to the old page if the I/O
                            // could not be cancelled: it must not report
                            // success.
                            assert!(ep.fenced(at), "DMA into a fenced page reports success");
                        }
                        ep.release(at);
                    }
                    Err(e) => assert_eq!(e, crate::TranslateError::Fenced),
                }
            })
        };
        let out = s.unmap(5, 0x1000, 0x1fff);
        let d = out.drain.expect("the stuck pin holds the UNMAP");
        let f = Fence::claim([&d], &s.shared, [&ep], std::time::Duration::ZERO)
            .expect("the stuck pin is claimed");
        generation.store(1, SeqCst);
        f.complete();
        d.wait();
        dev.join().unwrap();
        ep.release(stuck);
    });
}

#[test]
fn a_pin_on_a_page_being_fenced_is_refused_or_revoked() {
    fence_gate_model();
}

/// The write-section model: the stuck pin's holder and a second device
/// whose pin shares the page (another IOVA) each write the page through
/// the guest's address space in a write section (a status byte, a bounce
/// copy), while the fencer claims the stuck pin, replaces the page
/// (generation 0 by 1) and completes. A section must see one generation
/// from its start to its end and that generation must be 0: no write
/// lands while the fence copies the page, or after it replaced it.
fn write_section_model() {
    counted_model(|| {
        let mut s = space();
        let ep = attached(&mut s);
        assert_eq!(
            s.map(5, 0x3000, 0x3fff, 0x9000, crate::MapFlags::READ_WRITE),
            Status::Ok
        );
        let (_, stuck) = ep
            .pin(0, 0x1000, 8, Permissions::Write, Some(hook(|| {})))
            .unwrap();
        let (_, other) = ep
            .pin(1, 0x3000, 8, Permissions::Write, Some(hook(|| {})))
            .unwrap();
        let generation = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        let writer = |at| {
            let (ep, generation) = (ep.clone(), generation.clone());
            thread::spawn(move || {
                if ep.open_write(at) {
                    let first = generation.load(SeqCst);
                    thread::yield_now();
                    let last = generation.load(SeqCst);
                    assert_eq!(
                        (first, last),
                        (0, 0),
                        "a write section ran while or after a fence replaced its page"
                    );
                    ep.close_write(at);
                }
            })
        };
        let (a, b) = (writer(stuck), writer(other));
        let out = s.unmap(5, 0x1000, 0x1fff);
        let d = out.drain.expect("the stuck pin holds the UNMAP");
        let f = Fence::claim([&d], &s.shared, [&ep], std::time::Duration::ZERO)
            .expect("the stuck pin is claimed");
        generation.store(1, SeqCst);
        f.complete();
        d.wait();
        a.join().unwrap();
        b.join().unwrap();
        ep.release(stuck);
        ep.release(other);
    });
}

#[test]
fn a_write_section_ends_before_a_fence_copies_its_page_or_never_opens() {
    write_section_model();
}

/// The checker can fail: a fence that does not wait for open write
/// sections is caught.
#[test]
#[should_panic(expected = "while or after a fence replaced its page")]
fn a_fence_ignoring_open_write_sections_is_caught() {
    with_broken(&crate::tracker::broken::SECTIONS_IGNORED, || {
        write_section_model()
    });
}

/// The checker can fail: a pin on a fenced page that reports success
/// is caught.
#[test]
#[should_panic(expected = "reports success")]
fn a_pin_sharing_a_fenced_page_that_reports_success_is_caught() {
    with_broken(&crate::tracker::broken::COLLATERAL_UNREPORTED, || {
        fence_gate_model()
    });
}

/// The checker can fail: pins that ignore the gate are caught.
#[test]
#[should_panic(expected = "was not revoked")]
fn a_pin_ignoring_the_gate_is_caught() {
    with_broken(&crate::tracker::broken::FENCE_GATE_OFF, || {
        fence_gate_model()
    });
}
