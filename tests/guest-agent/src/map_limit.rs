//! map-limit: a MAP that the device below refuses is not in effect.
//!
//! Run on a passed-through disk whose VFIO container in L1 takes only a few
//! mappings (L1's `vfio_iommu_type1 dma_entry_limit`). The agent maps one
//! page after another over VFIO in L2, more than the container takes: the
//! VMM's container refuses the rest, and the virtio-iommu answers those
//! MAPs S_DEVERR and rolls them back. (Linux's virtio-iommu driver sends
//! MAPs without waiting and never reads their status, so L2's VFIO reports
//! success anyway; the agent counts the failures it does see.) Then a READ
//! into the last page, whose MAP was refused, must land nothing, and after
//! a reset the device must work again (a verified write and read through a
//! fresh mapping). How QEMU's device reports the refused DMA varies (seen:
//! DEVICE_NEEDS_RESET for 16 KiB, status OK with nothing written for one
//! page), so only "nothing landed" is required here; the test checks L1's
//! fault log.

use std::time::Duration;

use crate::disks::{self, RESERVED_BYTES};
use crate::scenarios::{reserve_hugepages, DATA_IOVA, RING_IOVA};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{
    HugeBuf, VirtioBlk, HUGE_PAGE, STATUS_NEEDS_RESET, STATUS_UNTOUCHED, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::{phase, say, Params, Res};

const PAGE: usize = 4096;
const CANARY: u8 = 0xc3;

pub fn map_limit(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = disks::pick(&disks, p.get("limit_disk"), true)?;
    let max = p.num("max_maps", 256).clamp(2, 512);
    phase("map-limit: bind", 0);
    reserve_hugepages(4)?;
    bind_vfio_pci(&disk.bdf)?;
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    data.fill(0, HUGE_PAGE, CANARY);

    // Page i of the buffer at an IOVA two pages apart from the next, so no
    // two mappings touch.
    let iova = |i: u64| DATA_IOVA + i * 2 * PAGE as u64;
    let mut refused_seen = 0u64;
    for i in 0..max {
        phase("map-limit: map", i);
        // SAFETY: i < 512 pages of the 2 MiB buffer.
        let vaddr = unsafe { data.ptr.add(i as usize * PAGE) };
        if dev.sess.map_dma(vaddr, iova(i), PAGE as u64).is_err() {
            refused_seen += 1;
        }
    }

    phase("map-limit: read into a refused page", 0);
    let last = max - 1;
    let sector = RESERVED_BYTES / 512;
    dev.push(0, VIRTIO_BLK_T_IN, sector, iova(last), PAGE as u32);
    dev.notify()?;
    let completed = dev
        .wait_completions(1, Duration::from_millis(p.num("wait_ms", 3000)))
        .is_ok();
    let status = dev.slot_status(0);
    let needs_reset = dev.status()? & STATUS_NEEDS_RESET != 0;
    let landed = data.count_not(last as usize * PAGE, PAGE, CANARY);

    phase("map-limit: unmap", 0);
    for i in 0..max {
        dev.sess.unmap_dma(iova(i), PAGE as u64)?;
    }

    phase("map-limit: i/o after reset", 0);
    dev.init()?;
    let len = 16 * 1024;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    data.write(0, &pattern);
    data.fill(len, len, 0);
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    let w = dev.io(VIRTIO_BLK_T_OUT, sector, DATA_IOVA, len as u32)?;
    let r = dev.io(VIRTIO_BLK_T_IN, sector, DATA_IOVA + len as u64, len as u32)?;
    let mut back = vec![0u8; len];
    data.read(len, &mut back);
    dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
    let _ = dev.reset();
    let io_ok = w == 0 && r == 0 && back == pattern;

    let shown = if status == STATUS_UNTOUCHED {
        "none".to_string()
    } else {
        status.to_string()
    };
    let summary = format!(
        "disk={} maps_tried={max} refused_seen={refused_seen} landed_bytes={landed} \
         completed={} req_status={shown} needs_reset={} io_after={}",
        disk.id,
        u8::from(completed),
        u8::from(needs_reset),
        if io_ok { "ok" } else { "bad" }
    );
    say(&format!("map-limit: {summary}"));
    if landed != 0 {
        return Err(format!("{summary}: DMA landed through a refused MAP"));
    }
    if !io_ok {
        return Err(format!(
            "{summary}: the device fails after the reset (write {w}, read {r})"
        ));
    }
    Ok(summary)
}
