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

use crate::blocked::{read_refused, write_read_back};
use crate::disks::{self, RESERVED_BYTES};
use crate::scenarios::{reserve_hugepages, DATA_IOVA, RING_IOVA};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{HugeBuf, VirtioBlk, HUGE_PAGE};
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
    let read = read_refused(
        &mut dev,
        &data,
        (sector, iova(last), PAGE),
        Duration::from_millis(p.num("wait_ms", 3000)),
        (last as usize * PAGE, PAGE),
        CANARY,
    )?;

    phase("map-limit: unmap", 0);
    for i in 0..max {
        dev.sess.unmap_dma(iova(i), PAGE as u64)?;
    }

    phase("map-limit: i/o after reset", 0);
    dev.init()?;
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    let io = write_read_back(&mut dev, &data, sector, 16 * 1024);
    dev.sess.unmap_dma(DATA_IOVA, HUGE_PAGE as u64)?;
    let _ = dev.reset();

    let summary = format!(
        "disk={} maps_tried={max} refused_seen={refused_seen} {} io_after={}",
        disk.id,
        read.fields(),
        if io.is_ok() { "ok" } else { "bad" }
    );
    say(&format!("map-limit: {summary}"));
    if read.landed != 0 {
        return Err(format!("{summary}: DMA landed through a refused MAP"));
    }
    if let Err(e) = io {
        return Err(format!("{summary}: the device fails after the reset ({e})"));
    }
    Ok(summary)
}
