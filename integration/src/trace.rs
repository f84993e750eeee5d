//! A timestamped event trace for latency work on the device paths.
//!
//! Off unless the environment variable `VMM_TRACE=N` asks for up to N
//! events; then every [`record`] costs one clock read and three relaxed
//! atomic stores, and [`dump`] prints the events (`TRACE <ns> <event>
//! <arg>`) to stderr when the VM stops. Nothing is printed while the guest
//! runs, so the trace does not itself add guest exits or console output.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

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
    /// A block queue thread woke for a kick; arg: disk index.
    BlkKick = 10,
    /// A block request was parsed and queued; arg: head index.
    BlkQueued = 11,
    /// A block worker took a request; arg: head index.
    BlkStart = 12,
    /// A block request's used entry is published; arg: head << 1 | irq.
    BlkDone = 13,
    /// A vCPU exit to this process for MMIO; arg: address.
    VcpuMmio = 20,
    /// A vCPU exit to this process for port I/O; arg: port.
    VcpuPio = 21,
}

struct Buffer {
    start: Instant,
    slots: Box<[[AtomicU64; 2]]>,
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
                    .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
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
            "TRACE {} {} {:#x}\n",
            s[0].load(Ordering::Relaxed),
            v >> 48,
            v & 0xffff_ffff_ffff
        ));
    }
    eprint!("{out}");
}
