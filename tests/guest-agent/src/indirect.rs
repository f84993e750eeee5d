//! indirect: a chain that refers to an indirect descriptor table at an
//! IOVA that is not mapped must not make the device read the table.
//!
//! A device behind the IOMMU offers no VIRTIO_F_RING_INDIRECT_DESC, so a
//! driver that sets VRING_DESC_F_INDIRECT breaks the protocol; the device
//! may fault, fail the request or report DEVICE_NEEDS_RESET, but it must
//! not read guest memory at an address no translation allowed. The agent
//! makes such a read visible: the IOVA it puts in the descriptor is the
//! guest-physical address of a page that holds a valid table (a READ of a
//! sector the agent wrote a pattern to, into a canaried buffer that is
//! mapped). A device that takes the descriptor's address for a
//! guest-physical one finds the table, performs the READ, and the pattern
//! lands in the buffer.
//!
//! The agent only reports (`landed_bytes=.. completed=.. req_status=..
//! needs_reset=.. table_gpa=..`); the test decides (nothing may land on a
//! strict VMM; upstream Cloud Hypervisor is the control).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use crate::blocked::write_read_back;
use crate::disks::{self, RESERVED_BYTES};
use crate::scenarios::{reserve_hugepages, DATA_IOVA, RING_IOVA};
use crate::vfio::bind_vfio_pci;
use crate::virtio::{
    HugeBuf, VirtioBlk, HUGE_PAGE, STATUS_NEEDS_RESET, STATUS_UNTOUCHED, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use crate::{phase, say, Params, Res};

/// Bytes of the READ the table describes.
const LEN: usize = 4096;
/// Where in the data buffer the table sits (its own page).
const TABLE_OFF: usize = 0x10_0000;
/// Where in the data buffer the READ would land.
const DEST_OFF: usize = 0x8000;
const CANARY: u8 = 0x5a;
/// The lowest IOVA the agent maps (the rings): the table's address must
/// stay below it so that no mapping of this domain covers it.
const LOWEST_MAPPED_IOVA: u64 = RING_IOVA;

/// Guest-physical address of the byte at `ptr` (this process's page map;
/// the agent runs as root, so the frame numbers are shown).
fn guest_physical(ptr: *const u8) -> Res<u64> {
    let va = ptr as u64;
    let f = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, (va / 4096) * 8)
        .map_err(|e| format!("read pagemap: {e}"))?;
    let e = u64::from_le_bytes(entry);
    if e & (1 << 63) == 0 {
        return Err(format!("page at {va:#x} not present"));
    }
    let pfn = e & ((1 << 55) - 1);
    if pfn == 0 {
        return Err("pagemap shows no frame numbers (not root?)".into());
    }
    Ok(pfn * 4096 + va % 4096)
}

pub fn indirect(p: &Params) -> Res<String> {
    let disks = disks::discover(p.num("ndisks", 0) as usize)?;
    let disk = disks::pick(&disks, p.get("indirect_disk"), true)?;
    phase("indirect: bind", 0);
    reserve_hugepages(4)?;
    bind_vfio_pci(&disk.bdf)?;
    let mut dev = VirtioBlk::open(&disk.bdf, RING_IOVA)?;
    let data = HugeBuf::new(HUGE_PAGE)?;
    let sector = RESERVED_BYTES / 512;

    // The path works: a pattern written to `sector` and read back.
    phase("indirect: mapped i/o", 0);
    dev.sess.map_dma(data.ptr, DATA_IOVA, HUGE_PAGE as u64)?;
    write_read_back(&mut dev, &data, sector, LEN).map_err(|e| format!("mapped {e}"))?;

    // The table, in a page of the (mapped) buffer: header, data (into the
    // canaried range), status; its guest-physical address becomes the
    // descriptor's "IOVA", which no mapping of this domain covers.
    // SAFETY: TABLE_OFF is inside the buffer's HUGE_PAGE bytes.
    let table_gpa = guest_physical(unsafe { data.ptr.add(TABLE_OFF) })?;
    if table_gpa + 48 > LOWEST_MAPPED_IOVA {
        return Err(format!(
            "the table's guest-physical address {table_gpa:#x} is not below the mapped IOVAs"
        ));
    }
    data.fill(DEST_OFF, LEN, CANARY);
    // The table is complete before the chain that names it is available.
    let (hdr_iova, status_iova) = dev.slot_iovas(0);
    data.put_desc(TABLE_OFF, hdr_iova, 16, VRING_DESC_F_NEXT, 1);
    data.put_desc(
        TABLE_OFF + 16,
        DATA_IOVA + DEST_OFF as u64,
        LEN as u32,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        2,
    );
    data.put_desc(TABLE_OFF + 32, status_iova, 1, VRING_DESC_F_WRITE, 0);
    phase("indirect: submit", 0);
    dev.push_indirect(0, sector, table_gpa, 48);
    dev.notify()?;
    let completed = dev
        .wait_completions(1, Duration::from_millis(p.num("wait_ms", 3000)))
        .is_ok();
    let status = dev.slot_status(0);
    let needs_reset = dev.status()? & STATUS_NEEDS_RESET != 0;
    let landed = data.count_not(DEST_OFF, LEN, CANARY);
    let shown = if status == STATUS_UNTOUCHED {
        "none".to_string()
    } else {
        status.to_string()
    };
    let summary = format!(
        "disk={} landed_bytes={landed} completed={} req_status={shown} needs_reset={} table_gpa={table_gpa:#x}",
        disk.id,
        u8::from(completed),
        u8::from(needs_reset)
    );
    say(&format!("indirect: {summary}"));
    let _ = dev.reset();
    Ok(summary)
}
