//! Ring access cost of an endpoint device: leased queue areas against
//! guest-physical memory and against `IommuMemory`, measured in one run.
//!
//! Run: `cargo bench -p virtio-iommu --bench rings [-- ROUNDS]`
//!
//! One operation is one request's ring work: the simulated driver posts a
//! three-descriptor chain (header, 4 KiB data, status); the device pops
//! it, walks it, adds the used entry and checks whether to notify; the
//! driver takes the used entry. The device reaches the rings
//!
//! - `direct`: through guest-physical memory (an `iommu=off` device);
//! - `leased`: through `QueueAreas::memory` (one access section per
//!   request, its enter and exit included);
//! - `iommu_memory`: through `IommuMemory` over the endpoint handle (every
//!   access translated through the IOTLB).
//!
//! The three modes run interleaved, in rounds of 20 000 operations each, so
//! that a noisy host slows them alike; the runner prints each mode's median
//! over rounds (ns per operation) and the ratios to `direct`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use virtio_iommu::testing::{Buf, Harness, TestDriver};
use virtio_iommu::{AreaSpec, IommuConfig, Status};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, IommuMemory};

const EP: u32 = 1;
const RING: u64 = 0x40_0000;
const OPS_PER_ROUND: u32 = 20_000;

/// One request's ring work, generic over how the device reaches memory.
fn op<G: GuestMemory>(
    driver: &mut TestDriver,
    q: &mut Queue,
    phys: &GuestMemoryMmap,
    bufs: &[Buf; 3],
    mem: &G,
) {
    driver.add(phys, bufs).unwrap();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let head = chain.head_index();
    let n = chain.count();
    q.add_used(mem, head, n as u32).unwrap();
    black_box(q.needs_notification(mem).unwrap());
    driver.pop_used(phys).unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let mut h = Harness::new(IommuConfig::default());
    let ep = h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(1, EP, 0), Some(Status::Ok));
    // Identity mappings (the test driver writes by GPA), one per page as
    // Linux makes them.
    for page in 0..16u64 {
        let a = RING + page * 0x1000;
        assert_eq!(h.map(1, a, a + 0xfff, a, 3), Some(Status::Ok));
    }
    let bufs = [
        Buf {
            addr: GuestAddress(RING + 0x8000),
            len: 16,
            write: false,
        },
        Buf {
            addr: GuestAddress(RING + 0x9000),
            len: 4096,
            write: true,
        },
        Buf {
            addr: GuestAddress(RING + 0xa000),
            len: 1,
            write: true,
        },
    ];
    let phys = h.mem.clone();
    let mut driver = TestDriver::new(&phys, GuestAddress(RING), 256);
    let mut q = driver.queue();
    let specs = AreaSpec::split_queue(q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
    let areas = ep.lease_queue_areas(&specs, Arc::new(|| {})).unwrap();
    let iommu_mem: IommuMemory<GuestMemoryMmap, _> =
        IommuMemory::new(phys.clone(), ep.clone(), true, ());

    let mut times: [Vec<f64>; 3] = Default::default();
    let mut run = |mode: usize| {
        let t = Instant::now();
        for _ in 0..OPS_PER_ROUND {
            match mode {
                0 => op(&mut driver, &mut q, &phys, &bufs, &phys),
                1 => {
                    let mem = areas.memory(&phys).unwrap();
                    op(&mut driver, &mut q, &phys, &bufs, &mem);
                }
                _ => op(&mut driver, &mut q, &phys, &bufs, &iommu_mem),
            }
        }
        t.elapsed().as_nanos() as f64 / f64::from(OPS_PER_ROUND)
    };
    // Warm-up, then the measured rounds.
    for mode in 0..3 {
        run(mode);
    }
    for r in 0..rounds {
        // Rotate the order so that no mode always runs first.
        for k in 0..3 {
            let mode = (r + k) % 3;
            times[mode].push(run(mode));
        }
    }
    let [direct, leased, iommu] = &mut times;
    let (d, l, i) = (median(direct), median(leased), median(iommu));
    println!("ring access per request ({rounds} rounds x {OPS_PER_ROUND} ops, medians):");
    println!("  direct        {d:8.1} ns");
    println!("  leased        {l:8.1} ns   {:.2}x direct", l / d);
    println!(
        "  iommu_memory  {i:8.1} ns   {:.2}x direct   (leased = {:.2}x iommu_memory)",
        i / d,
        l / i
    );
}
