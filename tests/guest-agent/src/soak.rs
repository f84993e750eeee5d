//! soak: everything at once, for `secs` seconds.
//!
//! - verified O_DIRECT I/O through the kernel's virtio-blk driver on every
//!   disk labelled `io*` (two threads per disk, iommu=on and off);
//! - VFIO churn on `churn`: map, write, read back, verify, unmap;
//! - dma-race rounds on `race` (its READs held in flight by the VMM's
//!   `delay_us`), cycling through the unmap, detach, reset and ring
//!   variants: UNMAP/DETACH races, device resets and ring revocations
//!   (DEVICE_NEEDS_RESET, recovered by a reset).
//!
//! Any error, data mismatch or write after an UNMAP ends the run with a
//! failure. A `soak-progress` line every `progress_s` seconds (30) says
//! what has been done; the host side reads the VMM's resident set and
//! thread count over the same time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::disks::{self, Disk, RESERVED_BYTES};
use crate::scenarios::{
    churn_blocks, churn_cycle, integrity_worker, mix, race_detach, race_reset, race_ring,
    race_unmap, reserve_hugepages, seed_from_time, RaceCfg, RaceStats, Rng, RING_IOVA,
};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{HugeBuf, VirtioBlk, HUGE_PAGE};
use crate::{phase, say, Params, Res};

const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Counters {
    io_bytes: AtomicU64,
    churn_cycles: AtomicU64,
    race_rounds: AtomicU64,
    violations: AtomicU64,
    needs_reset: AtomicU64,
    no_window: AtomicU64,
}

/// Runs `body` in a loop until the deadline or a failure elsewhere; the
/// first error stops every loop and is kept.
fn until(
    deadline: Instant,
    stop: &AtomicBool,
    first_err: &Mutex<Option<String>>,
    what: &str,
    mut body: impl FnMut(u64) -> Res<()>,
) {
    let mut i = 0;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Err(e) = body(i) {
            stop.store(true, Ordering::Relaxed);
            first_err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(format!("{what}: {e}"));
            return;
        }
        i += 1;
    }
}

fn io_loop<'a>(
    disk: &'a Disk,
    region: (u64, u64),
    seed: u64,
    c: &'a Counters,
) -> impl FnMut(u64) -> Res<()> + 'a {
    move |i| {
        let s = integrity_worker(disk, region, 2 * MIB, mix(seed ^ i))?;
        c.io_bytes.fetch_add(s.written + s.read, Ordering::Relaxed);
        Ok(())
    }
}

fn race_round(bdf: &str, cfg: &RaceCfg, data: &HugeBuf, i: u64, c: &Counters) -> Res<()> {
    let variant = ["unmap", "detach", "reset", "ring"][(i % 4) as usize];
    let first = i * 1000;
    let st: RaceStats = match variant {
        "unmap" => race_unmap(bdf, cfg, data, first)?,
        "detach" => race_detach(bdf, cfg, data, first)?,
        "reset" => race_reset(bdf, cfg, data, first)?,
        _ => race_ring(bdf, cfg, data, first)?,
    };
    c.race_rounds.fetch_add(st.rounds, Ordering::Relaxed);
    c.violations.fetch_add(st.violations, Ordering::Relaxed);
    c.needs_reset
        .fetch_add(st.needs_reset.unwrap_or(0), Ordering::Relaxed);
    if st.inflight_at_unmap == 0 {
        c.no_window.fetch_add(1, Ordering::Relaxed);
    }
    if st.violations > 0 {
        return Err(format!(
            "{variant}: {} writes after the reply in {} rounds",
            st.violations, st.rounds
        ));
    }
    Ok(())
}

pub fn soak(p: &Params) -> Res<String> {
    let secs = p.num("secs", 180);
    let progress = Duration::from_secs(p.num("progress_s", 30).max(1));
    let all = disks::discover(p.num("ndisks", 0) as usize)?;
    let io: Vec<Disk> = all
        .iter()
        .filter(|d| d.id.starts_with("io"))
        .cloned()
        .collect();
    if io.is_empty() {
        return Err("no io* disks".into());
    }
    let churn_disk = disks::pick(&all, Some("churn"), true)?;
    let race_disk = disks::pick(&all, Some("race"), true)?;
    reserve_hugepages(p.num("hugepages", 32))?;
    phase("soak: bind", 0);
    bind_vfio_pci(&churn_disk.bdf)?;
    bind_vfio_pci(&race_disk.bdf)?;
    let rounds = p.num("race_rounds", 5);
    let cfg = RaceCfg {
        rounds,
        detach_rounds: rounds,
        ring_rounds: rounds,
        reset_rounds: rounds,
        race_len: MIB as usize,
        filler_len: MIB as usize,
        pause: Duration::from_millis(p.num("pause_ms", 20)),
        settle: Duration::from_millis(p.num("settle_ms", 200)),
        capacity: race_disk.size,
        snapshot_wait: None,
    };

    let t = Instant::now();
    let deadline = t + Duration::from_secs(secs);
    let stop = AtomicBool::new(false);
    let first_err = Mutex::new(None);
    let c = Counters::default();
    let seed = seed_from_time();
    say(&format!(
        "soak-start secs={secs} io={} churn={} race={}",
        io.iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        churn_disk.name,
        race_disk.name
    ));
    std::thread::scope(|sc| {
        for (di, d) in io.iter().enumerate() {
            let usable = d.size.saturating_sub(RESERVED_BYTES);
            let half = usable / 2 / MIB * MIB;
            for ti in 0..2u64 {
                let region = (RESERVED_BYTES + ti * half, half);
                let s = mix(seed ^ ((di as u64) << 32) ^ ti);
                let (stop, first_err, c) = (&stop, &first_err, &c);
                sc.spawn(move || until(deadline, stop, first_err, "io", io_loop(d, region, s, c)));
            }
        }
        sc.spawn(|| {
            // Each thread owns its buffers (guest memory the device uses).
            let opened = HugeBuf::new(HUGE_PAGE).and_then(|data| {
                let dev = VirtioBlk::open(&churn_disk.bdf, RING_IOVA)?;
                let blocks = churn_blocks(&dev)?;
                Ok((dev, blocks, data))
            });
            let mut dev = match opened {
                Ok(d) => d,
                Err(e) => return until(deadline, &stop, &first_err, "churn", |_| Err(e.clone())),
            };
            let mut rng = Rng::new(mix(seed ^ 0xc4));
            until(deadline, &stop, &first_err, "churn", |i| {
                churn_cycle(&mut dev.0, &dev.2, &mut rng, i, dev.1)?;
                c.churn_cycles.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            if let Err(e) = dev.0.reset() {
                first_err
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(format!("churn: reset: {e}"));
            }
        });
        sc.spawn(|| {
            let data = match HugeBuf::new(HUGE_PAGE) {
                Ok(d) => d,
                Err(e) => return until(deadline, &stop, &first_err, "race", |_| Err(e.clone())),
            };
            until(deadline, &stop, &first_err, "race", |i| {
                race_round(&race_disk.bdf, &cfg, &data, i, &c)
            })
        });
        let mut next = t + progress;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() >= next {
                next += progress;
                say(&format!(
                    "soak-progress t={} io_mib={} churn_cycles={} race_rounds={} violations={}",
                    t.elapsed().as_secs(),
                    c.io_bytes.load(Ordering::Relaxed) / MIB,
                    c.churn_cycles.load(Ordering::Relaxed),
                    c.race_rounds.load(Ordering::Relaxed),
                    c.violations.load(Ordering::Relaxed)
                ));
            }
        }
    });
    let line = format!(
        "secs={} io_mib={} churn_cycles={} race_rounds={} violations={} needs_reset={} \
         rounds_without_window={}",
        t.elapsed().as_secs(),
        c.io_bytes.load(Ordering::Relaxed) / MIB,
        c.churn_cycles.load(Ordering::Relaxed),
        c.race_rounds.load(Ordering::Relaxed),
        c.violations.load(Ordering::Relaxed),
        c.needs_reset.load(Ordering::Relaxed),
        c.no_window.load(Ordering::Relaxed),
    );
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(format!("{line} error={e}"));
    }
    Ok(line)
}
