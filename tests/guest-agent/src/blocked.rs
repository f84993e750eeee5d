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

pub fn unmap_blocked(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = disks::pick(&disks, p.get("blocked_disk"), true)?;
    phase("unmap-blocked: bind", 0);
    reserve_hugepages(4)?;
    bind_vfio_pci(&disk.bdf)?;
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let sector = RESERVED_BYTES / 512;
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8 ^ 0x3c).collect();

    // 1. The path works while mapped: write the pattern, read it back.
    phase("unmap-blocked: mapped i/o", 0);
    data.write(0, &pattern);
    data.fill(LEN, LEN, 0);
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    let s = dev.io(VIRTIO_BLK_T_OUT, sector, DATA_IOVA, LEN as u32)?;
    if s != 0 {
        return Err(format!("mapped WRITE status {s}"));
    }
    let s = dev.io(VIRTIO_BLK_T_IN, sector, DATA_IOVA + LEN as u64, LEN as u32)?;
    let mut back = vec![0u8; LEN];
    data.read(LEN, &mut back);
    if s != 0 || back != pattern {
        return Err(format!(
            "mapped READ status {s}, data {}",
            if back == pattern { "ok" } else { "wrong" }
        ));
    }

    // 2. UNMAP, then the same READ into the unmapped IOVA.
    phase("unmap-blocked: unmap", 0);
    data.fill(0, HUGE_PAGE, CANARY);
    let n = dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
    if n != HUGE_PAGE as u64 {
        return Err(format!("UNMAP_DMA unmapped {n} of {HUGE_PAGE} bytes"));
    }
    phase("unmap-blocked: read after unmap", 0);
    dev.push(0, VIRTIO_BLK_T_IN, sector, DATA_IOVA, LEN as u32);
    dev.notify()?;
    let wait = Duration::from_millis(p.num("wait_ms", 3000));
    let completed = dev.wait_completions(1, wait).is_ok();
    let status = dev.slot_status(0);
    let dev_status = dev.status()?;
    let needs_reset = dev_status & STATUS_NEEDS_RESET != 0;
    let landed = data.count_not(0, HUGE_PAGE, CANARY);
    let shown = if status == STATUS_UNTOUCHED {
        "none".to_string()
    } else {
        status.to_string()
    };
    let summary = format!(
        "disk={} landed_bytes={landed} completed={} req_status={shown} needs_reset={}",
        disk.id,
        u8::from(completed),
        u8::from(needs_reset)
    );
    say(&format!("unmap-blocked: {summary}"));
    let _ = dev.reset();
    if landed != 0 {
        return Err(format!(
            "{summary}: the device wrote through an unmapped IOVA"
        ));
    }
    Ok(summary)
}
