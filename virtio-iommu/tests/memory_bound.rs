//! The host memory a guest can make one device hold, with the default
//! limits: every guest-growable table is filled to its limit through the
//! real request and translation paths, and the growth of this process's
//! resident set is read from `/proc/self/status` (VmRSS) after each step.
//!
//! What a guest can grow, and what bounds it:
//! - domains: ATTACH creates one; a domain lives while an endpoint is
//!   attached, so at most min(`max_domains`, endpoints);
//! - mappings: MAP, at most `max_mappings_total` over all domains (the
//!   worst case is single-page mappings, which are also indexed by page);
//! - pins: DMA in flight through a device, at most `max_pins_per_endpoint`
//!   per endpoint (a device reaches that only with that many buffers in
//!   flight: a 16-queue virtio-blk with 1024 descriptors per queue);
//! - IOTLB entries (the `vm_memory::Iommu` path's cache): at most
//!   `IOTLB_CAPACITY` per endpoint;
//! - pending faults: at most `max_pending_faults`.
//!
//! Endpoints are the VMM's (one per device behind the IOMMU), not the
//! guest's; the test registers `max_domains` of them so that the guest can
//! fill the domain limit, and fills pins and IOTLB to their limits on
//! [`BUSY_DEVICES`] of them.
//!
//! The figures are in `docs/architecture.md` (`cargo test --release -p
//! virtio-iommu --test memory_bound -- --nocapture`); the assertion is
//! the documented bound, [`BOUND_MIB`].

use virtio_iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use virtio_iommu::testing::Harness;
use virtio_iommu::translate::IOTLB_CAPACITY;
use virtio_iommu::IommuConfig;
use vm_memory::{GuestAddress, Permissions};

/// The documented bound on what a guest can make one device hold with the
/// default limits (`docs/architecture.md`).
const BOUND_MIB: u64 = 64;
/// Endpoints whose devices hold pins and IOTLB entries at their limits.
const BUSY_DEVICES: usize = 8;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn filling_every_limit_stays_under_the_documented_bound() {
    let config = IommuConfig::default();
    let limits = config.limits;
    let mut h = Harness::new(config);
    let base = rss_bytes();
    let mut step = base;
    let mut report = |what: &str, n: usize| {
        let now = rss_bytes();
        let d = now.saturating_sub(step);
        eprintln!(
            "memory_bound: {what}: {n} -> +{:.1} MiB ({} B each)",
            mib(d),
            d / n.max(1) as u64
        );
        step = now;
    };

    let endpoints = limits.max_domains.min(limits.max_endpoints);
    let mut handles = Vec::with_capacity(endpoints);
    for ep in 0..endpoints as u32 {
        handles.push(h.dev.add_endpoint(ep).expect("endpoint"));
    }
    report("endpoints (the VMM's)", endpoints);

    for ep in 0..endpoints as u32 {
        assert_eq!(h.attach(ep + 1, ep, 0), Some(virtio_iommu::Status::Ok));
    }
    report("domains", endpoints);

    // Single-page mappings, in the busy devices' domains, up to the total.
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    let per_domain = limits.max_mappings_total.div_ceil(BUSY_DEVICES);
    let mut mapped = 0usize;
    'fill: for d in 0..BUSY_DEVICES as u32 {
        for i in 0..per_domain as u64 {
            if mapped == limits.max_mappings_total {
                break 'fill;
            }
            let iova = i << 12;
            let st = h.map(d + 1, iova, iova + 0xfff, 0x10_0000 + ((i % 256) << 12), rw);
            assert_eq!(st, Some(virtio_iommu::Status::Ok), "mapping {mapped}");
            mapped += 1;
        }
    }
    // One more is refused: the limit holds.
    assert_eq!(
        h.map(1, 1 << 40, (1 << 40) + 0xfff, 0x10_0000, rw),
        Some(virtio_iommu::Status::NoMem)
    );
    report("mappings (single pages)", mapped);

    // The busy devices' IOTLBs: every page of their domain translated
    // through `vm_memory::Iommu` (the cache empties itself at capacity).
    for ep in &handles[..BUSY_DEVICES] {
        for i in 0..(IOTLB_CAPACITY as u64 + 100).min(per_domain as u64) {
            let it = vm_memory::Iommu::translate(ep, GuestAddress(i << 12), 8, Permissions::Read)
                .expect("translate");
            assert_eq!(it.count(), 1);
        }
    }
    report("IOTLB entries", BUSY_DEVICES * IOTLB_CAPACITY);

    // The busy devices' pins, at the limit (each mapping of their domain
    // pinned, several times over).
    let mut pins = Vec::with_capacity(BUSY_DEVICES * limits.max_pins_per_endpoint);
    for ep in &handles[..BUSY_DEVICES] {
        for n in 0..limits.max_pins_per_endpoint {
            let page = (n % per_domain) as u64;
            pins.push(
                ep.pin(page << 12, 4096, Permissions::ReadWrite)
                    .expect("pin"),
            );
        }
        assert!(
            ep.pin(0, 4096, Permissions::Read).is_err(),
            "the pin limit holds"
        );
    }
    report("pins", pins.len());

    // Faults: translations of unmapped IOVAs, never delivered.
    for i in 0..limits.max_pending_faults as u64 * 2 {
        let _ = handles[BUSY_DEVICES].translate((1 << 40) + (i << 12), 1, Permissions::Read);
    }
    report("pending faults", limits.max_pending_faults);

    let total = rss_bytes().saturating_sub(base);
    eprintln!(
        "memory_bound: total +{:.1} MiB with the default limits (bound {BOUND_MIB} MiB)",
        mib(total)
    );
    assert!(
        total <= BOUND_MIB << 20,
        "a guest made the device hold {:.1} MiB, over the documented {BOUND_MIB} MiB",
        mib(total)
    );
    drop(pins);
}
