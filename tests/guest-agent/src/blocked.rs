//! unmap-blocked: after UNMAP replies, the device cannot reach the buffer.
//!
//! Run on a disk driven over VFIO in L2 (the agent's userspace virtio-blk
//! driver), typically a PCI device that the VMM itself passed through with
//! VFIO. The agent proves the path first (a mapped write and read-back of
//! a pattern), then maps a canary buffer, UNMAPs it, and submits a READ
//! whose data descriptor points at the unmapped IOVA. Nothing may land in
//! the buffer. How the device reports the refused DMA is its own business
//! (QEMU's virtio-blk: DEVICE_NEEDS_RESET for this READ, but status OK with
//! nothing written for a one-page READ), so the agent reports it and the
//! test checks the IOMMU's fault log below.

use std::time::Duration;

use crate::disks::{self, RESERVED_BYTES};
use crate::scenarios::{reserve_hugepages, DATA_IOVA, RING_IOVA};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{
    HugeBuf, VirtioBlk, HUGE_PAGE, STATUS_NEEDS_RESET, STATUS_UNTOUCHED, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::{phase, say, Params, Res};

/// Bytes read into the unmapped buffer.
const LEN: usize = 16 * 1024;
/// The canary byte the buffer holds while unmapped.
const CANARY: u8 = 0xa5;

/// Writes a pattern from the start of `data` (mapped at `DATA_IOVA`) to
/// `sector`, reads it back into the `len` bytes after it and compares.
/// `Err` says which step failed.
pub(crate) fn write_read_back(
    dev: &mut VirtioBlk,
    data: &HugeBuf,
    sector: u64,
    len: usize,
) -> Res<()> {
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    data.write(0, &pattern);
    data.fill(len, len, 0);
    let w = dev.io(VIRTIO_BLK_T_OUT, sector, DATA_IOVA, len as u32)?;
    if w != 0 {
        return Err(format!("WRITE status {w}"));
    }
    let r = dev.io(VIRTIO_BLK_T_IN, sector, DATA_IOVA + len as u64, len as u32)?;
    let mut back = vec![0u8; len];
    data.read(len, &mut back);
    if r != 0 || back != pattern {
        return Err(format!(
            "READ status {r}, data {}",
            if back == pattern { "ok" } else { "wrong" }
        ));
    }
    Ok(())
}

/// What became of a READ that the IOMMU below should refuse.
pub(crate) struct RefusedRead {
    completed: bool,
    status: u8,
    needs_reset: bool,
    /// Bytes of the watched range that no longer hold the canary.
    pub landed: usize,
}

impl RefusedRead {
    /// `landed_bytes=.. completed=.. req_status=.. needs_reset=..`.
    pub(crate) fn fields(&self) -> String {
        let shown = if self.status == STATUS_UNTOUCHED {
            "none".to_string()
        } else {
            self.status.to_string()
        };
        format!(
            "landed_bytes={} completed={} req_status={shown} needs_reset={}",
            self.landed,
            u8::from(self.completed),
            u8::from(self.needs_reset)
        )
    }
}

/// Submits a READ of `len` bytes from `sector` into `iova`, waits up to
/// `wait` for it, and counts the bytes of `data[watch.0..watch.0 +
/// watch.1]` that are no longer `canary`.
pub(crate) fn read_refused(
    dev: &mut VirtioBlk,
    data: &HugeBuf,
    (sector, iova, len): (u64, u64, usize),
    wait: Duration,
    watch: (usize, usize),
    canary: u8,
) -> Res<RefusedRead> {
    dev.push(0, VIRTIO_BLK_T_IN, sector, iova, len as u32);
    dev.notify()?;
    let completed = dev.wait_completions(1, wait).is_ok();
    Ok(RefusedRead {
        completed,
        status: dev.slot_status(0),
        needs_reset: dev.status()? & STATUS_NEEDS_RESET != 0,
        landed: data.count_not(watch.0, watch.1, canary),
    })
}

pub fn unmap_blocked(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = disks::pick(&disks, p.get("blocked_disk"), true)?;
    phase("unmap-blocked: bind", 0);
    reserve_hugepages(4)?;
    bind_vfio_pci(&disk.bdf)?;
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let sector = RESERVED_BYTES / 512;

    // 1. The path works while mapped: write a pattern, read it back.
    phase("unmap-blocked: mapped i/o", 0);
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    write_read_back(&mut dev, &data, sector, LEN).map_err(|e| format!("mapped {e}"))?;

    // 2. UNMAP, then a READ into the unmapped IOVA.
    phase("unmap-blocked: unmap", 0);
    data.fill(0, HUGE_PAGE, CANARY);
    let n = dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
    if n != HUGE_PAGE as u64 {
        return Err(format!("UNMAP_DMA unmapped {n} of {HUGE_PAGE} bytes"));
    }
    phase("unmap-blocked: read after unmap", 0);
    let read = read_refused(
        &mut dev,
        &data,
        (sector, DATA_IOVA, LEN),
        Duration::from_millis(p.num("wait_ms", 3000)),
        (0, HUGE_PAGE),
        CANARY,
    )?;
    let summary = format!("disk={} {}", disk.id, read.fields());
    say(&format!("unmap-blocked: {summary}"));
    let _ = dev.reset();
    if read.landed != 0 {
        return Err(format!(
            "{summary}: the device wrote through an unmapped IOVA"
        ));
    }
    Ok(summary)
}
