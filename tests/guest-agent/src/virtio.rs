//! A small userspace virtio-pci (modern) block driver over VFIO: one split
//! queue, no interrupts (the used ring is polled).

use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::vfio::{VfioSession, VFIO_REGION_INFO_FLAG_MMAP};
use crate::{os_err, Res};

pub const HUGE_PAGE: usize = 2 << 20;

const PCI_COMMAND: u64 = 0x04;
const PCI_STATUS: u64 = 0x06;
const PCI_CAP_PTR: u64 = 0x34;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
const PCI_CAP_ID_VNDR: u8 = 0x09;

const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

// virtio_pci_common_cfg offsets.
const CC_DEVICE_FEATURE_SELECT: u64 = 0;
const CC_DEVICE_FEATURE: u64 = 4;
const CC_DRIVER_FEATURE_SELECT: u64 = 8;
const CC_DRIVER_FEATURE: u64 = 12;
const CC_MSIX_CONFIG: u64 = 16;
const CC_NUM_QUEUES: u64 = 18;
const CC_DEVICE_STATUS: u64 = 20;
const CC_QUEUE_SELECT: u64 = 22;
const CC_QUEUE_SIZE: u64 = 24;
const CC_QUEUE_MSIX_VECTOR: u64 = 26;
const CC_QUEUE_ENABLE: u64 = 28;
const CC_QUEUE_NOTIFY_OFF: u64 = 30;
const CC_QUEUE_DESC: u64 = 32;
const CC_QUEUE_DRIVER: u64 = 40;
const CC_QUEUE_DEVICE: u64 = 48;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
/// DEVICE_NEEDS_RESET: the device hit an error it cannot recover from.
pub const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Status byte value written before submission; the device overwrites it.
pub const STATUS_UNTOUCHED: u8 = 0xee;

/// Queue size used by the driver (capped by the device maximum).
const QUEUE_SIZE: u16 = 64;
/// Layout of the ring huge page (offsets within it): the three rings in
/// the first three pages, then headers, status bytes and scratch space.
const DESC_OFF: usize = 0x0000;
const AVAIL_OFF: usize = 0x1000;
pub const USED_OFF: usize = 0x2000;
/// End of the rings: with a split layout, `[0, RINGS_LEN)` is mapped on
/// its own and the rest of the page in a second mapping.
pub const RINGS_LEN: usize = 0x3000;
const HDR_OFF: usize = 0x3000;
const STATUS_OFF: usize = 0x3800;
/// Scratch buffer inside the ring page (1 MiB, e.g. for filler READs).
pub const SCRATCH_OFF: usize = 0x10_0000;
pub const SCRATCH_LEN: usize = 0x10_0000;

/// Anonymous memory backed by 2 MiB huge pages (physically contiguous per
/// page, so one VFIO mapping is one guest-physical range).
pub struct HugeBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

impl HugeBuf {
    pub fn new(len: usize) -> Res<Self> {
        let len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        // SAFETY: anonymous private mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(
                "mmap MAP_HUGETLB (are 2 MiB huge pages reserved in /proc/sys/vm/nr_hugepages?)",
            ));
        }
        let b = Self { ptr: p.cast(), len };
        b.fill(0, len, 0);
        Ok(b)
    }

    pub fn fill(&self, off: usize, len: usize, v: u8) {
        assert!(off + len <= self.len);
        // SAFETY: in bounds of our mapping; volatile so that the stores are
        // not elided even though only a device observes them.
        unsafe {
            for i in 0..len {
                ptr::write_volatile(self.ptr.add(off + i), v);
            }
        }
        fence(Ordering::SeqCst);
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        fence(Ordering::SeqCst);
    }

    pub fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.len);
        fence(Ordering::SeqCst);
        // SAFETY: in bounds; volatile reads because a device writes here.
        unsafe {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ptr::read_volatile(self.ptr.add(off + i));
            }
        }
    }

    /// Number of bytes in `[off, off+len)` that differ from `v`.
    pub fn count_not(&self, off: usize, len: usize, v: u8) -> usize {
        assert!(off + len <= self.len);
        fence(Ordering::SeqCst);
        let mut n = 0;
        // SAFETY: in bounds; volatile reads because a device writes here.
        unsafe {
            for i in 0..len {
                if ptr::read_volatile(self.ptr.add(off + i)) != v {
                    n += 1;
                }
            }
        }
        n
    }

    /// Writes a split-ring descriptor (virtio 1.2, 2.7.5) at `off`, 16-byte
    /// aligned: in a descriptor table or in an indirect table.
    pub fn put_desc(&self, off: usize, addr: u64, len: u32, flags: u16, next: u16) {
        self.wr::<u64>(off, addr);
        self.wr::<u32>(off + 8, len);
        self.wr::<u16>(off + 12, flags);
        self.wr::<u16>(off + 14, next);
    }

    fn wr<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds and naturally aligned by construction of the
        // ring layout.
        unsafe { ptr::write_volatile(self.ptr.add(off).cast::<T>(), v) }
    }

    fn rd<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: as for `wr`.
        unsafe { ptr::read_volatile(self.ptr.add(off).cast::<T>()) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Access to one BAR: mmap when VFIO allows it, pread/pwrite otherwise.
struct Bar {
    index: u32,
    map: Option<(*mut u8, usize)>,
}

impl Bar {
    fn new(s: &VfioSession, index: u32) -> Res<Self> {
        let r = s.region(index)?;
        let mut map = None;
        if r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            // SAFETY: mapping a VFIO region at the offset the kernel gave us.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    r.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    s.device.as_raw_fd(),
                    r.offset as libc::off_t,
                )
            };
            if p != libc::MAP_FAILED {
                map = Some((p.cast::<u8>(), r.size as usize));
            }
        }
        Ok(Self { index, map })
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some((p, len)) = self.map {
            // SAFETY: unmapping exactly what `new` mapped.
            unsafe { libc::munmap(p.cast(), len) };
        }
    }
}

#[derive(Clone, Copy)]
struct CapLoc {
    bar: u8,
    offset: u64,
}

pub struct Completion {
    pub slot: u16,
}

/// A virtio-blk device driven from userspace through VFIO.
pub struct VirtioBlk {
    bars: Vec<Option<Bar>>,
    common: CapLoc,
    device_cfg: CapLoc,
    notify_addr: CapLoc,
    pub qsize: u16,
    next_avail: u16,
    last_used: u16,
    /// Offset of the notify register in its BAR before the queue's
    /// notify offset is applied (re-initialisation starts from it).
    notify_base: u64,
    notify_mult: u32,
    pub ring: HugeBuf,
    pub ring_iova: u64,
    /// IOVA of offset 0 of the ring page as seen through the buffers'
    /// mapping: the same as `ring_iova` unless the layout is split.
    pub bufs_iova: u64,
    pub mmapped_bars: usize,
    // Keep last: dropped after the BAR mappings.
    pub sess: VfioSession,
}

impl VirtioBlk {
    /// Opens the device, maps the ring page at `ring_iova`, negotiates
    /// VERSION_1 + ACCESS_PLATFORM and sets up queue 0.
    pub fn open(bdf: &str, ring_iova: u64) -> Res<Self> {
        Self::open_layout(bdf, ring_iova, ring_iova)
    }

    /// Like [`Self::open`], with the rings in a mapping of their own at
    /// `ring_iova` and the headers, status bytes and scratch space in a
    /// second one, at `bufs_iova + offset` (so an UNMAP of the rings
    /// leaves every request buffer mapped).
    pub fn open_split(bdf: &str, ring_iova: u64, bufs_iova: u64) -> Res<Self> {
        assert_ne!(ring_iova, bufs_iova);
        Self::open_layout(bdf, ring_iova, bufs_iova)
    }

    fn open_layout(bdf: &str, ring_iova: u64, bufs_iova: u64) -> Res<Self> {
        let sess = VfioSession::open(bdf)?;
        let cmd = sess.cfg_read16(PCI_COMMAND)?;
        sess.cfg_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)?;
        let (common, notify_addr, notify_mult, device_cfg) = parse_caps(&sess)?;
        let mut bars: Vec<Option<Bar>> = Vec::new();
        let mut mmapped_bars = 0;
        for i in 0..6u32 {
            let used = [common.bar, notify_addr.bar, device_cfg.bar].contains(&(i as u8));
            if used {
                let b = Bar::new(&sess, i)?;
                if b.map.is_some() {
                    mmapped_bars += 1;
                }
                bars.push(Some(b));
            } else {
                bars.push(None);
            }
        }
        let ring = HugeBuf::new(HUGE_PAGE)?;
        if bufs_iova == ring_iova {
            sess.map_dma(ring.ptr, ring_iova, ring.len as u64)?;
        } else {
            sess.map_dma(ring.ptr, ring_iova, RINGS_LEN as u64)?;
            // SAFETY: RINGS_LEN is inside the huge page.
            let rest = unsafe { ring.ptr.add(RINGS_LEN) };
            sess.map_dma(
                rest,
                bufs_iova + RINGS_LEN as u64,
                (ring.len - RINGS_LEN) as u64,
            )?;
        }
        let mut dev = Self {
            bars,
            common,
            device_cfg,
            notify_base: notify_addr.offset,
            notify_mult,
            notify_addr,
            qsize: 0,
            next_avail: 0,
            last_used: 0,
            ring,
            ring_iova,
            bufs_iova,
            mmapped_bars,
            sess,
        };
        dev.init()?;
        Ok(dev)
    }

    /// The IOVA of offset `off` of the ring page.
    pub fn iova_of(&self, off: usize) -> u64 {
        if off < RINGS_LEN {
            self.ring_iova + off as u64
        } else {
            self.bufs_iova + off as u64
        }
    }

    /// Unmaps the rings' mapping (split layout); returns the bytes
    /// unmapped.
    pub fn unmap_rings(&self) -> Res<u64> {
        self.sess.unmap_dma(self.ring_iova, RINGS_LEN as u64)
    }

    /// Resets the device, maps the rings again after
    /// [`Self::unmap_rings`] and sets the device up on them.
    pub fn remap_rings_and_init(&mut self) -> Res<()> {
        self.reset()?;
        self.sess
            .map_dma(self.ring.ptr, self.ring_iova, RINGS_LEN as u64)?;
        self.setup()
    }

    /// Size of the used ring in bytes (flags, idx, entries, avail_event).
    pub fn used_ring_len(&self) -> usize {
        6 + 8 * self.qsize as usize
    }

    fn bar_rw(&self, loc: CapLoc, off: u64, buf: &mut [u8], write: bool) -> Res<()> {
        let bar = self
            .bars
            .get(loc.bar as usize)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| format!("BAR {} not available", loc.bar))?;
        let at = loc.offset + off;
        match bar.map {
            Some((p, len)) => {
                if at as usize + buf.len() > len {
                    return Err(format!("BAR {} access @{at:#x} out of range", bar.index));
                }
                // SAFETY: in bounds of the BAR mapping; MMIO needs single,
                // naturally sized volatile accesses.
                unsafe {
                    let a = p.add(at as usize);
                    match (buf.len(), write) {
                        (1, false) => buf[0] = ptr::read_volatile(a),
                        (1, true) => ptr::write_volatile(a, buf[0]),
                        (2, false) => {
                            buf.copy_from_slice(&ptr::read_volatile(a.cast::<u16>()).to_ne_bytes())
                        }
                        (2, true) => ptr::write_volatile(
                            a.cast::<u16>(),
                            u16::from_ne_bytes([buf[0], buf[1]]),
                        ),
                        (4, false) => {
                            buf.copy_from_slice(&ptr::read_volatile(a.cast::<u32>()).to_ne_bytes())
                        }
                        (4, true) => {
                            let mut w = [0u8; 4];
                            w.copy_from_slice(buf);
                            ptr::write_volatile(a.cast::<u32>(), u32::from_ne_bytes(w))
                        }
                        _ => return Err("bad MMIO access size".into()),
                    }
                }
                Ok(())
            }
            None => {
                if write {
                    self.sess.region_write(bar.index, at, buf)
                } else {
                    self.sess.region_read(bar.index, at, buf)
                }
            }
        }
    }

    fn r8(&self, loc: CapLoc, off: u64) -> Res<u8> {
        let mut b = [0u8; 1];
        self.bar_rw(loc, off, &mut b, false)?;
        Ok(b[0])
    }
    fn w8(&self, loc: CapLoc, off: u64, v: u8) -> Res<()> {
        self.bar_rw(loc, off, &mut [v], true)
    }
    fn r16(&self, loc: CapLoc, off: u64) -> Res<u16> {
        let mut b = [0u8; 2];
        self.bar_rw(loc, off, &mut b, false)?;
        Ok(u16::from_le_bytes(b))
    }
    fn w16(&self, loc: CapLoc, off: u64, v: u16) -> Res<()> {
        self.bar_rw(loc, off, &mut v.to_le_bytes(), true)
    }
    fn r32(&self, loc: CapLoc, off: u64) -> Res<u32> {
        let mut b = [0u8; 4];
        self.bar_rw(loc, off, &mut b, false)?;
        Ok(u32::from_le_bytes(b))
    }
    fn w32(&self, loc: CapLoc, off: u64, v: u32) -> Res<()> {
        self.bar_rw(loc, off, &mut v.to_le_bytes(), true)
    }
    fn w64(&self, loc: CapLoc, off: u64, v: u64) -> Res<()> {
        self.w32(loc, off, v as u32)?;
        self.w32(loc, off + 4, (v >> 32) as u32)
    }

    /// The device status register.
    pub fn status(&self) -> Res<u8> {
        self.r8(self.common, CC_DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) -> Res<()> {
        self.w8(self.common, CC_DEVICE_STATUS, s)
    }

    /// Device reset: write 0 and wait until the device reads back 0.
    pub fn reset(&self) -> Res<()> {
        self.set_status(0)?;
        let t = Instant::now();
        while self.status()? != 0 {
            if t.elapsed() > Duration::from_secs(5) {
                return Err("virtio device did not finish reset".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resets the device and sets it up from scratch (see [`Self::setup`]).
    pub fn init(&mut self) -> Res<()> {
        self.reset()?;
        self.setup()
    }

    /// Sets up a device that reads back status 0: negotiation, queue 0 on
    /// a zeroed ring, DRIVER_OK.
    pub fn setup(&mut self) -> Res<()> {
        let c = self.common;
        self.set_status(STATUS_ACKNOWLEDGE)?;
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        self.w32(c, CC_DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.r32(c, CC_DEVICE_FEATURE)? as u64;
        self.w32(c, CC_DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.r32(c, CC_DEVICE_FEATURE)? as u64;
        let offered = lo | (hi << 32);
        let want = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;
        if offered & want != want {
            self.set_status(STATUS_FAILED)?;
            return Err(format!(
                "device features {offered:#x} lack VERSION_1 and/or ACCESS_PLATFORM"
            ));
        }
        self.w32(c, CC_DRIVER_FEATURE_SELECT, 0)?;
        self.w32(c, CC_DRIVER_FEATURE, want as u32)?;
        self.w32(c, CC_DRIVER_FEATURE_SELECT, 1)?;
        self.w32(c, CC_DRIVER_FEATURE, (want >> 32) as u32)?;
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(s)?;
        if self.status()? & STATUS_FEATURES_OK == 0 {
            return Err("device did not accept FEATURES_OK".into());
        }
        self.w16(c, CC_MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR)?;
        if self.r16(c, CC_NUM_QUEUES)? == 0 {
            return Err("device has no queues".into());
        }
        self.w16(c, CC_QUEUE_SELECT, 0)?;
        let max = self.r16(c, CC_QUEUE_SIZE)?;
        if max == 0 {
            return Err("queue 0 not available".into());
        }
        let qsize = max.min(QUEUE_SIZE);
        if !qsize.is_power_of_two() {
            return Err(format!("queue size {qsize} is not a power of two"));
        }
        self.qsize = qsize;
        self.w16(c, CC_QUEUE_SIZE, qsize)?;
        self.w16(c, CC_QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR)?;
        self.ring.fill(0, SCRATCH_OFF, 0);
        self.w64(c, CC_QUEUE_DESC, self.iova_of(DESC_OFF))?;
        self.w64(c, CC_QUEUE_DRIVER, self.iova_of(AVAIL_OFF))?;
        self.w64(c, CC_QUEUE_DEVICE, self.iova_of(USED_OFF))?;
        let notify_off = self.r16(c, CC_QUEUE_NOTIFY_OFF)?;
        self.notify_addr.offset = self.notify_base + notify_off as u64 * self.notify_mult as u64;
        self.w16(c, CC_QUEUE_ENABLE, 1)?;
        self.set_status(s | STATUS_DRIVER_OK)?;
        if self.status()? & STATUS_FAILED != 0 {
            return Err("device reported FAILED after DRIVER_OK".into());
        }
        self.next_avail = 0;
        self.last_used = 0;
        Ok(())
    }

    /// Capacity in 512-byte sectors (virtio-blk config offset 0).
    pub fn capacity(&self) -> Res<u64> {
        let lo = self.r32(self.device_cfg, 0)? as u64;
        let hi = self.r32(self.device_cfg, 4)? as u64;
        Ok(lo | (hi << 32))
    }

    /// Number of request slots (three descriptors each).
    pub fn slots(&self) -> u16 {
        self.qsize / 3
    }

    /// Status byte of a slot.
    pub fn slot_status(&self, slot: u16) -> u8 {
        self.ring.rd::<u8>(STATUS_OFF + slot as usize)
    }

    /// Writes slot `slot`'s request header and marks its status byte
    /// untouched.
    fn put_header(&mut self, slot: u16, kind: u32, sector: u64) {
        assert!(slot < self.slots());
        let hdr = HDR_OFF + slot as usize * 16;
        self.ring.wr::<u32>(hdr, kind);
        self.ring.wr::<u32>(hdr + 4, 0);
        self.ring.wr::<u64>(hdr + 8, sector);
        self.ring
            .wr::<u8>(STATUS_OFF + slot as usize, STATUS_UNTOUCHED);
    }

    /// Writes descriptor `index` of the ring's table.
    fn put_desc(&self, index: usize, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring
            .put_desc(DESC_OFF + index * 16, addr, len, flags, next);
    }

    /// Makes the chain headed by descriptor `head` available (the device
    /// is not notified).
    fn publish(&mut self, head: u16) {
        let idx = self.next_avail;
        let pos = AVAIL_OFF + 4 + (idx % self.qsize) as usize * 2;
        self.ring.wr::<u16>(pos, head);
        fence(Ordering::SeqCst);
        self.next_avail = idx.wrapping_add(1);
        self.ring.wr::<u16>(AVAIL_OFF + 2, self.next_avail);
        fence(Ordering::SeqCst);
    }

    /// Puts a request (header, data, status) in slot `slot` and makes it
    /// available; the device is not notified (see [`Self::notify`]).
    pub fn push(&mut self, slot: u16, kind: u32, sector: u64, data_iova: u64, len: u32) {
        self.put_header(slot, kind, sector);
        let (hdr, status) = self.slot_iovas(slot);
        let d0 = slot as usize * 3;
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        self.put_desc(d0, hdr, 16, VRING_DESC_F_NEXT, (d0 + 1) as u16);
        self.put_desc(
            d0 + 1,
            data_iova,
            len,
            VRING_DESC_F_NEXT | data_flags,
            (d0 + 2) as u16,
        );
        self.put_desc(d0 + 2, status, 1, VRING_DESC_F_WRITE, 0);
        self.publish(d0 as u16);
    }

    /// The IOVAs of slot `slot`'s request header and status byte.
    pub fn slot_iovas(&self, slot: u16) -> (u64, u64) {
        (
            self.iova_of(HDR_OFF + slot as usize * 16),
            self.iova_of(STATUS_OFF + slot as usize),
        )
    }

    /// Puts a READ of `sector` in slot `slot` whose only descriptor
    /// carries VRING_DESC_F_INDIRECT with `table_addr` and `table_len`, and
    /// makes it available (not notified). The table's entries name the
    /// slot's header and status by [`Self::slot_iovas`]; write it first.
    pub fn push_indirect(&mut self, slot: u16, sector: u64, table_addr: u64, table_len: u32) {
        self.put_header(slot, VIRTIO_BLK_T_IN, sector);
        let d0 = slot as usize * 3;
        self.put_desc(d0, table_addr, table_len, VRING_DESC_F_INDIRECT, 0);
        self.publish(d0 as u16);
    }

    pub fn notify(&self) -> Res<()> {
        fence(Ordering::SeqCst);
        self.w16(self.notify_addr, 0, 0)
    }

    /// The device's used index right now.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.ring.rd::<u16>(USED_OFF + 2)
    }

    /// Pops all completions currently in the used ring.
    pub fn pop_used(&mut self) -> Vec<Completion> {
        let mut out = Vec::new();
        let used = self.used_idx();
        while self.last_used != used {
            let e = USED_OFF + 4 + (self.last_used % self.qsize) as usize * 8;
            let id = self.ring.rd::<u32>(e);
            out.push(Completion {
                slot: (id / 3) as u16,
            });
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until `n` more completions arrived (polling) or `timeout`.
    pub fn wait_completions(&mut self, n: usize, timeout: Duration) -> Res<Vec<Completion>> {
        let t = Instant::now();
        let mut got = Vec::new();
        loop {
            got.extend(self.pop_used());
            if got.len() >= n {
                return Ok(got);
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "timeout after {:?}: {} of {n} completions",
                    timeout,
                    got.len()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Synchronous single request in slot 0; returns the status byte.
    pub fn io(&mut self, kind: u32, sector: u64, data_iova: u64, len: u32) -> Res<u8> {
        self.push(0, kind, sector, data_iova, len);
        self.notify()?;
        self.wait_completions(1, Duration::from_secs(20))?;
        Ok(self.slot_status(0))
    }
}

/// Walks the PCI capability list for the virtio-pci vendor capabilities.
fn parse_caps(s: &VfioSession) -> Res<(CapLoc, CapLoc, u32, CapLoc)> {
    if s.cfg_read16(PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return Err("device has no PCI capability list".into());
    }
    let mut common = None;
    let mut notify = None;
    let mut device = None;
    let mut p = (s.cfg_read8(PCI_CAP_PTR)? & 0xfc) as u64;
    let mut guard = 0;
    while p != 0 && guard < 48 {
        guard += 1;
        let id = s.cfg_read8(p)?;
        let next = (s.cfg_read8(p + 1)? & 0xfc) as u64;
        if id == PCI_CAP_ID_VNDR {
            let cfg_type = s.cfg_read8(p + 3)?;
            let bar = s.cfg_read8(p + 4)?;
            let offset = s.cfg_read32(p + 8)? as u64;
            let loc = CapLoc { bar, offset };
            match cfg_type {
                VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => common = Some(loc),
                VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                    let mult = s.cfg_read32(p + 16)?;
                    notify = Some((loc, mult));
                }
                VIRTIO_PCI_CAP_DEVICE_CFG if device.is_none() => device = Some(loc),
                _ => {}
            }
        }
        p = next;
    }
    let common = common.ok_or("no virtio common cfg capability")?;
    let (notify, mult) = notify.ok_or("no virtio notify capability")?;
    let device = device.ok_or("no virtio device cfg capability")?;
    Ok((common, notify, mult, device))
}
