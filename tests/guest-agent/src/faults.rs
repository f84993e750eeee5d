//! faults: the VMM's injected backend faults seen from a real guest, on
//! `iommu=on` disks driven through VFIO.
//!
//! - `flaky` (the VMM fails every Nth request of the disk): the agent
//!   writes then reads back `blocks` 4 KiB blocks one request at a time.
//!   The requests that fail must be exactly periodic with period N; a read
//!   that succeeds must return what the write left (the pattern if the
//!   write succeeded, the old data if it failed); a failed read must leave
//!   the buffer untouched. Then an UNMAP of the buffers must reply at once:
//!   no failed request left a pin behind.
//! - `stuck` (a request covering `stall_sector` never completes until the
//!   IOMMU revokes it): a READ there, then an UNMAP of its buffer. The
//!   UNMAP must wait (the read is in flight) and reply after the IOMMU's
//!   revoke grace plus a small bound; the read completes with IOERR and
//!   nothing lands in the buffer after the reply. Meanwhile a thread keeps
//!   verified O_DIRECT I/O going on the `good` disk through the kernel's
//!   driver: the VMM keeps serving its other disks.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disks::{self, Disk, RESERVED_BYTES};
use crate::scenarios::{reserve_hugepages, AlignedBuf, CANARY, DATA_IOVA, RING_IOVA};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{
    HugeBuf, VirtioBlk, HUGE_PAGE, STATUS_UNTOUCHED, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::{phase, say, Params, Res};

const BLOCK: usize = 4096;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;

/// The byte block `i` is written with.
fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7) | 1
}

/// Runs one request in slot 0 and waits for it; returns its status.
fn one_request(dev: &mut VirtioBlk, kind: u32, sector: u64, iova: u64, len: u32) -> Res<u8> {
    dev.push(0, kind, sector, iova, len);
    dev.notify()?;
    dev.wait_completions(1, Duration::from_secs(30))?;
    Ok(dev.slot_status(0))
}

/// The failing requests' positions must be `first, first + n, ...` with
/// `first < n`, and nothing else.
fn periodic(failed: &[usize], total: usize, n: usize) -> Res<()> {
    let Some(&first) = failed.first() else {
        return Err(format!("no request failed in {total} (fail_every={n})"));
    };
    let expected: Vec<usize> = (first..total).step_by(n).collect();
    if first >= n || failed != expected.as_slice() {
        return Err(format!(
            "failed requests {failed:?} of {total} are not every {n}th"
        ));
    }
    Ok(())
}

fn flaky(disk: &Disk, data: &HugeBuf, p: &Params) -> Res<String> {
    let n = p.num("fail_every", 7) as usize;
    let blocks = (p.num("blocks", 64) as usize).clamp(1, HUGE_PAGE / BLOCK);
    let base = RESERVED_BYTES / 512;
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    let sector = |i: usize| base + (i * BLOCK / 512) as u64;
    let iova = |i: usize| DATA_IOVA + (i * BLOCK) as u64;

    // What the disk holds before: read once through the same path (these
    // reads count towards the period too).
    let mut statuses = Vec::new();
    let mut before = vec![None; blocks];
    for (i, b) in before.iter_mut().enumerate() {
        phase("faults flaky: read before", i as u64);
        data.fill(i * BLOCK, BLOCK, CANARY);
        let s = one_request(&mut dev, VIRTIO_BLK_T_IN, sector(i), iova(i), BLOCK as u32)?;
        if s == VIRTIO_BLK_S_OK {
            let mut v = vec![0u8; BLOCK];
            data.read(i * BLOCK, &mut v);
            *b = Some(v);
        }
        statuses.push(s);
    }
    let mut written = vec![false; blocks];
    for (i, w) in written.iter_mut().enumerate() {
        phase("faults flaky: write", i as u64);
        data.fill(i * BLOCK, BLOCK, pattern(i));
        let s = one_request(&mut dev, VIRTIO_BLK_T_OUT, sector(i), iova(i), BLOCK as u32)?;
        *w = s == VIRTIO_BLK_S_OK;
        statuses.push(s);
    }
    let mut bad = Vec::new();
    for i in 0..blocks {
        phase("faults flaky: read back", i as u64);
        data.fill(i * BLOCK, BLOCK, CANARY);
        let s = one_request(&mut dev, VIRTIO_BLK_T_IN, sector(i), iova(i), BLOCK as u32)?;
        statuses.push(s);
        if s != VIRTIO_BLK_S_OK {
            // A failed read does no I/O: the buffer keeps the canary.
            if data.count_not(i * BLOCK, BLOCK, CANARY) != 0 {
                bad.push(format!("block {i}: failed read wrote the buffer"));
            }
            continue;
        }
        let ok = if written[i] {
            data.count_not(i * BLOCK, BLOCK, pattern(i)) == 0
        } else if let Some(old) = &before[i] {
            let mut v = vec![0u8; BLOCK];
            data.read(i * BLOCK, &mut v);
            &v == old
        } else {
            // Neither the write nor the first read went through: only
            // "not the pattern" can be said.
            data.count_not(i * BLOCK, BLOCK, pattern(i)) != 0
        };
        if !ok {
            bad.push(format!("block {i}: wrong data (write ok={})", written[i]));
        }
    }
    let unexpected: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter(|(_, &s)| s != VIRTIO_BLK_S_OK && s != VIRTIO_BLK_S_IOERR)
        .map(|(i, s)| format!("request {i}: status {s:#x}"))
        .collect();
    if !unexpected.is_empty() {
        return Err(format!("unexpected statuses: {}", unexpected.join(", ")));
    }
    let failed: Vec<usize> = statuses
        .iter()
        .enumerate()
        .filter(|(_, &s)| s == VIRTIO_BLK_S_IOERR)
        .map(|(i, _)| i)
        .collect();
    periodic(&failed, statuses.len(), n)?;
    if !bad.is_empty() {
        return Err(format!("data: {}", bad.join("; ")));
    }
    // No request, failed or not, may have left a pin: the UNMAP of every
    // buffer replies without waiting for anything.
    let t = Instant::now();
    dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
    let unmap_us = t.elapsed().as_micros() as u64;
    dev.reset()?;
    let line = format!(
        "faults flaky: requests={} ioerr={} fail_every={n} unmap_after_us={unmap_us}",
        statuses.len(),
        failed.len()
    );
    say(&line);
    let limit = p.num("unmap_limit_us", 50_000);
    if unmap_us > limit {
        return Err(format!(
            "{line}: the UNMAP after the errors took over {limit} µs (a pin left behind?)"
        ));
    }
    Ok(format!(
        "flaky_ioerr={} flaky_requests={}",
        failed.len(),
        statuses.len()
    ))
}

/// Verified O_DIRECT writes and reads on `disk` until `stop`; counts the
/// verified operations and the errors.
fn keep_serving(disk: Disk, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>, errors: Arc<AtomicU64>) {
    let f = match disk.open_direct() {
        Ok(f) => f,
        Err(e) => {
            say(&format!("faults: {e}"));
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let len = 64 * 1024;
    let mut buf = AlignedBuf::new(len);
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let off = RESERVED_BYTES + (i % 64) * len as u64;
        let v = (i as u8) | 1;
        buf.as_mut().fill(v);
        let ok = f.write_all_at(buf.as_mut(), off).is_ok() && {
            buf.as_mut().fill(0);
            f.read_exact_at(buf.as_mut(), off).is_ok() && buf.as_mut().iter().all(|&b| b == v)
        };
        if ok {
            ops.fetch_add(1, Ordering::Relaxed);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
    }
}

fn stuck(disk: &Disk, good: &Disk, data: &HugeBuf, p: &Params) -> Res<String> {
    let rounds = p.num("stuck_rounds", 3);
    let sector = p.num("stall_sector", 65536);
    let grace_us = p.num("grace_us", 100_000);
    let bound_us = p.num("bound_us", 2_000_000);
    let len = 64 * 1024;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let server = {
        let (good, stop, ops, errors) = (good.clone(), stop.clone(), ops.clone(), errors.clone());
        std::thread::spawn(move || keep_serving(good, stop, ops, errors))
    };
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let mut unmap_us = Vec::new();
    let mut violations = 0;
    let mut result = Ok(());
    for r in 0..rounds {
        phase("faults stuck: round", r);
        data.fill(0, len, 0x3c);
        dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
        dev.push(1, VIRTIO_BLK_T_IN, sector, DATA_IOVA, len as u32);
        dev.notify()?;
        std::thread::sleep(Duration::from_millis(20));
        if !dev.pop_used().is_empty() {
            result = Err("the stalled READ completed on its own".to_string());
            break;
        }
        let ops_before = ops.load(Ordering::Relaxed);
        let t = Instant::now();
        dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
        let us = t.elapsed().as_micros() as u64;
        data.fill(0, len, CANARY);
        unmap_us.push(us);
        dev.wait_completions(1, Duration::from_secs(10))
            .map_err(|e| format!("the revoked READ never completed: {e}"))?;
        let status = dev.slot_status(1);
        std::thread::sleep(Duration::from_millis(200));
        if data.count_not(0, len, CANARY) != 0 {
            violations += 1;
        }
        if status != VIRTIO_BLK_S_IOERR {
            let s = if status == STATUS_UNTOUCHED {
                "untouched".to_string()
            } else {
                format!("{status:#x}")
            };
            result = Err(format!(
                "round {r}: the revoked READ's status is {s}, not IOERR"
            ));
            break;
        }
        if us < grace_us * 9 / 10 || us > grace_us + bound_us {
            result = Err(format!(
                "round {r}: UNMAP replied after {us} µs, expected the grace ({grace_us} µs) \
                 plus at most {bound_us} µs"
            ));
            break;
        }
        say(&format!(
            "faults stuck: round {r} unmap_us={us} status=IOERR good_ops_during={}",
            ops.load(Ordering::Relaxed) - ops_before
        ));
    }
    // Let the other disk show it is still served after the rounds.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    dev.reset()?;
    result?;
    let (ops, errors) = (ops.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let mut v = unmap_us.clone();
    v.sort_unstable();
    let line = format!(
        "faults stuck: rounds={rounds} violations={violations} unmap_us min/median/max={}/{}/{} \
         good_ops={ops} good_errors={errors}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    );
    say(&line);
    if violations > 0 {
        return Err(format!("{line}: the device wrote after the UNMAP reply"));
    }
    if ops == 0 || errors > 0 {
        return Err(format!("{line}: the other disk was not served"));
    }
    Ok(format!(
        "stuck_rounds={rounds} stuck_violations=0 good_ops={ops}"
    ))
}

pub fn faults(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 3) as usize)?;
    let flaky_disk = disks::pick(&disks, Some("flaky"), true)?;
    let stuck_disk = disks::pick(&disks, Some("stuck"), true)?;
    let good = disks::pick(&disks, Some("good"), true)?;
    reserve_hugepages(p.num("hugepages", 16))?;
    phase("faults: bind", 0);
    bind_vfio_pci(&flaky_disk.bdf)?;
    bind_vfio_pci(&stuck_disk.bdf)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let a = flaky(&flaky_disk, &data, p)?;
    let b = stuck(&stuck_disk, &good, &data, p)?;
    Ok(format!("{a} {b}"))
}

#[cfg(test)]
mod tests {
    use super::periodic;

    #[test]
    fn periodic_failures() {
        assert!(periodic(&[2, 9, 16], 20, 7).is_ok());
        assert!(periodic(&[2, 9], 20, 7).is_err(), "16 is missing");
        assert!(periodic(&[2, 9, 16, 17], 20, 7).is_err(), "17 is extra");
        assert!(
            periodic(&[8, 15], 20, 7).is_err(),
            "first beyond the period"
        );
        assert!(periodic(&[], 20, 7).is_err());
    }
}
