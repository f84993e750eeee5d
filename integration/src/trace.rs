//! A timestamped event trace for latency work on the device paths.
//!
//! Off unless the environment variable `VMM_TRACE=N` asks for up to N
//! events; then every [`record`] costs a clock read, a `sched_getcpu` and
//! four relaxed atomic stores, and [`dump`] prints the events (`TRACE <ns>
//! <event> <arg> <cpu>`) to stderr when the VM stops, followed by one
//! `THREAD` line per VMM thread with its scheduling statistics (time on a
//! CPU and waiting for one, context switches). Nothing is printed while
//! the guest runs, so the trace does not itself add guest exits or console
//! output.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Bit 32 of a block event's argument: the disk is behind the IOMMU.
pub const BLK_IOMMU: u64 = 1 << 32;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Event {
    /// The IOMMU thread woke for a request-queue kick.
    IommuKick = 1,
    /// The IOMMU served requests; arg: total MAP requests << 32 | UNMAPs.
    IommuServed = 2,
    /// The IOMMU's polling window ended: kicks on, thread goes to sleep.
    IommuSleep = 3,
    /// A block queue thread woke for a kick; arg: `iommu` (see below).
    BlkKick = 10,
    /// A block request was parsed and queued; arg: `iommu` | head.
    BlkQueued = 11,
    /// A block worker took a request; arg: `iommu` | head.
    BlkStart = 12,
    /// A block request's used entry is published; arg: `iommu` |
    /// head << 1 | irq.
    BlkDone = 13,
    /// A chain was popped from the available ring (before it is parsed);
    /// arg: `iommu` | head.
    BlkPopped = 14,
    /// A block request's I/O finished (before status and used entry);
    /// arg: `iommu` | head.
    BlkIoDone = 15,
    /// A vCPU exit to this process for MMIO; arg: address.
    VcpuMmio = 20,
    /// A vCPU exit to this process for port I/O; arg: port.
    VcpuPio = 21,
}

struct Buffer {
    start: Instant,
    slots: Box<[[AtomicU64; 3]]>,
    next: AtomicUsize,
}

static BUFFER: OnceLock<Option<Buffer>> = OnceLock::new();

fn buffer() -> Option<&'static Buffer> {
    BUFFER
        .get_or_init(|| {
            let n: usize = std::env::var("VMM_TRACE").ok()?.parse().ok()?;
            (n > 0).then(|| Buffer {
                start: Instant::now(),
                slots: (0..n)
                    .map(|_| [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)])
                    .collect(),
                next: AtomicUsize::new(0),
            })
        })
        .as_ref()
}

/// Whether events are being recorded (to skip work that only feeds them).
pub fn enabled() -> bool {
    buffer().is_some()
}

/// Records `event` with `arg` (only the low 48 bits are kept).
pub fn record(event: Event, arg: u64) {
    let Some(b) = buffer() else {
        return;
    };
    let i = b.next.fetch_add(1, Ordering::Relaxed);
    let Some(slot) = b.slots.get(i) else {
        return;
    };
    let ns = u64::try_from(b.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    slot[0].store(ns, Ordering::Relaxed);
    slot[1].store(
        ((event as u64) << 48) | (arg & 0xffff_ffff_ffff),
        Ordering::Relaxed,
    );
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    slot[2].store(cpu as u64, Ordering::Relaxed);
}

/// Prints the recorded events to stderr (nothing when tracing is off).
pub fn dump() {
    let Some(b) = buffer() else {
        return;
    };
    let n = b.next.load(Ordering::Relaxed).min(b.slots.len());
    let mut out = String::with_capacity(n * 32);
    for s in &b.slots[..n] {
        let v = s[1].load(Ordering::Relaxed);
        out.push_str(&format!(
            "TRACE {} {} {:#x} {}\n",
            s[0].load(Ordering::Relaxed),
            v >> 48,
            v & 0xffff_ffff_ffff,
            s[2].load(Ordering::Relaxed)
        ));
    }
    out.push_str(&thread_stats());
    eprint!("{out}");
}

static THREAD_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records the calling thread's scheduling statistics (when tracing), for
/// threads that end before the VM stops.
pub fn thread_exit() {
    if !enabled() {
        return;
    }
    let line = thread_line(std::path::Path::new("/proc/thread-self"));
    THREAD_LINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(line);
}

/// One line per thread of this process: name, last CPU, time on CPU and
/// waiting for one (schedstat), voluntary and forced context switches.
fn thread_stats() -> String {
    let mut out: String = THREAD_LINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .concat();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in dir.flatten() {
        out.push_str(&thread_line(&t.path()));
    }
    out
}

fn thread_line(p: &std::path::Path) -> String {
    let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
    let name = read("comm").trim().to_string();
    let sched: Vec<u64> = read("schedstat")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let stat = read("stat");
    let cpu = crate::procfs::stat_field(&stat, 39).unwrap_or("?");
    let status = read("status");
    let field = |k| crate::procfs::status_field(&status, k).unwrap_or("");
    format!(
        "THREAD {name} cpu={cpu} run_us={} wait_us={} slices={} vcsw={} ivcsw={}\n",
        sched.first().map_or(0, |v| v / 1000),
        sched.get(1).map_or(0, |v| v / 1000),
        sched.get(2).copied().unwrap_or(0),
        field("voluntary_ctxt_switches"),
        field("nonvoluntary_ctxt_switches"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_line_reports_the_calling_thread() {
        let line = super::thread_line(std::path::Path::new("/proc/thread-self"));
        let kv = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .to_string()
        };
        assert!(line.starts_with("THREAD "), "{line}");
        for k in ["cpu=", "run_us=", "wait_us=", "slices=", "vcsw=", "ivcsw="] {
            assert!(kv(k).parse::<u64>().is_ok(), "{k} in {line:?}");
        }
    }
}
