//! Benchmarks of the request path and of the translation hot path.
//!
//! Run: `cargo bench -p virtio-iommu --bench device`
//!
//! - `queue/map+unmap`: a MAP and an UNMAP through the real split queue
//!   (available ring, pop, parse, execute, tail, used ring); one element is
//!   one request.
//! - `unmap/N`: one 4 KiB UNMAP through the queue with N live mappings at
//!   scattered GPAs in the domain, no drain involved.
//! - `translate/pin+release` vs `translate/iotlb_lookup`: 4 KiB among 10k
//!   mappings with scattered GPAs, and `vm_memory::Iotlb` over the same
//!   entries, in the same run.
//! - `translate/pin+release x2 threads`: two threads on two endpoints in
//!   two domains at once; the time is per pin per thread. `..., one
//!   endpoint`: both threads on one endpoint (one multi-queue disk), each
//!   in its own pin shard (the tracker gives each thread one).
//! - `drain/reply_after_release`: from the moment another thread releases
//!   the last pin to the reply in the used ring, with the device thread
//!   blocked in epoll on the drain eventfd like a VMM event loop; and the
//!   same with the device thread polling (`VirtioIommu::poll_parked`).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_iommu::testing::{map_body, place_request, unmap_body, Buf, Harness, BUF_BASE};
use virtio_iommu::{EndpointHandle, IommuConfig, Status};
use vm_memory::{Bytes, GuestAddress, Iotlb, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const EP: u32 = 1;
/// Prefilled mappings live here, clear of the MSI window and bench IOVAs.
const PREFILL: u64 = 1 << 40;
/// IOVA of the drain-latency bench's mapping.
const DRAIN_IOVA: u64 = 0x2_0000_0000;

fn harness() -> Harness {
    let mut config = IommuConfig::default();
    // `unmap/1000000` holds a million mappings: above the default limits,
    // which bound what a guest can make the device hold (64 MiB).
    config.limits.max_mappings_per_domain = 1 << 21;
    config.limits.max_mappings_total = 1 << 21;
    let mut h = Harness::new(config);
    h.dev.add_endpoint(EP).unwrap();
    h.dev.add_endpoint(EP + 1).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    assert_eq!(h.attach(2, EP + 1, 0), Some(Status::Ok));
    h
}

/// Writes a request at `at` (readable) with its tail at `at + 0x100`.
fn place(h: &Harness, at: u64, type_: u8, body: &[u8]) -> [Buf; 2] {
    place_request(
        &h.mem,
        GuestAddress(at),
        GuestAddress(at + 0x100),
        type_,
        body,
    )
}

/// A scattered GPA for mapping number `i` (nothing merges).
fn scattered_gpa(i: u64) -> u64 {
    ((i.wrapping_mul(0x9e37_79b9) % (1 << 24)) * 2 + 1) << 12
}

/// Maps `n` 4 KiB pages at `PREFILL` in `domain`, GPAs scattered from `seed`.
fn prefill(h: &mut Harness, domain: u32, n: u64, seed: u64) {
    let before = h.dev.address_space().mapping_count() as u64;
    // Fill through the address space's own request path, in one batch per
    // queue's worth of requests.
    let mut i = 0;
    while i < n {
        let batch = (n - i).min(100);
        for k in 0..batch {
            let iova = PREFILL + ((i + k) << 12);
            let bufs = place(
                h,
                BUF_BASE + k * 0x200,
                3,
                &map_body(domain, iova, iova + 0xfff, scattered_gpa(i + k + seed), 3),
            );
            h.req_driver.add(&h.mem, &bufs).unwrap();
        }
        h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
        while h.req_driver.pop_used(&h.mem).is_some() {}
        i += batch;
    }
    assert_eq!(h.dev.address_space().mapping_count() as u64, before + n);
}

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(2));
    let mut h = harness();
    let iova = 0x1_0000_0000u64;
    let map = place(&h, BUF_BASE, 3, &map_body(1, iova, iova + 0xfff, 0x5000, 3));
    let unmap = place(&h, BUF_BASE + 0x1000, 4, &unmap_body(1, iova, iova + 0xfff));
    g.bench_function("map+unmap", |b| {
        b.iter(|| {
            h.req_driver.add(&h.mem, &map).unwrap();
            h.req_driver.add(&h.mem, &unmap).unwrap();
            h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
            black_box(h.req_driver.pop_used(&h.mem));
            black_box(h.req_driver.pop_used(&h.mem));
        })
    });
    let st: u8 = h.mem.read_obj(GuestAddress(BUF_BASE + 0x1100)).unwrap();
    assert_eq!(st, Status::Ok as u8);
    g.finish();
}

fn bench_unmap_scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmap");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    for n in [1_000u64, 100_000, 1_000_000] {
        let mut h = harness();
        prefill(&mut h, 1, n, 0);
        let iova = 0x10_0000_0000u64;
        let map = place(&h, BUF_BASE, 3, &map_body(1, iova, iova + 0xfff, 0x5000, 3));
        let unmap = place(&h, BUF_BASE + 0x1000, 4, &unmap_body(1, iova, iova + 0xfff));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    h.req_driver.add(&h.mem, &map).unwrap();
                    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
                    h.req_driver.pop_used(&h.mem).unwrap();
                    let t = Instant::now();
                    h.req_driver.add(&h.mem, &unmap).unwrap();
                    h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
                    black_box(h.req_driver.pop_used(&h.mem).unwrap());
                    total += t.elapsed();
                }
                total
            })
        });
        assert_eq!(h.dev.address_space().mapping_count() as u64, n);
    }
    g.finish();
}

fn bench_translate(c: &mut Criterion) {
    const N: u64 = 10_000;
    let mut g = c.benchmark_group("translate");
    let mut h = harness();
    prefill(&mut h, 1, N, 0);
    prefill(&mut h, 2, N, 7);
    let ep = h.dev.endpoint(EP).unwrap();
    let mut iotlb = Iotlb::new();
    for i in 0..N {
        iotlb
            .set_mapping(
                GuestAddress(PREFILL + (i << 12)),
                GuestAddress(scattered_gpa(i)),
                4096,
                Permissions::ReadWrite,
            )
            .unwrap();
    }
    let mut k = 0u64;
    g.bench_function("pin+release", |b| {
        b.iter(|| {
            k = (k + 7919) % N;
            let pin = ep
                .pin(PREFILL + (k << 12), 4096, Permissions::Write)
                .unwrap();
            black_box(pin.ranges()[0].gpa);
        })
    });
    g.bench_function("translate(no pin)", |b| {
        b.iter(|| {
            k = (k + 7919) % N;
            black_box(
                ep.translate(PREFILL + (k << 12), 4096, Permissions::Write)
                    .unwrap(),
            );
        })
    });
    g.bench_function("iotlb_lookup", |b| {
        b.iter(|| {
            k = (k + 7919) % N;
            let it = Iotlb::lookup(
                &iotlb,
                GuestAddress(PREFILL + (k << 12)),
                4096,
                Permissions::Write,
            )
            .unwrap();
            for r in it {
                black_box(r.base);
            }
        })
    });
    let ep2 = h.dev.endpoint(EP + 1).unwrap();
    g.bench_function("pin+release x2 threads", |b| {
        b.iter_custom(|iters| two_threads(&ep, &ep2, iters, N))
    });
    // One multi-queue device is one endpoint: every queue's requests pin
    // through it, so its lock is shared.
    g.bench_function("pin+release x2 threads, one endpoint", |b| {
        b.iter_custom(|iters| two_threads(&ep, &ep, iters, N))
    });
    g.finish();
}

/// Two threads pin `iters` times, one on `a` and one on `b` (the same
/// endpoint or two); returns the mean of the two threads' elapsed times
/// (so it is per pin per thread).
fn two_threads(a: &EndpointHandle, b: &EndpointHandle, iters: u64, n: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let run = |ep: EndpointHandle, barrier: Arc<Barrier>, seed: u64| {
        std::thread::spawn(move || {
            barrier.wait();
            let t = Instant::now();
            let mut k = seed;
            for _ in 0..iters {
                k = (k + 7919) % n;
                let pin = ep
                    .pin(PREFILL + (k << 12), 4096, Permissions::Write)
                    .unwrap();
                black_box(pin.ranges()[0].gpa);
            }
            t.elapsed()
        })
    };
    let t1 = run(a.clone(), barrier.clone(), 1);
    let t2 = run(b.clone(), barrier, 2);
    (t1.join().unwrap() + t2.join().unwrap()) / 2
}

fn bench_drain_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("drain");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let mut h = harness();
    let ep = h.dev.endpoint(EP).unwrap();
    let iova = DRAIN_IOVA;
    let map = place(&h, BUF_BASE, 3, &map_body(1, iova, iova + 0xfff, 0x5000, 3));
    let unmap = place(&h, BUF_BASE + 0x1000, 4, &unmap_body(1, iova, iova + 0xfff));
    let epoll = Epoll::new().unwrap();
    use std::os::fd::AsRawFd;
    epoll
        .ctl(
            ControlOperation::Add,
            h.dev.drain_eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    g.bench_function("reply_after_release", |b| {
        b.iter_custom(|iters| {
            reply_latency(&mut h, &ep, &map, &unmap, iters, |_| {
                let mut events = [EpollEvent::default(); 1];
                while epoll.wait(1000, &mut events).unwrap() != 1 {}
            })
        })
    });
    g.bench_function("reply_after_release (polling)", |b| {
        b.iter_custom(|iters| {
            reply_latency(&mut h, &ep, &map, &unmap, iters, |h| {
                while !h.dev.poll_parked(Duration::from_millis(1)) {}
            })
        })
    });
    g.finish();
}

/// Parks an UNMAP behind a pin that another thread releases, waits with
/// `wait`, publishes the reply; returns the summed release-to-reply time.
fn reply_latency(
    h: &mut Harness,
    ep: &EndpointHandle,
    map: &[Buf; 2],
    unmap: &[Buf; 2],
    iters: u64,
    wait: impl Fn(&Harness),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        h.req_driver.add(&h.mem, map).unwrap();
        h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
        h.req_driver.pop_used(&h.mem).unwrap();
        let pin = ep.pin(DRAIN_IOVA, 4096, Permissions::Write).unwrap();
        h.req_driver.add(&h.mem, unmap).unwrap();
        h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
        assert!(h.req_driver.pop_used(&h.mem).is_none(), "must park");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(200));
            let t = Instant::now();
            drop(pin);
            t
        });
        wait(h);
        let _ = h.dev.drain_eventfd().read();
        h.dev.process_requests(&mut h.reqq, &h.mem).unwrap();
        let published = Instant::now();
        h.req_driver.pop_used(&h.mem).unwrap();
        total += published.duration_since(releaser.join().unwrap());
    }
    total
}

criterion_group!(
    benches,
    bench_queue,
    bench_unmap_scaling,
    bench_translate,
    bench_drain_latency
);
criterion_main!(benches);
