//! `dma-race fence`: the UNMAP race against a READ the host cannot cancel.
//!
//! The disk is throttled (by the outer QEMU on the nested bed) so that a
//! READ takes many seconds once issued: the VMM's revocation after its
//! grace period cannot stop it. Each round submits a filler READ and the
//! racing READ into the data buffer, UNMAPs the buffer while the racing
//! READ is in flight and times the UNMAP; meanwhile a writer thread on
//! another vCPU keeps writing one word in each page of the buffer (the
//! pages a fencing VMM replaces during the UNMAP). Then:
//!
//! - `lost_writes`: writes the writer found gone on its next visit of the
//!   page, or that its word no longer holds at the end (a fence that
//!   copied a page while a vCPU still wrote it). In `fence-off` the READ's
//!   own DMA, which lands while the UNMAP waits for it, counts too;
//! - the buffer is filled with the canary, and once the READ has ended
//!   (it must end with an error: its data went to pages the guest no
//!   longer has), any byte that is not the canary is a violation.
//!
//! Variant `fence` runs against a VMM that fences (`--iommu fence_ms=`),
//! `fence-off` against one that waits for the DMA (the control: its UNMAP
//! takes as long as the READ). After the rounds, a few write/read-verify
//! cycles check that the device and the guest's memory still work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::scenarios::{churn_cycle, start_race, RaceCfg, RaceStats, Rng, CANARY, DATA_IOVA};
use crate::virtio::{HugeBuf, VirtioBlk, HUGE_PAGE};
use crate::{phase, Res};

const PAGE: usize = 4096;
/// Where in each page the writer writes its word (the last 8 bytes).
const WORD_OFF: usize = PAGE - 8;
/// How long a round waits for the racing READ to end.
const READ_WAIT: Duration = Duration::from_secs(240);

/// The writer: until `stop`, writes an increasing value into the word of
/// each page of `[0, len)` in turn, first checking that the word still
/// holds what it wrote there on its previous visit (a page replaced by a
/// stale copy shows an older value). Returns the value each word got last
/// and how many visits found their previous write gone.
fn write_words(buf: SendPtr, len: usize, stop: &AtomicBool) -> (Vec<u64>, u64) {
    let pages = len / PAGE;
    let mut last = vec![0u64; pages];
    let mut gone = 0;
    let mut v = 1u64;
    while !stop.load(Ordering::Acquire) {
        for (p, l) in last.iter_mut().enumerate() {
            // SAFETY: `p * PAGE + WORD_OFF + 8 <= len`, inside the buffer,
            // which outlives the writer (joined before the buffer is
            // reused); 8-byte aligned.
            let word = unsafe { buf.0.add(p * PAGE + WORD_OFF).cast::<u64>() };
            // SAFETY: as above.
            if *l != 0 && unsafe { std::ptr::read_volatile(word) } != *l {
                gone += 1;
            }
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(word, v) };
            *l = v;
            v += 1;
        }
    }
    (last, gone)
}

/// Words that do not hold what the writer wrote there last.
fn lost_words(data: &HugeBuf, last: &[u64]) -> u64 {
    std::sync::atomic::fence(Ordering::SeqCst);
    last.iter()
        .enumerate()
        .filter(|&(p, &want)| {
            // SAFETY: as in `write_words`.
            let got =
                unsafe { std::ptr::read_volatile(data.ptr.add(p * PAGE + WORD_OFF).cast::<u64>()) };
            got != want
        })
        .count() as u64
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the pointer is only dereferenced inside the buffer while the
// buffer lives (see `write_words`).
unsafe impl Send for SendPtr {}

/// Pins the calling thread to a CPU other than `avoid`, if there is one;
/// returns the CPU.
fn move_off_cpu(avoid: usize) -> Option<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = (0..n).find(|&c| c != avoid)?;
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0)
            .then_some(cpu)
    }
}

/// The calling thread's CPU.
fn this_cpu() -> usize {
    // SAFETY: no arguments.
    usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0)
}

/// Runs `rounds` fence rounds; returns the stats and the writes lost.
pub(crate) fn race_fence(
    bdf: &str,
    cfg: &RaceCfg,
    data: &HugeBuf,
    first_round: u64,
    variant: &'static str,
) -> Res<(RaceStats, u64, bool)> {
    let mut dev = VirtioBlk::open(bdf, crate::scenarios::RING_IOVA)?;
    let mut st = RaceStats::default();
    let mut lost = 0;
    let mut writer_elsewhere = true;
    for r in 0..cfg.rounds {
        phase("dma-race fence: round", r);
        let mut done = start_race(&mut dev, cfg, data, first_round + r)?;
        if !done.contains(&1) {
            st.inflight_at_unmap += 1;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let me = this_cpu();
        let writer = {
            let (stop, buf, len) = (stop.clone(), SendPtr(data.ptr), cfg.race_len);
            std::thread::spawn(move || {
                let cpu = move_off_cpu(me);
                (write_words(buf, len, &stop), cpu)
            })
        };
        // Let the writer get going on its CPU.
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        let n = dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
        let us = t.elapsed().as_micros() as u64;
        stop.store(true, Ordering::Release);
        let ((last, gone), cpu) = writer
            .join()
            .map_err(|_| "the writer panicked".to_string())?;
        lost += gone;
        writer_elsewhere &= cpu.is_some();
        if n != HUGE_PAGE as u64 {
            return Err(format!(
                "UNMAP_DMA unmapped {n} bytes, expected {HUGE_PAGE}"
            ));
        }
        lost += lost_words(data, &last);
        data.fill(0, cfg.race_len, CANARY);
        st.push_unmap_us(us);
        let left = 2 - done.len();
        phase("dma-race fence: waiting for the READ", r);
        done.extend(
            dev.wait_completions(left, READ_WAIT)?
                .iter()
                .map(|c| c.slot),
        );
        std::thread::sleep(Duration::from_millis(50));
        st.canary_checked(data.count_not(0, cfg.race_len, CANARY));
        st.count_status(dev.slot_status(1));
        st.round_done(variant);
    }
    // The device and the guest's memory still work: write, read back,
    // verify, through fresh mappings.
    let mut rng = Rng::new(0xfe4ce);
    let blocks = (cfg.capacity.saturating_sub(crate::disks::RESERVED_BYTES) / (64 * 1024)).max(1);
    for i in 0..4 {
        churn_cycle(&mut dev, data, &mut rng, i, blocks)
            .map_err(|e| format!("I/O after the fences: {e}"))?;
    }
    dev.reset()?;
    Ok((st, lost, writer_elsewhere))
}
