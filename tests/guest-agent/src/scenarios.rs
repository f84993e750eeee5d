//! The scenarios. Each returns the extra `key=value` text of its final
//! `AGENT-RESULT` line, or an error (reported as `status=fail`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::disks::{self, Disk, RESERVED_BYTES};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{
    HugeBuf, VirtioBlk, HUGE_PAGE, RINGS_LEN, SCRATCH_LEN, SCRATCH_OFF, STATUS_NEEDS_RESET,
    STATUS_UNTOUCHED, USED_OFF, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::{os_err, phase, say, write_file, Params, Res};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
/// IOVA of the ring page and of the data buffers used over VFIO.
pub(crate) const RING_IOVA: u64 = 0x4000_0000;
pub(crate) const DATA_IOVA: u64 = 0x8000_0000;
/// Headers, status bytes and scratch space when the rings are mapped on
/// their own (dma-race ring).
const BUFS_IOVA: u64 = 0xc000_0000;
pub(crate) const CANARY: u8 = 0xa5;

/// splitmix64: small, good enough, no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn seed_from_time() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    mix(t ^ std::process::id() as u64)
}

/// Fills one 4 KiB page with the pattern for (`seed`, absolute page number).
fn fill_page(buf: &mut [u8], seed: u64, page: u64) {
    for (j, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed ^ (page << 20) ^ j as u64).to_le_bytes());
    }
}

fn page_ok(buf: &[u8], seed: u64, page: u64) -> bool {
    buf.chunks_exact(8)
        .enumerate()
        .all(|(j, w)| w == mix(seed ^ (page << 20) ^ j as u64).to_le_bytes())
}

// ---------------------------------------------------------------- probe

fn viommu_bound() -> Res<String> {
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/bus/virtio/devices") {
        for e in rd.flatten() {
            let p = e.path();
            let id = fs::read_to_string(p.join("device")).unwrap_or_default();
            if u32::from_str_radix(id.trim().trim_start_matches("0x"), 16) != Ok(23) {
                continue;
            }
            let drv = fs::read_link(p.join("driver"))
                .ok()
                .and_then(|d| d.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let pci = fs::canonicalize(&p)
                .ok()
                .and_then(|c| c.parent().map(|q| q.to_path_buf()))
                .and_then(|q| q.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let ids = format!(
                "{}:{}",
                fs::read_to_string(format!("/sys/bus/pci/devices/{pci}/vendor"))
                    .unwrap_or_default()
                    .trim(),
                fs::read_to_string(format!("/sys/bus/pci/devices/{pci}/device"))
                    .unwrap_or_default()
                    .trim()
            );
            found.push((pci, drv, ids));
        }
    }
    match found
        .iter()
        .find(|(_, d, ids)| d == "virtio_iommu" && ids == "0x1af4:0x1057")
    {
        Some((pci, _, _)) => Ok(pci.clone()),
        None => Err(format!(
            "no PCI 1af4:1057 virtio device (id 23) bound to virtio_iommu; seen: {found:?}"
        )),
    }
}

pub fn probe(p: &Params) -> Res<String> {
    phase("probe: viommu", 0);
    let viommu = viommu_bound()?;
    phase("probe: disks", 0);
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    if disks.is_empty() {
        return Err("no labelled test disks found".into());
    }
    let mut on = Vec::new();
    let mut off = Vec::new();
    let mut ids_on = Vec::new();
    let mut ids_off = Vec::new();
    let mut bad = Vec::new();
    for d in &disks {
        let t = disks::group_type(&d.bdf);
        let shown = t.clone().unwrap_or_else(|| "none".into());
        say(&format!(
            "probe disk: name={} id={} iommu={} pci={} group_type={}",
            d.name,
            d.id,
            if d.iommu_on { "on" } else { "off" },
            d.bdf,
            shown
        ));
        if d.iommu_on {
            on.push(d.name.clone());
            ids_on.push(d.id.clone());
            if t.as_deref() != Some("DMA") {
                bad.push(format!("{}:expected-DMA-got-{shown}", d.name));
            }
        } else {
            off.push(d.name.clone());
            ids_off.push(d.id.clone());
            if t.is_some() {
                bad.push(format!("{}:expected-no-group-got-{shown}", d.name));
            }
        }
    }
    if on.is_empty() {
        bad.push("no-iommu-on-disk".into());
    }
    ids_on.sort();
    ids_off.sort();
    let summary = format!(
        "viommu={viommu} disks_on={} disks_off={} ids_on={} ids_off={}",
        on.join(","),
        off.join(","),
        ids_on.join(","),
        ids_off.join(",")
    );
    if bad.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary} problems={}", bad.join(",")))
    }
}

// ------------------------------------------------------------ integrity

/// A page-aligned heap buffer (O_DIRECT through the kernel).
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, len }
    }
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: we own `len` initialised bytes at `ptr`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE).expect("layout");
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

pub(crate) struct WorkerStats {
    pub(crate) written: u64,
    pub(crate) read: u64,
}

pub(crate) fn integrity_worker(
    disk: &Disk,
    region: (u64, u64),
    quota: u64,
    seed: u64,
) -> Res<WorkerStats> {
    let f = disk.open_direct()?;
    let (start, len) = region;
    let pages = len / PAGE as u64;
    let max_pages = 32u64;
    let mut seeds = vec![0u64; pages as usize];
    let mut rng = Rng::new(seed);
    let mut buf = AlignedBuf::new(max_pages as usize * PAGE);
    let mut st = WorkerStats {
        written: 0,
        read: 0,
    };
    let check = |buf: &[u8], first: u64, n: u64, seeds: &[u64]| -> Res<()> {
        for i in 0..n {
            let s = seeds[(first + i) as usize];
            if s == 0 {
                continue;
            }
            let abs = (start / PAGE as u64) + first + i;
            let pg = &buf[i as usize * PAGE..(i as usize + 1) * PAGE];
            if !page_ok(pg, s, abs) {
                return Err(format!(
                    "data mismatch on /dev/{} at byte {}",
                    disk.name,
                    abs * PAGE as u64
                ));
            }
        }
        Ok(())
    };
    while st.written < quota {
        let n = 1 + rng.below(max_pages);
        let first = rng.below(pages - n);
        let s = rng.next_u64() | 1;
        let b = buf.as_mut();
        for i in 0..n {
            let abs = (start / PAGE as u64) + first + i;
            fill_page(&mut b[i as usize * PAGE..(i as usize + 1) * PAGE], s, abs);
            seeds[(first + i) as usize] = s;
        }
        let bytes = n as usize * PAGE;
        f.write_all_at(&b[..bytes], start + first * PAGE as u64)
            .map_err(|e| format!("O_DIRECT write /dev/{}: {e}", disk.name))?;
        st.written += bytes as u64;
        if rng.below(3) == 0 {
            let n = 1 + rng.below(max_pages);
            let first = rng.below(pages - n);
            let bytes = n as usize * PAGE;
            let b = buf.as_mut();
            f.read_exact_at(&mut b[..bytes], start + first * PAGE as u64)
                .map_err(|e| format!("O_DIRECT read /dev/{}: {e}", disk.name))?;
            st.read += bytes as u64;
            check(&b[..bytes], first, n, &seeds)?;
        }
    }
    // Final pass: every page written must read back with its last pattern
    // (runs of written pages only, up to `max_pages` per read).
    let mut first = 0;
    while first < pages {
        if seeds[first as usize] == 0 {
            first += 1;
            continue;
        }
        let mut n = 1;
        while n < max_pages && first + n < pages && seeds[(first + n) as usize] != 0 {
            n += 1;
        }
        let bytes = n as usize * PAGE;
        let b = buf.as_mut();
        f.read_exact_at(&mut b[..bytes], start + first * PAGE as u64)
            .map_err(|e| format!("O_DIRECT read /dev/{}: {e}", disk.name))?;
        st.read += bytes as u64;
        check(&b[..bytes], first, n, &seeds)?;
        first += n;
    }
    Ok(st)
}

pub fn integrity(p: &Params) -> Res<String> {
    let strict = fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == "iommu.strict=1");
    phase("integrity: disks", 0);
    let all = disks::discover(p.num("ndisks", 0) as usize)?;
    phase("integrity: io", 0);
    let disks: Vec<Disk> = all.into_iter().filter(|d| d.id != "slow").collect();
    if disks.is_empty() {
        return Err("no labelled test disks".into());
    }
    let threads = p.num("threads", 4).max(1);
    let total = p.num("mib", 32) * MIB;
    let per_worker = total / (threads * disks.len() as u64);
    let seed = seed_from_time();
    let t = Instant::now();
    let results: Vec<Res<WorkerStats>> = std::thread::scope(|sc| {
        let mut hs = Vec::new();
        for (di, d) in disks.iter().enumerate() {
            let usable = d.size.saturating_sub(RESERVED_BYTES);
            let region_len = (usable / threads) / MIB * MIB;
            if region_len < MIB {
                return vec![Err(format!("/dev/{} too small", d.name))];
            }
            for ti in 0..threads {
                let region = (RESERVED_BYTES + ti * region_len, region_len);
                let s = mix(seed ^ ((di as u64) << 32) ^ ti);
                hs.push(sc.spawn(move || integrity_worker(d, region, per_worker, s)));
            }
        }
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let mut written = 0;
    let mut read = 0;
    for r in results {
        let s = r?;
        written += s.written;
        read += s.read;
    }
    let names: Vec<String> = disks
        .iter()
        .map(|d| format!("{}({})", d.name, if d.iommu_on { "on" } else { "off" }))
        .collect();
    // Request queues the kernel uses per disk (blk-mq hardware queues).
    let queues: Vec<String> = disks
        .iter()
        .map(|d| {
            let n = fs::read_dir(format!("/sys/block/{}/mq", d.name))
                .map(|e| e.count())
                .unwrap_or(0);
            format!("{}:{n}", d.id)
        })
        .collect();
    Ok(format!(
        "disks={} queues={} threads={threads} written_kib={} read_kib={} secs={:.2} strict={}",
        names.join(","),
        queues.join(","),
        written / 1024,
        read / 1024,
        t.elapsed().as_secs_f64(),
        if strict { 1 } else { 0 }
    ))
}

// ------------------------------------------------------------- dma-race

pub(crate) fn reserve_hugepages(n: u64) -> Res<()> {
    let path = "/proc/sys/vm/nr_hugepages";
    let cur: u64 = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if cur < n {
        write_file(path, &n.to_string())?;
    }
    let now: u64 = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if now < n {
        return Err(format!("could reserve only {now} of {n} 2 MiB huge pages"));
    }
    Ok(())
}

#[derive(Default)]
pub(crate) struct RaceStats {
    pub(crate) rounds: u64,
    pub(crate) violations: u64,
    pub(crate) inflight_at_unmap: u64,
    /// Time of the invalidating step: the UNMAP, the close, or the reset.
    unmap_us: Vec<u64>,
    status_ok: u64,
    status_err: u64,
    status_untouched: u64,
    changed_max: usize,
    /// Rounds after which the device status had DEVICE_NEEDS_RESET (ring).
    pub(crate) needs_reset: Option<u64>,
    /// Guest writes into the invalidated pages that did not stick (fence).
    pub(crate) lost_writes: Option<u64>,
}

impl RaceStats {
    fn summary(&self, variant: &str) -> String {
        let mut v = self.unmap_us.clone();
        v.sort_unstable();
        let (min, med, max) = if v.is_empty() {
            (0, 0, 0)
        } else {
            (v[0], v[v.len() / 2], v[v.len() - 1])
        };
        let what = if variant == "reset" {
            "reset_us"
        } else {
            "unmap_us"
        };
        let needs_reset = self
            .needs_reset
            .map(|n| format!(" needs_reset={n}"))
            .unwrap_or_default();
        let lost = self
            .lost_writes
            .map(|n| format!(" lost_writes={n}"))
            .unwrap_or_default();
        format!(
            "dma-race {variant}: rounds={} violations={}{needs_reset}{lost} {what} min/median/max={min}/{med}/{max}",
            self.rounds, self.violations
        )
    }
    fn detail(&self, variant: &str) -> String {
        format!(
            "dma-race-detail {variant}: inflight_at_unmap={} status_ok={} status_err={} status_untouched={} changed_bytes_max={}",
            self.inflight_at_unmap, self.status_ok, self.status_err, self.status_untouched, self.changed_max
        )
    }
    /// Records the time of a round's invalidating step.
    pub(crate) fn push_unmap_us(&mut self, us: u64) {
        self.unmap_us.push(us);
    }

    /// Records a round's canary check: `changed` bytes differ from it.
    pub(crate) fn canary_checked(&mut self, changed: usize) {
        if changed > 0 {
            self.violations += 1;
        }
        self.changed_max = self.changed_max.max(changed);
    }

    /// Ends a round; every 50 rounds, a progress line.
    pub(crate) fn round_done(&mut self, variant: &str) {
        self.rounds += 1;
        if self.rounds % 50 == 0 {
            say(&format!(
                "dma-race-progress {variant}: rounds={} violations={}",
                self.rounds, self.violations
            ));
        }
    }

    pub(crate) fn count_status(&mut self, s: u8) {
        match s {
            0 => self.status_ok += 1,
            STATUS_UNTOUCHED => self.status_untouched += 1,
            _ => self.status_err += 1,
        }
    }
}

pub(crate) struct RaceCfg {
    pub(crate) rounds: u64,
    pub(crate) detach_rounds: u64,
    pub(crate) ring_rounds: u64,
    pub(crate) reset_rounds: u64,
    pub(crate) race_len: usize,
    pub(crate) filler_len: usize,
    pub(crate) pause: Duration,
    pub(crate) settle: Duration,
    pub(crate) capacity: u64,
    /// `ring` only: once the device runs on its rings and before the first
    /// READ, print `AGENT-SNAPSHOT-POINT` and wait this long (the host
    /// snapshots and restores the VM meanwhile; a paused VM's clock does
    /// not run), then print `AGENT-SNAPSHOT-RESUMED`.
    pub(crate) snapshot_wait: Option<Duration>,
}

/// Disk offsets for round `n`: (filler, racing). Each round reads fresh
/// blocks so that no cache in the VMM's host short-cuts the slow disk.
fn race_offsets(cfg: &RaceCfg, n: u64) -> (u64, u64) {
    let stride = 4 * MIB;
    let slots = (cfg.capacity.saturating_sub(RESERVED_BYTES) / stride).max(1);
    let base = RESERVED_BYTES + (n % slots) * stride;
    (base, base + 2 * MIB)
}

/// Maps the buffer, submits the filler READ and the racing READ for round
/// `n`, waits the pause and returns the slots that already completed.
pub(crate) fn start_race(
    dev: &mut VirtioBlk,
    cfg: &RaceCfg,
    data: &HugeBuf,
    n: u64,
) -> Res<Vec<u16>> {
    let (fo, ro) = race_offsets(cfg, n);
    data.fill(0, cfg.race_len, 0x3c);
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    let scratch = dev.iova_of(SCRATCH_OFF);
    dev.push(0, VIRTIO_BLK_T_IN, fo / 512, scratch, cfg.filler_len as u32);
    dev.push(1, VIRTIO_BLK_T_IN, ro / 512, DATA_IOVA, cfg.race_len as u32);
    dev.notify()?;
    std::thread::sleep(cfg.pause);
    Ok(dev.pop_used().iter().map(|c| c.slot).collect())
}

pub(crate) fn race_unmap(
    bdf: &str,
    cfg: &RaceCfg,
    data: &HugeBuf,
    first_round: u64,
) -> Res<RaceStats> {
    let mut dev = VirtioBlk::open(bdf, RING_IOVA)?;
    let mut st = RaceStats::default();
    for r in 0..cfg.rounds {
        phase("dma-race unmap: round", r);
        let mut done = start_race(&mut dev, cfg, data, first_round + r)?;
        if !done.contains(&1) {
            st.inflight_at_unmap += 1;
        }
        let t = Instant::now();
        let n = dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
        let us = t.elapsed().as_micros() as u64;
        if n != HUGE_PAGE as u64 {
            return Err(format!(
                "UNMAP_DMA unmapped {n} bytes, expected {HUGE_PAGE}"
            ));
        }
        data.fill(0, cfg.race_len, CANARY);
        st.unmap_us.push(us);
        let left = 2 - done.len();
        done.extend(
            dev.wait_completions(left, Duration::from_secs(60))?
                .iter()
                .map(|c| c.slot),
        );
        std::thread::sleep(Duration::from_millis(50));
        st.canary_checked(data.count_not(0, cfg.race_len, CANARY));
        st.count_status(dev.slot_status(1));
        st.round_done("unmap");
    }
    // Leave the device quiescent for the next user.
    dev.reset()?;
    Ok(st)
}

pub(crate) fn race_detach(
    bdf: &str,
    cfg: &RaceCfg,
    data: &HugeBuf,
    first_round: u64,
) -> Res<RaceStats> {
    let mut st = RaceStats::default();
    for r in 0..cfg.detach_rounds {
        phase("dma-race detach: open", r);
        let mut dev = VirtioBlk::open(bdf, RING_IOVA)?;
        let done = start_race(&mut dev, cfg, data, first_round + r)?;
        if !done.contains(&1) {
            st.inflight_at_unmap += 1;
        }
        // Closing device, group and container detaches the group from its
        // IOMMU domain (and unmaps everything) while the READ is in flight.
        phase("dma-race detach: close", r);
        let t = Instant::now();
        drop(dev);
        let us = t.elapsed().as_micros() as u64;
        data.fill(0, cfg.race_len, CANARY);
        st.unmap_us.push(us);
        std::thread::sleep(cfg.settle);
        st.canary_checked(data.count_not(0, cfg.race_len, CANARY));
        st.round_done("detach");
    }
    // Bring the device back to a clean state.
    let dev = VirtioBlk::open(bdf, RING_IOVA)?;
    dev.reset()?;
    Ok(st)
}

/// The rings in a mapping of their own, the request's header, status and
/// data in others; a READ in flight; the rings' mapping goes. After the
/// UNMAP returned, the guest owns the rings' page again: any byte of the
/// used ring that changes is a violation. The device should stop the
/// queue (DEVICE_NEEDS_RESET); the driver resets it and starts over on
/// freshly mapped rings.
pub(crate) fn race_ring(
    bdf: &str,
    cfg: &RaceCfg,
    data: &HugeBuf,
    first_round: u64,
) -> Res<RaceStats> {
    let mut dev = VirtioBlk::open_split(bdf, RING_IOVA, BUFS_IOVA)?;
    let mut st = RaceStats {
        needs_reset: Some(0),
        ..Default::default()
    };
    if let Some(wait) = cfg.snapshot_wait {
        phase("dma-race ring: waiting for the snapshot and restore", 0);
        say("AGENT-SNAPSHOT-POINT");
        std::thread::sleep(wait);
        say("AGENT-SNAPSHOT-RESUMED");
    }
    for r in 0..cfg.ring_rounds {
        phase("dma-race ring: round", r);
        let done = start_race(&mut dev, cfg, data, first_round + r)?;
        if !done.contains(&1) {
            st.inflight_at_unmap += 1;
        }
        let t = Instant::now();
        let n = dev.unmap_rings()?;
        st.unmap_us.push(t.elapsed().as_micros() as u64);
        if n != RINGS_LEN as u64 {
            return Err(format!(
                "UNMAP_DMA unmapped {n} bytes, expected {RINGS_LEN}"
            ));
        }
        let used_len = dev.used_ring_len();
        dev.ring.fill(USED_OFF, used_len, CANARY);
        // Longer than the READs take: a device that still publishes their
        // used entries does so in this window.
        std::thread::sleep(cfg.settle);
        st.canary_checked(dev.ring.count_not(USED_OFF, used_len, CANARY));
        if dev.status()? & STATUS_NEEDS_RESET != 0 {
            st.needs_reset = st.needs_reset.map(|n| n + 1);
        }
        st.count_status(dev.slot_status(1));
        // The data buffer's mapping goes too (after its READ), then the
        // driver recovers: reset, rings mapped again, queue set up anew.
        phase("dma-race ring: recover", r);
        dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
        dev.remap_rings_and_init()?;
        st.round_done("ring");
    }
    dev.reset()?;
    Ok(st)
}

/// A READ in flight; the driver resets the device and waits for the
/// status to read 0; then it unmaps and reuses the buffer. Any byte the
/// device writes after that is a violation: a reset must complete only
/// after the DMA it abandons.
pub(crate) fn race_reset(
    bdf: &str,
    cfg: &RaceCfg,
    data: &HugeBuf,
    first_round: u64,
) -> Res<RaceStats> {
    let mut dev = VirtioBlk::open(bdf, RING_IOVA)?;
    let mut st = RaceStats::default();
    for r in 0..cfg.reset_rounds {
        phase("dma-race reset: round", r);
        let done = start_race(&mut dev, cfg, data, first_round + r)?;
        if !done.contains(&1) {
            st.inflight_at_unmap += 1;
        }
        let t = Instant::now();
        dev.reset()?;
        st.unmap_us.push(t.elapsed().as_micros() as u64);
        dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
        data.fill(0, cfg.race_len, CANARY);
        std::thread::sleep(cfg.settle);
        st.canary_checked(data.count_not(0, cfg.race_len, CANARY));
        st.count_status(dev.slot_status(1));
        // The reset above completed; set up the device on it.
        dev.setup()?;
        st.round_done("reset");
    }
    dev.reset()?;
    Ok(st)
}

pub fn dma_race(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = match p.get("race_disk") {
        Some(id) => disks::pick(&disks, Some(id), true)?,
        None => {
            disks::pick(&disks, Some("slow"), true).or_else(|_| disks::pick(&disks, None, true))?
        }
    };
    if !disk.iommu_on {
        return Err(format!("disk {} is not behind the IOMMU", disk.name));
    }
    let rounds = p.num("rounds", 10);
    let cfg = RaceCfg {
        rounds,
        detach_rounds: p.num("detach_rounds", rounds),
        ring_rounds: p.num("ring_rounds", rounds),
        reset_rounds: p.num("reset_rounds", rounds),
        race_len: (p.num("race_kib", 1024) as usize * 1024).clamp(PAGE, 2 * MIB as usize),
        filler_len: (p.num("filler_kib", 1024) as usize * 1024).clamp(PAGE, SCRATCH_LEN),
        pause: Duration::from_millis(p.num("pause_ms", 20)),
        settle: Duration::from_millis(p.num("settle_ms", 1500)),
        capacity: disk.size,
        snapshot_wait: match p.num("snapshot_wait_s", 0) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        },
    };
    phase("dma-race: bind", 0);
    reserve_hugepages(p.num("hugepages", 16))?;
    bind_vfio_pci(&disk.bdf)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let variants = p.get("variants").unwrap_or("unmap,detach").to_string();
    let mut parts = Vec::new();
    let mut total_violations = 0;
    let mut no_window = Vec::new();
    for (i, v) in variants.split(',').enumerate() {
        let first = i as u64 * cfg.rounds;
        let st = match v {
            "unmap" => race_unmap(&disk.bdf, &cfg, &data, first)?,
            "detach" => race_detach(&disk.bdf, &cfg, &data, first)?,
            "ring" => race_ring(&disk.bdf, &cfg, &data, first)?,
            "reset" => race_reset(&disk.bdf, &cfg, &data, first)?,
            "fence" | "fence-off" => {
                let v = if v == "fence" { "fence" } else { "fence-off" };
                let (mut st, lost, writer_elsewhere) =
                    crate::fence::race_fence(&disk.bdf, &cfg, &data, first, v)?;
                st.lost_writes = Some(lost);
                if !writer_elsewhere {
                    say(&format!(
                        "dma-race {v}: the writer shared the UNMAP's CPU (one vCPU): lost_writes tests nothing"
                    ));
                }
                st
            }
            other => return Err(format!("unknown dma-race variant {other:?}")),
        };
        say(&st.summary(v));
        say(&st.detail(v));
        total_violations += st.violations;
        if st.inflight_at_unmap == 0 {
            no_window.push(v.to_string());
        }
        parts.push(format!("{v}:{}/{}", st.violations, st.rounds));
    }
    let extra = format!(
        "disk={} variants={variants} violations={}",
        disk.name,
        parts.join(",")
    );
    if total_violations > 0 {
        return Err(format!("{extra} reason=device-wrote-after-unmap"));
    }
    if !no_window.is_empty() {
        return Err(format!(
            "{extra} reason=no-in-flight-window({})",
            no_window.join(",")
        ));
    }
    Ok(extra)
}

// ---------------------------------------------------------------- churn

/// One churn cycle on `dev`: map a random buffer, write random blocks
/// through it, read them back through a second mapping, verify, unmap.
/// Returns the bytes moved.
pub(crate) fn churn_cycle(
    dev: &mut VirtioBlk,
    data: &HugeBuf,
    rng: &mut Rng,
    i: u64,
    blocks: u64,
) -> Res<u64> {
    let mut wbuf = vec![0u8; 64 * 1024];
    let mut rbuf = vec![0u8; 64 * 1024];
    let len = PAGE * (1 + rng.below(16) as usize);
    let buf_off = PAGE * rng.below(256) as usize;
    let iova = DATA_IOVA + (i % 64) * 4 * MIB + buf_off as u64;
    let sector = (RESERVED_BYTES + rng.below(blocks) * 64 * 1024) / 512;
    let seed = rng.next_u64() | 1;
    for (k, pg) in wbuf[..len].chunks_exact_mut(PAGE).enumerate() {
        fill_page(pg, seed, k as u64);
    }
    data.write(buf_off, &wbuf[..len]);
    data.fill(buf_off + len, len, 0);
    // SAFETY: buf_off + 2*len <= 1 MiB + 128 KiB < 2 MiB.
    let vaddr = unsafe { data.ptr.add(buf_off) };
    phase("churn: map", i);
    dev.sess
        .map_dma(vaddr, iova, 2 * len as u64)
        .map_err(|e| format!("cycle {i}: {e}"))?;
    phase("churn: write", i);
    let s = dev.io(VIRTIO_BLK_T_OUT, sector, iova, len as u32)?;
    if s != 0 {
        return Err(format!("cycle {i}: WRITE status {s}"));
    }
    phase("churn: read", i);
    let s = dev.io(VIRTIO_BLK_T_IN, sector, iova + len as u64, len as u32)?;
    if s != 0 {
        return Err(format!("cycle {i}: READ status {s}"));
    }
    data.read(buf_off + len, &mut rbuf[..len]);
    if rbuf[..len] != wbuf[..len] {
        return Err(format!("cycle {i}: read-back mismatch at sector {sector}"));
    }
    phase("churn: unmap", i);
    let n = dev
        .sess
        .unmap_dma(iova, 2 * len as u64)
        .map_err(|e| format!("cycle {i}: {e}"))?;
    if n != 2 * len as u64 {
        return Err(format!(
            "cycle {i}: UNMAP_DMA unmapped {n} of {} bytes",
            2 * len
        ));
    }
    Ok(2 * len as u64)
}

/// 64 KiB blocks of `dev` past the reserved start.
pub(crate) fn churn_blocks(dev: &VirtioBlk) -> Res<u64> {
    let cap = dev.capacity()? * 512;
    Ok((cap.saturating_sub(RESERVED_BYTES) / (64 * 1024)).max(1))
}

pub fn churn(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = match p.get("churn_disk") {
        Some(id) => disks::pick(&disks, Some(id), true)?,
        None => disks
            .iter()
            .find(|d| d.iommu_on && d.id != "slow")
            .cloned()
            .ok_or("no iommu=on disk for churn")?,
    };
    let cycles = p.num("cycles", 2000);
    phase("churn: bind", 0);
    reserve_hugepages(p.num("hugepages", 16))?;
    bind_vfio_pci(&disk.bdf)?;
    phase("churn: open", 0);
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let blocks = churn_blocks(&dev)?;
    let mut rng = Rng::new(seed_from_time());
    let t = Instant::now();
    let mut bytes = 0u64;
    for i in 0..cycles {
        if i % 500 == 0 && i > 0 {
            say(&format!("churn progress: cycle={i}"));
        }
        bytes += churn_cycle(&mut dev, &data, &mut rng, i, blocks)?;
    }
    dev.reset()?;
    Ok(format!(
        "disk={} cycles={cycles} io_kib={} secs={:.2} bars_mmapped={}",
        disk.name,
        bytes / 1024,
        t.elapsed().as_secs_f64(),
        dev.mmapped_bars
    ))
}

// ------------------------------------------------------------ kvm-check

/// Used inside L1: /dev/kvm answers, a VM and a vCPU can be created.
/// boot: the guest reached userspace; reports what it sees of the machine.
pub fn boot() -> Res<String> {
    let cpus = fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(|e| format!("read cpu/online: {e}"))?;
    let meminfo = fs::read_to_string("/proc/meminfo").map_err(|e| format!("read meminfo: {e}"))?;
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no MemTotal in /proc/meminfo")?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(format!(
        "cpus={} mem_kib={mem_kib} kernel={}",
        cpus.trim(),
        release.trim()
    ))
}

pub fn kvm_check() -> Res<String> {
    const KVM_GET_API_VERSION: u64 = 0xae00;
    const KVM_CREATE_VM: u64 = 0xae01;
    const KVM_CREATE_VCPU: u64 = 0xae41;
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm missing".into());
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain-integer KVM ioctls on a valid fd.
    let api = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if api != 12 {
        return Err(format!("KVM_GET_API_VERSION returned {api}"));
    }
    // SAFETY: as above.
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(os_err("KVM_CREATE_VM"));
    }
    // SAFETY: as above; `vm` is the fd just returned.
    let vcpu = unsafe { libc::ioctl(vm, KVM_CREATE_VCPU as _, 0) };
    let r = if vcpu < 0 {
        Err(os_err("KVM_CREATE_VCPU"))
    } else {
        Ok(format!("api={api}"))
    };
    // SAFETY: closing fds we own.
    unsafe {
        if vcpu >= 0 {
            libc::close(vcpu);
        }
        libc::close(vm);
    }
    r
}

/// L1 helper: creates a VM with an in-kernel irqchip and one vCPU and
/// holds them until killed (L1's init starts it while only CPU 0 is
/// online, then writes `/run/kvm-held`). While a VM exists, the VMMs that
/// follow create and destroy theirs without flipping KVM's static keys
/// (preempt notifiers, the disabled-APIC keys), each flip being live code
/// patching in L1, which the nested bed's emulation sometimes gets wrong
/// when another vCPU runs the code being patched (an L1 oops on a stray
/// int3).
pub fn kvm_hold() -> Res<String> {
    const KVM_CREATE_VM: u64 = 0xae01;
    const KVM_CREATE_IRQCHIP: u64 = 0xae60;
    const KVM_CREATE_VCPU: u64 = 0xae41;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain-integer KVM ioctls on valid fds; the fds stay open
    // until the process is killed.
    unsafe {
        let vm = libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0);
        if vm < 0 {
            return Err(os_err("KVM_CREATE_VM"));
        }
        if libc::ioctl(vm, KVM_CREATE_IRQCHIP as _, 0) < 0 {
            return Err(os_err("KVM_CREATE_IRQCHIP"));
        }
        if libc::ioctl(vm, KVM_CREATE_VCPU as _, 0) < 0 {
            return Err(os_err("KVM_CREATE_VCPU"));
        }
    }
    crate::say("AGENT-RESULT scenario=kvm-hold status=pass holding=1");
    // Tells L1's init that the keys are set.
    let _ = fs::create_dir_all("/run");
    fs::write("/run/kvm-held", b"").map_err(|e| format!("write /run/kvm-held: {e}"))?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_roundtrip() {
        let mut pg = vec![0u8; PAGE];
        fill_page(&mut pg, 42, 7);
        assert!(page_ok(&pg, 42, 7));
        assert!(!page_ok(&pg, 42, 8));
        pg[100] ^= 1;
        assert!(!page_ok(&pg, 42, 7));
    }

    #[test]
    fn race_offsets_are_fresh_and_in_range() {
        let cfg = RaceCfg {
            rounds: 4,
            detach_rounds: 4,
            ring_rounds: 4,
            reset_rounds: 4,
            race_len: 1 << 20,
            filler_len: 1 << 20,
            pause: Duration::ZERO,
            settle: Duration::ZERO,
            capacity: 64 * MIB,
            snapshot_wait: None,
        };
        let a = race_offsets(&cfg, 0);
        let b = race_offsets(&cfg, 1);
        assert!(a.0 >= RESERVED_BYTES);
        assert!(b.0 >= a.1 + MIB);
        for n in 0..100 {
            let (_, r) = race_offsets(&cfg, n);
            assert!(r + MIB <= cfg.capacity);
        }
    }
}
