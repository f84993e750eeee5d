//! Stress test of blocking invalidation with a checker that can fail.
//!
//! Worker threads act as endpoint devices: they pin a 4 KiB IOVA range,
//! write a pattern through the host pointer (slowly, word by word) and
//! release. The main thread acts as the driver: it UNMAPs a slot through
//! the real request queue and, as soon as the reply is in the used ring,
//! takes the page back and writes a canary over it. Pages rest in a free
//! pool for a while before they are mapped again; before reuse (and at the
//! end) the checker verifies the canary. Any write that happened after the
//! UNMAP reply changes the canary: a violation.
//!
//! `STRESS_ROUNDS` sets the number of UNMAP rounds (default 20 000 in
//! release, 2 000 in a debug build).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_iommu::testing::Harness;
use virtio_iommu::{IommuConfig, Status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, Permissions};

const EP: u32 = 1;
const SLOTS: u64 = 8;
const PAGES: u64 = 32;
const IOVA_BASE: u64 = 0x100_0000;
const PAGE_BASE: u64 = 0x40_0000;
const WORDS: usize = 512;

struct Result {
    rounds: u64,
    violations: u64,
    pins: u64,
    drains: u64,
}

fn canary(page: u64, round: u64) -> u64 {
    0xc0de_0000_0000_0000 | (page << 32) | (round & 0xffff_ffff)
}

/// The checker's pages: a page whose UNMAP replied is filled with a
/// canary and rests in the pool before it is mapped again; a changed
/// canary is a write after the reply (a violation).
struct PagePool {
    resting: VecDeque<(u64, u64)>,
    rest: u64,
    next_fresh: u64,
    violations: u64,
}

impl PagePool {
    /// Pages are reused once `rest` others are resting.
    fn new(rest: u64) -> Self {
        PagePool {
            resting: VecDeque::new(),
            rest,
            next_fresh: 0,
            violations: 0,
        }
    }

    fn gpa(page: u64) -> GuestAddress {
        GuestAddress(PAGE_BASE + page * 0x1000)
    }

    /// The UNMAP of `page` replied in `round`: the page is the checker's.
    fn take_back(&mut self, h: &Harness, page: u64, round: u64) {
        let c = canary(page, round);
        let fill: Vec<u8> = std::iter::repeat_n(c.to_le_bytes(), WORDS)
            .flatten()
            .collect();
        h.mem.write_slice(&fill, Self::gpa(page)).unwrap();
        self.resting.push_back((page, c));
    }

    fn check(&mut self, h: &Harness, page: u64, c: u64) {
        let mut buf = [0u8; WORDS * 8];
        h.mem.read_slice(&mut buf, Self::gpa(page)).unwrap();
        let intact = buf
            .chunks_exact(8)
            .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == c);
        self.violations += u64::from(!intact);
    }

    /// A page to map next: the longest-resting one (its canary checked),
    /// or a fresh one while few are resting.
    fn next(&mut self, h: &Harness) -> u64 {
        if self.resting.len() as u64 >= self.rest {
            let (page, c) = self.resting.pop_front().unwrap();
            self.check(h, page, c);
            page
        } else {
            self.next_fresh += 1;
            assert!(self.next_fresh <= PAGES, "page pool exhausted");
            self.next_fresh - 1
        }
    }

    /// Checks the pages still resting; the violations found in all.
    fn finish(mut self, h: &Harness) -> u64 {
        while let Some((page, c)) = self.resting.pop_front() {
            self.check(h, page, c);
        }
        self.violations
    }
}

fn run(rounds: u64, workers: usize, skip_drains: bool) -> Result {
    let mut h = Harness::new(IommuConfig {
        drain: !skip_drains,
        ..Default::default()
    });
    let ep = h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));

    let stop = Arc::new(AtomicBool::new(false));
    let pins = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..workers {
        let ep = ep.clone();
        let mem = h.mem.clone();
        let stop = stop.clone();
        let pins = pins.clone();
        threads.push(std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let slot = x % SLOTS;
                let Ok(pin) = ep.pin(IOVA_BASE + slot * 0x1000, 0x1000, Permissions::Write) else {
                    continue;
                };
                pins.fetch_add(1, Ordering::Relaxed);
                let gpa = pin.contiguous_gpa().unwrap();
                let page = mem.get_slice(GuestAddress(gpa), 0x1000).unwrap();
                for i in 0..WORDS {
                    // Volatile stores through the host mapping of the page.
                    page.write_obj(0xd0_0000 | w as u64, i * 8).unwrap();
                    std::hint::spin_loop();
                }
                drop(pin);
                // Leave the core to the driver thread now and then: with
                // more threads than cores, pure spinners starve it.
                if x & 15 == 0 {
                    std::thread::yield_now();
                }
            }
        }));
    }

    let mut pool = PagePool::new(PAGES - SLOTS);
    let mut mapped: Vec<Option<u64>> = vec![None; SLOTS as usize];
    for round in 0..rounds {
        let slot = (round % SLOTS) as usize;
        let iova = IOVA_BASE + slot as u64 * 0x1000;
        // Give the workers a chance to be mid-DMA when the UNMAP lands.
        for _ in 0..64 {
            if ep.pins_in_flight() > 0 {
                break;
            }
            std::thread::yield_now();
        }
        if let Some(page) = mapped[slot].take() {
            // UNMAP through the queue; wait for the reply like a driver.
            let st = unmap_and_wait(&mut h, iova);
            assert_eq!(st, Status::Ok as u8);
            // The reply is out: the page is the checker's now.
            pool.take_back(&h, page, round);
        }
        // Map a page that has rested in the pool (verified first).
        let page = pool.next(&h);
        assert_eq!(
            h.map(1, iova, iova + 0xfff, PAGE_BASE + page * 0x1000, 3),
            Some(Status::Ok)
        );
        mapped[slot] = Some(page);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    Result {
        rounds,
        violations: pool.finish(&h),
        pins: pins.load(Ordering::Relaxed),
        drains: h.dev.metrics().snapshot().drains,
    }
}

#[test]
fn stress_no_write_lands_after_an_unmap_reply() {
    let rounds = std::env::var("STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        // Unoptimised builds are ~10x slower; `ci/test` runs this file in release.
        .unwrap_or(if cfg!(debug_assertions) {
            2_000
        } else {
            20_000
        });
    let t = Instant::now();
    let r = run(rounds, 2, false);
    println!(
        "stress: rounds={} violations={} pins={} drains={} in {:.1?}",
        r.rounds,
        r.violations,
        r.pins,
        r.drains,
        t.elapsed()
    );
    assert_eq!(r.violations, 0);
    assert!(
        r.pins > 0,
        "workers never got a pin: the test tested nothing"
    );
}

#[test]
fn stress_checker_catches_a_device_that_does_not_drain() {
    // Violations need a worker caught mid-write by the reply: keep going
    // in batches until the checker sees one (it does within the first
    // batch in practice), but not forever.
    let mut total = Result {
        rounds: 0,
        violations: 0,
        pins: 0,
        drains: 0,
    };
    for _ in 0..20 {
        let r = run(2_000, 2, true);
        total.rounds += r.rounds;
        total.violations += r.violations;
        total.pins += r.pins;
        if total.violations > 0 {
            break;
        }
    }
    println!(
        "stress (drain disabled): rounds={} violations={} pins={}",
        total.rounds, total.violations, total.pins
    );
    assert!(
        total.violations > 0,
        "the checker missed writes after the reply"
    );
}

// ------------------------------------------------------------- rings
//
// The same checker for leased queue areas. Workers act as a device's
// queue threads: they take the current lease of a "used ring" page, open
// an access section through `QueueMemory` and write entries (word by
// word) through the cached translation. The main thread maps the ring
// IOVA onto a page from the pool, leases it, lets the workers use it,
// UNMAPs it through the request queue and canaries the page at the reply.
// A write through the lease after the reply breaks a canary.

const RING_IOVA: u64 = 0x200_0000;

/// UNMAPs the page at `iova` through the request queue and waits for the
/// reply like a driver; returns its status.
fn unmap_and_wait(h: &mut Harness, iova: u64) -> u8 {
    h.post(
        0,
        4,
        &virtio_iommu::testing::unmap_body(1, iova, iova + 0xfff),
    );
    h.wait_reply();
    h.posted_status(0)
}

fn run_rings(rounds: u64, workers: usize, drain: bool) -> Result {
    use std::sync::Mutex;
    use virtio_iommu::{AreaSpec, QueueAreas};

    let mut h = Harness::new(IommuConfig {
        drain,
        ..Default::default()
    });
    let ep = h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    let current: Arc<Mutex<Option<Arc<QueueAreas>>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let sections = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..workers {
        let (current, stop, sections) = (current.clone(), stop.clone(), sections.clone());
        let phys = h.mem.clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let areas = current.lock().unwrap().clone();
                let Some(mem) = areas.as_ref().and_then(|a| a.memory(&phys)) else {
                    std::thread::yield_now();
                    continue;
                };
                for i in 0..WORDS as u64 {
                    mem.write_obj(0xe0_0000 | w as u64, GuestAddress(RING_IOVA + i * 8))
                        .unwrap();
                    std::hint::spin_loop();
                }
                drop(mem);
                sections.fetch_add(1, Ordering::Relaxed);
                n += 1;
                if n & 15 == 0 {
                    std::thread::yield_now();
                }
            }
        }));
    }

    let mut pool = PagePool::new(PAGES / 2);
    for round in 0..rounds {
        let page = pool.next(&h);
        assert_eq!(
            h.map(
                1,
                RING_IOVA,
                RING_IOVA + 0xfff,
                PAGE_BASE + page * 0x1000,
                3
            ),
            Some(Status::Ok)
        );
        let areas = ep
            .lease_queue_areas(
                &[AreaSpec {
                    iova: RING_IOVA,
                    len: 0x1000,
                    access: Permissions::Write,
                }],
                Arc::new(|| {}),
            )
            .unwrap();
        *current.lock().unwrap() = Some(Arc::new(areas));
        // Let a worker be mid-section when the UNMAP lands.
        let seen = sections.load(Ordering::Relaxed);
        for _ in 0..256 {
            if sections.load(Ordering::Relaxed) > seen {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(unmap_and_wait(&mut h, RING_IOVA), Status::Ok as u8);
        *current.lock().unwrap() = None;
        pool.take_back(&h, page, round);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    Result {
        rounds,
        violations: pool.finish(&h),
        pins: sections.load(Ordering::Relaxed),
        drains: h.dev.metrics().snapshot().drains,
    }
}

#[test]
fn stress_rings_no_write_lands_after_an_unmap_reply() {
    let rounds = std::env::var("STRESS_RING_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 500 } else { 5_000 });
    let t = Instant::now();
    let r = run_rings(rounds, 2, true);
    println!(
        "stress rings: rounds={} violations={} sections={} drains={} in {:.1?}",
        r.rounds,
        r.violations,
        r.pins,
        r.drains,
        t.elapsed()
    );
    assert_eq!(r.violations, 0);
    assert!(r.pins > 0, "no section ever ran: the test tested nothing");
    assert!(r.drains > 0, "no UNMAP ever caught a section open");
}

#[test]
fn stress_rings_checker_catches_a_device_that_does_not_drain() {
    let mut rounds = 0;
    let mut violations = 0;
    for _ in 0..20 {
        let r = run_rings(500, 2, false);
        rounds += r.rounds;
        violations += r.violations;
        if violations > 0 {
            break;
        }
    }
    println!("stress rings (drain disabled): rounds={rounds} violations={violations}");
    assert!(
        violations > 0,
        "the checker missed ring writes after the reply"
    );
}
