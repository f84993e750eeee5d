//! PCI: type-0 configuration space, the host bridge, and one bus (segment 0,
//! bus 0) reachable through ECAM (MCFG) and the 0xcf8/0xcfc ports.
//!
//! BARs are assigned by the VMM when a device is created (from
//! [`BAR_WINDOW_START`]..[`BAR_WINDOW_END`], the window the DSDT's `_CRS`
//! declares) and the guest may move them: the bus rebuilds its MMIO map
//! after every configuration write, from the BAR registers of devices whose
//! memory decode is enabled.

use std::sync::{Arc, Mutex, RwLock};

pub mod msix;

/// ECAM base (segment 0, bus 0 only: 1 MiB). Outside the BAR window,
/// reserved for Linux with a `PNP0C02` motherboard resource.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size for one bus.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Start of the 32-bit MMIO window BARs are allocated from.
pub const BAR_WINDOW_START: u64 = 0xc000_0000;
/// End (exclusive) of the BAR window: ECAM and the IOAPIC/LAPIC/MSI area
/// stay outside it.
pub const BAR_WINDOW_END: u64 = ECAM_BASE;
/// Config address port (type 1 access).
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// Config data ports (0xcfc..0xcff).
pub const PCI_CONFIG_DATA: u16 = 0xcfc;

/// Config register offsets and bits.
pub mod regs {
    /// Command register (16 bits at 0x04).
    pub const COMMAND: usize = 0x04;
    /// Command: memory space decode.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Status: capability list present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Capability pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line / pin.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// BAR type bits: 64-bit memory.
    pub const BAR_MEM64: u32 = 0x4;
}

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
const CONFIG_DWORDS: usize = 64;

/// A bus/device/function address on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl Bdf {
    /// Device `dev`, function 0 on bus 0.
    pub fn new(dev: u8) -> Self {
        Bdf {
            bus: 0,
            dev,
            func: 0,
        }
    }
    /// The 16-bit requester ID (bus << 8 | dev << 3 | func).
    pub fn id(self) -> u16 {
        (u16::from(self.bus) << 8) | (u16::from(self.dev) << 3) | u16::from(self.func)
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0000:{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// A memory BAR: its size (a power of two, at least 16) and whether it is
/// 64-bit (then it uses two BAR registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BarInfo {
    size: u64,
    is64: bool,
}

/// A type-0 configuration space (256 bytes; the extended space reads 0)
/// with per-bit write masks.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: [u32; CONFIG_DWORDS],
    wmask: [u32; CONFIG_DWORDS],
    bars: [Option<BarInfo>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl ConfigSpace {
    /// A header with the given ids, class (`class << 8 | revision` layout:
    /// `class_code` is the 24-bit class/subclass/prog-if) and revision.
    pub fn new(
        vendor: u16,
        device: u16,
        class_code: u32,
        revision: u8,
        subsys_vendor: u16,
        subsys_id: u16,
    ) -> Self {
        let mut c = ConfigSpace {
            regs: [0; CONFIG_DWORDS],
            wmask: [0; CONFIG_DWORDS],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: 0x40,
        };
        c.regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        c.regs[2] = (class_code << 8) | u32::from(revision);
        c.regs[0x2c / 4] = u32::from(subsys_vendor) | (u32::from(subsys_id) << 16);
        // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.wmask[1] = 0x0547;
        // Interrupt line is scratch for the OS; pin stays 0 (no INTx).
        c.wmask[regs::INTERRUPT_LINE / 4] = 0xff;
        // Cache line size and latency timer: scratch.
        c.wmask[3] = 0x0000_ffff;
        c
    }

    /// Adds a memory BAR of `size` bytes at `addr` (`size` a power of two).
    /// A 64-bit BAR takes `index` and `index + 1`.
    pub fn add_mem_bar(&mut self, index: usize, addr: u64, size: u64, is64: bool) {
        assert!(size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size));
        assert!(index + usize::from(is64) < NUM_BARS);
        let r = regs::BAR0 / 4 + index;
        let mask = !(size - 1);
        self.regs[r] = (addr as u32 & mask as u32) | if is64 { regs::BAR_MEM64 } else { 0 };
        self.wmask[r] = mask as u32 & !0xf;
        if is64 {
            self.regs[r + 1] = (addr >> 32) as u32;
            self.wmask[r + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(BarInfo { size, is64 });
    }

    /// Appends a capability: `body` starts with the capability ID; the next
    /// pointer (byte 1) is filled in. `writable` gives write masks for the
    /// capability's bytes (same length as `body`, or empty). Returns its
    /// config offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        assert!(body.len() >= 2 && off + body.len() <= CONFIG_DWORDS * 4);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + i, *b);
        }
        for (i, m) in writable.iter().enumerate() {
            let o = off + i;
            let shift = (o % 4) * 8;
            self.wmask[o / 4] |= u32::from(*m) << shift;
        }
        self.set_byte(off + 1, 0);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.set_byte(regs::CAP_PTR, off as u8);
                let status = self.regs[1] | (u32::from(regs::STATUS_CAP_LIST) << 16);
                self.regs[1] = status;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + body.len() + 3) & !3;
        off
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let shift = (off % 4) * 8;
        self.regs[off / 4] = (self.regs[off / 4] & !(0xff << shift)) | (u32::from(v) << shift);
    }

    /// Reads the dword at register index `reg` (offset / 4); the extended
    /// space reads 0.
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within dword `reg`,
    /// through the write mask.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= CONFIG_DWORDS || offset + data.len() > 4 {
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            let m = (self.wmask[reg] >> shift) & 0xff;
            let old = (self.regs[reg] >> shift) & 0xff;
            let new = (old & !m) | (u32::from(*b) & m);
            self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (new << shift);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// Current address and size of BAR `index`, if it is a BAR.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let info = self.bars.get(index).copied().flatten()?;
        let r = regs::BAR0 / 4 + index;
        let mut addr = u64::from(self.regs[r] & !0xf);
        if info.is64 {
            addr |= u64::from(self.regs[r + 1]) << 32;
        }
        Some((addr, info.size))
    }

    /// Enabled memory BARs as (index, address, size): empty when memory
    /// decode is off.
    pub fn mapped_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.command() & regs::COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..NUM_BARS)
            .filter_map(|i| self.bar(i).map(|(a, s)| (i, a, s)))
            // A BAR being sized, or left at 0, decodes nothing useful.
            .filter(|&(_, a, s)| a != 0 && a.checked_add(s).is_some())
            .collect()
    }
}

/// A PCI function on the bus.
pub trait PciFunction: Send + Sync {
    /// Reads config dword `reg` (offset / 4, up to 1024 for ECAM).
    fn config_read(&self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` (0..4) of config dword `reg`.
    fn config_write(&self, reg: usize, offset: usize, data: &[u8]);
    /// Memory BARs currently decoded: (index, address, size).
    fn mapped_bars(&self) -> Vec<(usize, u64, u64)>;
    /// Reads `data.len()` bytes at `offset` in BAR `bar`.
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes at `offset` in BAR `bar`.
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0: a header without BARs.
pub struct HostBridge {
    config: Mutex<ConfigSpace>,
}

impl HostBridge {
    /// Intel-like host bridge (8086:0d57, class 0x060000).
    pub fn new() -> Self {
        HostBridge {
            config: Mutex::new(ConfigSpace::new(0x8086, 0x0d57, 0x06_00_00, 0, 0, 0)),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config_read(&self, reg: usize) -> u32 {
        self.config.lock().unwrap().read(reg)
    }
    fn config_write(&self, reg: usize, offset: usize, data: &[u8]) {
        self.config.lock().unwrap().write(reg, offset, data)
    }
    fn mapped_bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Hands out naturally aligned BAR addresses from the window.
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// An allocator over `start..end`.
    pub fn new(start: u64, end: u64) -> Self {
        BarAllocator { next: start, end }
    }
    /// A `size`-aligned range of `size` bytes (a power of two).
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let a = self.next.checked_add(size - 1)? & !(size - 1);
        let end = a.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            a
        })
    }
}

#[derive(Clone)]
struct MappedBar {
    start: u64,
    end: u64,
    dev: usize,
    bar: usize,
}

/// Bus 0 of segment 0: 32 slots, function 0 each.
pub struct PciBus {
    slots: Vec<Option<Arc<dyn PciFunction>>>,
    config_address: Mutex<u32>,
    map: RwLock<Vec<MappedBar>>,
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut b = PciBus {
            slots: vec![None; 32],
            config_address: Mutex::new(0),
            map: RwLock::new(Vec::new()),
        };
        b.add(0, Arc::new(HostBridge::new()));
        b
    }

    /// Puts `f` at device `dev`, function 0.
    pub fn add(&mut self, dev: u8, f: Arc<dyn PciFunction>) {
        assert!(self.slots[dev as usize].is_none(), "slot {dev} taken");
        self.slots[dev as usize] = Some(f);
        self.rebuild_map();
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<dyn PciFunction>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    fn rebuild_map(&self) {
        let mut map = Vec::new();
        for (dev, f) in self.slots.iter().enumerate() {
            if let Some(f) = f {
                for (bar, start, size) in f.mapped_bars() {
                    map.push(MappedBar {
                        start,
                        end: start + size,
                        dev,
                        bar,
                    });
                }
            }
        }
        *self.map.write().unwrap() = map;
    }

    /// Reads config space: `reg` dword index, `offset` byte in it.
    pub fn config_read(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        reg: usize,
        offset: usize,
        data: &mut [u8],
    ) {
        let v = match self.function(bus, dev, func) {
            Some(f) => f.config_read(reg),
            None => 0xffff_ffff,
        };
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes config space.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if offset + data.len() > 4 {
            return;
        }
        if let Some(f) = self.function(bus, dev, func) {
            f.config_write(reg, offset, data);
            // The command register or a BAR may have changed.
            if reg == 1 || (4..10).contains(&reg) {
                self.rebuild_map();
            }
        }
    }

    /// Handles an ECAM access at `offset` from [`ECAM_BASE`].
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg, byte) = decode_ecam(offset);
        if byte + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        self.config_read(bus, dev, func, reg, byte, data)
    }

    /// Handles an ECAM write.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg, byte) = decode_ecam(offset);
        self.config_write(bus, dev, func, reg, byte, data)
    }

    /// Port I/O read; returns false when the port is not ours.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                let v = *self.config_address.lock().unwrap();
                data.copy_from_slice(&v.to_le_bytes());
                true
            }
            0xcfc..=0xcff => {
                let a = *self.config_address.lock().unwrap();
                let byte = usize::from(port - PCI_CONFIG_DATA);
                match decode_cf8(a) {
                    Some((bus, dev, func, reg)) if byte + data.len() <= 4 => {
                        self.config_read(bus, dev, func, reg, byte, data)
                    }
                    _ => data.fill(0xff),
                }
                true
            }
            _ => false,
        }
    }

    /// Port I/O write; returns false when the port is not ours.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                let v = u32::from_le_bytes(data.try_into().unwrap());
                *self.config_address.lock().unwrap() = v;
                true
            }
            0xcfc..=0xcff => {
                let a = *self.config_address.lock().unwrap();
                let byte = usize::from(port - PCI_CONFIG_DATA);
                if let Some((bus, dev, func, reg)) = decode_cf8(a) {
                    self.config_write(bus, dev, func, reg, byte, data);
                }
                true
            }
            _ => false,
        }
    }

    fn find_bar(&self, addr: u64) -> Option<(Arc<dyn PciFunction>, usize, u64)> {
        let map = self.map.read().unwrap();
        let m = map.iter().find(|m| addr >= m.start && addr < m.end)?;
        let f = self.slots[m.dev].clone()?;
        Some((f, m.bar, addr - m.start))
    }

    /// MMIO read: ECAM or a BAR; returns false when nothing decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            self.ecam_read(addr - ECAM_BASE, data);
            return true;
        }
        match self.find_bar(addr) {
            Some((f, bar, off)) => {
                f.bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// MMIO write: ECAM or a BAR; returns false when nothing decodes it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            self.ecam_write(addr - ECAM_BASE, data);
            return true;
        }
        match self.find_bar(addr) {
            Some((f, bar, off)) => {
                f.bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

/// ECAM offset -> (bus, dev, func, dword index, byte in dword).
pub fn decode_ecam(offset: u64) -> (u8, u8, u8, usize, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        ((offset & 0xfff) >> 2) as usize,
        (offset & 3) as usize,
    )
}

/// 0xcf8 value -> (bus, dev, func, dword index), when the enable bit is set.
pub fn decode_cf8(a: u32) -> Option<(u8, u8, u8, usize)> {
    if a & 0x8000_0000 == 0 {
        return None;
    }
    Some((
        (a >> 16) as u8,
        ((a >> 11) & 0x1f) as u8,
        ((a >> 8) & 0x7) as u8,
        ((a & 0xfc) >> 2) as usize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_64bit() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x010000, 1, 0x1af4, 0x40);
        c.add_mem_bar(0, 0xc000_4000, 0x4000, true);
        assert_eq!(c.read(4), 0xc000_4004);
        assert_eq!(c.read(5), 0);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        c.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_c004);
        assert_eq!(c.read(5), 0xffff_ffff);
        // Move it.
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write(5, 0, &0u32.to_le_bytes());
        assert_eq!(c.bar(0), Some((0xd000_0000, 0x4000)));
        // Unused BARs read 0 and are not writable.
        c.write(6, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(6), 0);
        // Not decoded until memory is enabled.
        assert!(c.mapped_bars().is_empty());
        c.write(1, 0, &[0x06, 0]);
        assert_eq!(c.mapped_bars(), vec![(0, 0xd000_0000, 0x4000)]);
        // Ids are read-only.
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
    }

    #[test]
    fn capability_chain() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0, 0);
        assert_eq!(c.read(1) >> 16 & 0x10, 0);
        let a = c.add_capability(&[0x09, 0xaa, 16, 1, 0, 0, 0, 0], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0]);
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.read(regs::CAP_PTR / 4) & 0xff, 0x40);
        assert_ne!(c.read(1) >> 16 & 0x10, 0);
        assert_eq!(c.read(0x40 / 4) & 0xffff, 0x4809);
        assert_eq!(c.read(0x48 / 4) & 0xffff, 0x0011);
        c.write(0x48 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read(0x48 / 4), 0xc000_0011);
        // Interrupt pin stays 0.
        c.write(0x3c / 4, 0, &[0x0b, 0x01]);
        assert_eq!(c.read(0x3c / 4), 0x0b);
    }

    #[test]
    fn decoding() {
        assert_eq!(decode_ecam(0), (0, 0, 0, 0, 0));
        assert_eq!(decode_ecam((3 << 15) | 0x12), (0, 3, 0, 4, 2));
        assert_eq!(
            decode_ecam((1 << 20) | (7 << 12) | 0xffc),
            (1, 0, 7, 0x3ff, 0)
        );
        assert_eq!(decode_cf8(0x0000_1804), None);
        assert_eq!(decode_cf8(0x8000_1810), Some((0, 3, 0, 4)));
        assert_eq!(decode_cf8(0x8001_0100), Some((1, 0, 1, 0)));
    }

    #[test]
    fn bus_access_paths() {
        let bus = PciBus::new();
        // CF8/CFC: host bridge ids, then an empty slot.
        bus.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut a = [0u8; 4];
        assert!(bus.pio_read(0xcf8, &mut a));
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
        let mut d = [0u8; 4];
        bus.pio_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut w = [0u8; 2];
        bus.pio_read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        bus.pio_write(0xcf8, &0x8000_0008u32.to_le_bytes());
        bus.pio_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0600_0000, "class");
        bus.pio_write(0xcf8, &0x8000_0800u32.to_le_bytes());
        bus.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Disabled address: all ones.
        bus.pio_write(0xcf8, &0u32.to_le_bytes());
        bus.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // ECAM.
        assert!(bus.mmio_read(ECAM_BASE + 2, &mut w));
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        assert!(bus.mmio_read(ECAM_BASE + (1 << 15), &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(bus.mmio_read(ECAM_BASE + (1 << 12), &mut d), "function 1");
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.mmio_read(BAR_WINDOW_START, &mut d));
        assert!(!bus.pio_read(0x3f8, &mut [0u8]));
    }

    #[test]
    fn allocator_aligns() {
        let mut a = BarAllocator::new(0xc000_0000, 0xc001_0000);
        assert_eq!(a.alloc(0x100), Some(0xc000_0000));
        assert_eq!(a.alloc(0x4000), Some(0xc000_4000));
        assert_eq!(a.alloc(0x8000), Some(0xc000_8000));
        assert_eq!(a.alloc(0x10), None);
    }
}
