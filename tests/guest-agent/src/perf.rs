//! perf: guest-timed O_DIRECT latency on one test disk (label id `perf`).
//!
//! Single-threaded, queue depth 1 (synchronous `pread`/`pwrite`), random
//! offsets aligned to the request size and never in the first MiB:
//! (a) `n4k` 4 KiB reads, (b) `n256k` 256 KiB reads, (c) `nw4k` 4 KiB
//! writes, each after `warmup` untimed operations of the same kind. Every
//! operation is timed with `Instant` inside the guest. The offsets come from
//! a fixed `seed`, so iommu=on and iommu=off boots issue the same requests.
//! A phase stops early after `max_s` seconds (reported as `<metric>_n`).
//!
//! Result: `iommu=on|off group=<IOMMU group type|none> init_ms=<uptime at
//! agent start> <metric>_us=<mean> <metric>_med_us=<median> <metric>_n=<ops>`
//! for `read4k`, `read256k`, `write4k`.
//!
//! Throughput (off unless asked for, and not with `pair`): `qd=N qd_s=S`
//! runs N threads of random 4 KiB O_DIRECT reads for S seconds (queue
//! depth N; `qd<N>_iops=`), and `seq1m_s=S` reads the disk sequentially in
//! 1 MiB requests for S seconds (`seq1m_mbps=`).
//!
//! VMM CPU (`cpu_marks=1`, not with `pair`): each measured stretch (the
//! timed operations of a phase, the QD and sequential runs) is bracketed
//! by `AGENT-MARK name=<metric> edge=start|end ops=<operations>` lines,
//! each followed by a pause of `mark_ms` (50 ms by default); L1, watching
//! the console, answers each with the VMM's CPU time (guest-perf's
//! `--cpu`), and as guest-perf's `--counters` and `--threads` ask with
//! the IOMMU's counters and each VMM thread's CPU time.
//!
//! Paired (`pair=<id>`): a second disk, which must be outside the IOMMU,
//! takes every other operation with the same offsets, so that one boot
//! measures both sides under the same conditions; its fields carry an
//! `off_` prefix (`off_read4k_us=...`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::disks::{self, RESERVED_BYTES};
use crate::scenarios::Rng;
use crate::{phase, Params, Res};

const PAGE: usize = 4096;

/// A zeroed, page-aligned byte buffer (O_DIRECT needs aligned memory).
struct Aligned {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let mem = vec![0u8; len + PAGE];
        let off = mem.as_ptr().align_offset(PAGE);
        Self { mem, off, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }
}

/// Seconds since boot from `/proc/uptime`, in milliseconds.
fn uptime_ms() -> Option<u64> {
    let s = fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0).round() as u64)
}

/// Per-operation latencies of one phase.
#[derive(Debug, Default)]
pub struct Lat {
    ns: Vec<u64>,
}

impl Lat {
    fn push(&mut self, d: Duration) {
        self.ns.push(d.as_nanos() as u64);
    }
    pub fn mean_us(&self) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        self.ns.iter().sum::<u64>() as f64 / self.ns.len() as f64 / 1000.0
    }
    pub fn median_us(&self) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        let mut v = self.ns.clone();
        v.sort_unstable();
        let m = v.len() / 2;
        let ns = if v.len() % 2 == 1 {
            v[m] as f64
        } else {
            (v[m - 1] + v[m]) as f64 / 2.0
        };
        ns / 1000.0
    }
    /// `<name>_us=<mean> <name>_med_us=<median> <name>_n=<count>`.
    pub fn fields(&self, name: &str) -> String {
        format!(
            "{name}_us={:.1} {name}_med_us={:.1} {name}_n={}",
            self.mean_us(),
            self.median_us(),
            self.ns.len()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// Offset of a random `len`-aligned request in `[RESERVED_BYTES, size)`.
pub fn random_offset(rng: &mut Rng, size: u64, len: u64) -> u64 {
    let slots = size.saturating_sub(RESERVED_BYTES) / len;
    RESERVED_BYTES + rng.below(slots) * len
}

/// A disk under measurement.
struct Target<'a> {
    f: &'a fs::File,
    dev: &'a str,
    size: u64,
}

struct Phase<'a> {
    targets: Vec<Target<'a>>,
    warmup: u64,
    budget: Duration,
    /// Print CPU marks around the timed operations (one target only),
    /// each followed by this pause.
    marks: Option<Duration>,
}

/// Marks the start or end of a measured stretch for L1 (see the module
/// documentation); the pause lets L1 read the VMM's CPU time while the
/// guest is idle, so the stretch's I/O falls inside the two readings.
fn cpu_mark(pause: Option<Duration>, name: &str, edge: &str, ops: u64) {
    if let Some(pause) = pause {
        println!("AGENT-MARK name={name} edge={edge} ops={ops}");
        std::thread::sleep(pause);
    }
}

impl Phase<'_> {
    /// Runs `warmup + n` operations on every target, round-robin, each
    /// target drawing offsets from its own copy of `rng` (the same offsets
    /// on every target); returns one latency set per target.
    fn run(&self, name: &str, op: Op, len: usize, n: u64, rng: &mut Rng) -> Res<Vec<Lat>> {
        let marks = self.marks.filter(|_| self.targets.len() == 1);
        let mut buf = Aligned::new(len);
        if op == Op::Write {
            // Non-zero data, so the backing file really gets written.
            for (i, b) in buf.as_mut().iter_mut().enumerate() {
                *b = (i as u8) ^ 0x5a;
            }
        }
        let mut rngs: Vec<Rng> = self.targets.iter().map(|_| rng.clone()).collect();
        let mut lats: Vec<Lat> = self.targets.iter().map(|_| Lat::default()).collect();
        let start = Instant::now();
        'ops: for i in 0..self.warmup + n {
            if i == self.warmup {
                cpu_mark(marks, name, "start", 0);
            }
            for (k, t) in self.targets.iter().enumerate() {
                let off = random_offset(&mut rngs[k], t.size, len as u64);
                let b = buf.as_mut();
                let at = Instant::now();
                let r = match op {
                    Op::Read => t.f.read_exact_at(b, off),
                    Op::Write => t.f.write_all_at(b, off),
                };
                let d = at.elapsed();
                r.map_err(|e| {
                    format!(
                        "O_DIRECT {op:?} of {len} bytes at {off} on /dev/{}: {e}",
                        t.dev
                    )
                })?;
                if i >= self.warmup {
                    lats[k].push(d);
                }
            }
            if i >= self.warmup && start.elapsed() > self.budget {
                break 'ops;
            }
        }
        cpu_mark(marks, name, "end", lats[0].ns.len() as u64);
        *rng = rngs.swap_remove(0);
        Ok(lats)
    }
}

/// `threads` threads of random 4 KiB reads on `f` for `secs`; returns the
/// number of reads and the seconds they took.
fn random_reads(f: &fs::File, size: u64, threads: u64, secs: u64, seed: u64) -> Res<(u64, f64)> {
    let budget = Duration::from_secs(secs.max(1));
    let t = Instant::now();
    let counts: Vec<Res<u64>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                sc.spawn(move || {
                    let mut rng = Rng::new(seed ^ (k << 40));
                    let mut buf = Aligned::new(PAGE);
                    let mut n = 0u64;
                    while t.elapsed() < budget {
                        let off = random_offset(&mut rng, size, PAGE as u64);
                        f.read_exact_at(buf.as_mut(), off)
                            .map_err(|e| format!("QD read at {off}: {e}"))?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("reader panicked".into())))
            .collect()
    });
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

/// Sequential 1 MiB reads of `f` (wrapping at its end) for `secs`;
/// returns the number of reads and the seconds they took.
fn sequential_reads(f: &fs::File, size: u64, secs: u64) -> Res<(u64, f64)> {
    let len = 1u64 << 20;
    let mut buf = Aligned::new(len as usize);
    let budget = Duration::from_secs(secs.max(1));
    let t = Instant::now();
    let mut off = RESERVED_BYTES;
    let mut bytes = 0u64;
    while t.elapsed() < budget {
        if off + len > size {
            off = RESERVED_BYTES;
        }
        f.read_exact_at(buf.as_mut(), off)
            .map_err(|e| format!("sequential read at {off}: {e}"))?;
        off += len;
        bytes += len;
    }
    Ok((bytes / len, t.elapsed().as_secs_f64()))
}

pub fn perf(p: &Params) -> Res<String> {
    let init_ms = uptime_ms().ok_or("cannot read /proc/uptime")?;
    phase("perf: disks", 0);
    let id = p.get("disk").unwrap_or("perf");
    let all = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = disks::pick(&all, Some(id), true)?;
    let group = disks::group_type(&disk.bdf);
    let shown = group.clone().unwrap_or_else(|| "none".into());
    // The comparison is only meaningful if the label tells the truth.
    if disk.iommu_on != group.is_some() {
        return Err(format!(
            "/dev/{} is labelled iommu={} but its IOMMU group is {shown}",
            disk.name,
            if disk.iommu_on { "on" } else { "off" }
        ));
    }
    if disk.size < RESERVED_BYTES + (8 << 20) {
        return Err(format!(
            "/dev/{} too small ({} bytes)",
            disk.name, disk.size
        ));
    }
    let pair = match p.get("pair") {
        Some(id) => {
            let d = disks::pick(&all, Some(id), false)?;
            if d.iommu_on || disks::group_type(&d.bdf).is_some() {
                return Err(format!(
                    "pair disk /dev/{} must be outside the IOMMU (label iommu={}, group {:?})",
                    d.name,
                    if d.iommu_on { "on" } else { "off" },
                    disks::group_type(&d.bdf)
                ));
            }
            if d.size < disk.size {
                return Err(format!(
                    "pair disk /dev/{} smaller than /dev/{}",
                    d.name, disk.name
                ));
            }
            Some(d)
        }
        None => None,
    };
    let f = disk.open_direct()?;
    let pf = pair.as_ref().map(|d| d.open_direct()).transpose()?;
    let mut targets = vec![Target {
        f: &f,
        dev: &disk.name,
        size: disk.size,
    }];
    if let (Some(d), Some(pf)) = (&pair, &pf) {
        // The same offset range on both disks.
        targets.push(Target {
            f: pf,
            dev: &d.name,
            size: disk.size,
        });
    }
    let ph = Phase {
        targets,
        warmup: p.num("warmup", 16),
        budget: Duration::from_secs(p.num("max_s", 60)),
        marks: (p.num("cpu_marks", 0) != 0).then(|| Duration::from_millis(p.num("mark_ms", 50))),
    };
    let marks = ph.marks.filter(|_| pair.is_none());
    let mut rng = Rng::new(p.num("seed", 1));
    let t = Instant::now();
    phase("perf: read4k", 0);
    let r4 = ph.run("read4k", Op::Read, PAGE, p.num("n4k", 1000), &mut rng)?;
    phase("perf: read256k", 0);
    let r256 = ph.run(
        "read256k",
        Op::Read,
        256 << 10,
        p.num("n256k", 100),
        &mut rng,
    )?;
    phase("perf: write4k", 0);
    let w4 = ph.run("write4k", Op::Write, PAGE, p.num("nw4k", 500), &mut rng)?;
    let fields = |k: usize, prefix: &str| {
        format!(
            "{} {} {}",
            r4[k].fields(&format!("{prefix}read4k")),
            r256[k].fields(&format!("{prefix}read256k")),
            w4[k].fields(&format!("{prefix}write4k"))
        )
    };
    let paired = match &pair {
        Some(d) => format!(" pair={} {}", d.name, fields(1, "off_")),
        None => String::new(),
    };
    let mut throughput = String::new();
    let qd = p.num("qd", 0);
    if qd > 0 && pair.is_none() {
        phase("perf: qd", qd);
        let name = format!("qd{qd}");
        cpu_mark(marks, &name, "start", 0);
        let (reads, secs) = random_reads(&f, disk.size, qd, p.num("qd_s", 10), p.num("seed", 1))?;
        cpu_mark(marks, &name, "end", reads);
        throughput.push_str(&format!(" qd{qd}_iops={:.0}", reads as f64 / secs));
    }
    let seq_s = p.num("seq1m_s", 0);
    if seq_s > 0 && pair.is_none() {
        phase("perf: seq1m", 0);
        cpu_mark(marks, "seq1m", "start", 0);
        let (reads, secs) = sequential_reads(&f, disk.size, seq_s)?;
        cpu_mark(marks, "seq1m", "end", reads);
        let mbps = (reads << 20) as f64 / 1e6 / secs;
        throughput.push_str(&format!(" seq1m_mbps={mbps:.1}"));
    }
    Ok(format!(
        "iommu={} group={shown} disk={} init_ms={init_ms} {}{paired}{throughput} secs={:.2}",
        if disk.iommu_on { "on" } else { "off" },
        disk.name,
        fields(0, ""),
        t.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_aligned_and_past_reserved() {
        let mut rng = Rng::new(7);
        let size = 256u64 << 20;
        for len in [4096u64, 256 << 10] {
            for _ in 0..10_000 {
                let off = random_offset(&mut rng, size, len);
                assert!(off >= RESERVED_BYTES);
                assert_eq!(off % len, 0);
                assert!(off + len <= size);
            }
        }
    }

    #[test]
    fn aligned_buffer() {
        let mut b = Aligned::new(256 << 10);
        assert_eq!(b.as_mut().as_ptr() as usize % PAGE, 0);
        assert_eq!(b.as_mut().len(), 256 << 10);
    }

    #[test]
    fn lat_stats() {
        let mut l = Lat::default();
        assert_eq!(l.mean_us(), 0.0);
        for us in [10u64, 20, 30, 100] {
            l.push(Duration::from_micros(us));
        }
        assert_eq!(l.mean_us(), 40.0);
        assert_eq!(l.median_us(), 25.0);
        assert_eq!(
            l.fields("read4k"),
            "read4k_us=40.0 read4k_med_us=25.0 read4k_n=4"
        );
    }
}
