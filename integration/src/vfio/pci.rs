//! A passed-through PCI function: what the guest sees of a vfio-pci device.
//!
//! The guest reads and writes the device's own configuration space through
//! VFIO, except for the registers the VMM owns:
//! - the BARs: the guest finds them in the VMM's BAR window (sizing works as
//!   on real hardware); the host's addresses stay hidden;
//! - the expansion ROM BAR: hidden (reads 0);
//! - the interrupt pin: reads 0 (no INTx); the line is scratch;
//! - the MSI-X message control: MSI-X is switched on and off with
//!   `VFIO_DEVICE_SET_IRQS`, each vector signalling the eventfd that KVM
//!   turns into the MSI the guest wrote into the vector's table entry;
//!   while the vector (or the function) is masked the eventfd is not
//!   connected to KVM, and a signal that arrived meanwhile is delivered at
//!   the unmask.
//!
//! BARs that VFIO lets the VMM mmap are mapped into the guest
//! ([`super::bar_map`]); other BAR accesses trap to the VMM and reach the
//! device by pread/pwrite on its VFIO region, except the MSI-X table and
//! PBA, which the VMM emulates (the routes follow the table). Invariant: nothing the guest writes reaches the
//! host's BAR registers, ROM or MSI-X control, and every interrupt the
//! device raises arrives as the message the guest programmed, once the
//! vector can deliver. (The PBA shows no pending bits for these vectors:
//! a signal waits in the eventfd, unseen.)

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDevice;

use super::bar_map::{BarMaps, SlotAllocator};

use crate::pci::msix::{GsiRouter, Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK, PCI_CAP_ID_MSIX};
use crate::pci::{regs, BarAllocator, ConfigSpace, PciFunction, NUM_BARS};
use crate::virtio::lock;

/// VFIO region index of a vfio-pci device's configuration space
/// (`VFIO_PCI_CONFIG_REGION_INDEX`); BAR n is region n.
const CONFIG_REGION: u32 = 7;
/// Config dword of the expansion ROM BAR.
const ROM_REG: usize = 0x30 / 4;
/// Config dword of interrupt line, pin, min-grant and max-latency.
const INTERRUPT_REG: usize = regs::INTERRUPT_LINE / 4;
/// Capability walk bound: 48 capabilities fill the 192 bytes after the
/// header; a longer chain loops.
const MAX_CAPS: usize = 48;

/// Where the MSI-X table and PBA live (fixed by the device).
#[derive(Clone, Copy, Debug)]
struct MsixLayout {
    /// Config offset of the capability.
    cap: usize,
    table_bar: usize,
    table_off: u64,
    table_len: u64,
    pba_bar: usize,
    pba_off: u64,
    pba_len: u64,
}

impl MsixLayout {
    fn in_table(&self, bar: usize, off: u64, len: usize) -> Option<u64> {
        within(
            bar,
            off,
            len,
            self.table_bar,
            self.table_off,
            self.table_len,
        )
    }
    fn in_pba(&self, bar: usize, off: u64, len: usize) -> Option<u64> {
        within(bar, off, len, self.pba_bar, self.pba_off, self.pba_len)
    }
}

/// `off - start` when `[off, off + len)` lies in BAR `want`'s `[start,
/// start + size)`.
fn within(bar: usize, off: u64, len: usize, want: usize, start: u64, size: u64) -> Option<u64> {
    let end = off.checked_add(len as u64)?;
    (bar == want && off >= start && end <= start.checked_add(size)?).then(|| off - start)
}

struct State {
    /// The registers the VMM owns: BARs, command (for decode), line.
    shadow: ConfigSpace,
    /// BAR areas mapped into the guest; their slots follow `shadow`.
    maps: BarMaps,
    /// MSI-X table, PBA and vector routes.
    msix: Option<Msix>,
    /// Message control bits the guest set (enable, function mask).
    msix_control: u16,
    /// MSI-X is enabled in VFIO (the device's vectors signal the irqfds).
    vfio_msix: bool,
}

/// A vfio-pci device as a guest PCI function.
pub struct VfioPciFunction {
    /// Dropped before `device`: its BAR mmaps keep the device busy, and
    /// VFIO cannot release the group while they exist.
    state: Mutex<State>,
    device: Arc<VfioDevice>,
    name: String,
    /// The prefetchable bit of each BAR's low dword (the shadow has none).
    prefetch: [u32; NUM_BARS],
    /// Each BAR's size at the device; the guest's BAR may be larger (at
    /// least a page), and accesses past the device's end go nowhere.
    region_sizes: [u64; NUM_BARS],
    msix_layout: Option<MsixLayout>,
}

impl VfioPciFunction {
    /// Describes `device` to the guest: its memory BARs get addresses from
    /// `bars`, its MSI-X vectors GSIs from `router`. With `vm`, BARs that
    /// VFIO lets the VMM mmap (and that hold no MSI-X structure) are mapped
    /// into the guest through KVM slots from `slots`; the others trap.
    /// I/O BARs and INTx are not passed through (logged).
    pub fn new(
        device: Arc<VfioDevice>,
        name: &str,
        bars: &mut BarAllocator,
        router: Arc<GsiRouter>,
        vm: Option<(Arc<VmFd>, &SlotAllocator)>,
    ) -> Result<Self, String> {
        let read32 = |off: u64| {
            let mut b = [0xffu8; 4];
            device.region_read(CONFIG_REGION, &mut b, off);
            u32::from_le_bytes(b)
        };
        let id = read32(0);
        if id == 0xffff_ffff || id == 0 {
            return Err(format!(
                "{name}: configuration space unreadable through VFIO (id {id:#x})"
            ));
        }
        let mut shadow = ConfigSpace::new(0, 0, 0, 0, 0, 0);
        let mut prefetch = [0u32; NUM_BARS];
        let mut region_sizes = [0u64; NUM_BARS];
        let mut i = 0;
        while i < NUM_BARS {
            let raw = read32((regs::BAR0 + 4 * i) as u64);
            let size = device.get_region_size(i as u32);
            let is64 = raw & 1 == 0 && (raw >> 1) & 3 == 2;
            let step = if is64 { 2 } else { 1 };
            if size == 0 {
                i += step;
                continue;
            }
            if raw & 1 != 0 {
                log::warn!("{name}: BAR{i} is an I/O BAR: not passed through");
                i += 1;
                continue;
            }
            if is64 && i + 1 >= NUM_BARS {
                return Err(format!("{name}: BAR{i} is 64-bit but is the last BAR"));
            }
            let guest_size = size
                .checked_next_power_of_two()
                .filter(|s| *s <= 1 << 30)
                .ok_or_else(|| format!("{name}: BAR{i} of {size:#x} bytes is too large"))?
                .max(4096);
            let addr = bars.alloc(guest_size).ok_or_else(|| {
                format!("{name}: PCI BAR window exhausted (BAR{i}, {guest_size:#x} bytes)")
            })?;
            shadow.add_mem_bar(i, addr, guest_size, is64);
            prefetch[i] = raw & 0x8;
            region_sizes[i] = size;
            log::debug!("{name}: BAR{i} {size:#x} bytes at {addr:#x} (64-bit: {is64})");
            i += step;
        }
        let msix_layout = find_msix(&read32, name)?;
        let maps = match vm {
            Some((vm, slots)) => {
                let direct: Vec<usize> = (0..NUM_BARS)
                    .filter(|&i| shadow.bar(i).is_some())
                    .filter(|&i| msix_layout.is_none_or(|l| i != l.table_bar && i != l.pba_bar))
                    .collect();
                BarMaps::new(&device, &direct, vm, slots)
            }
            None => BarMaps::none(),
        };
        let msix = match &msix_layout {
            Some(l) => {
                let vectors = (l.table_len / 16) as u16;
                Some(
                    Msix::new_external(vectors, router)
                        .map_err(|e| format!("{name}: MSI-X: {e}"))?,
                )
            }
            None => {
                log::warn!("{name}: no MSI-X capability: the guest gets no interrupts from it");
                None
            }
        };
        Ok(VfioPciFunction {
            device,
            name: name.to_string(),
            prefetch,
            region_sizes,
            msix_layout,
            state: Mutex::new(State {
                shadow,
                maps,
                msix,
                msix_control: 0,
                vfio_msix: false,
            }),
        })
    }

    /// Number of BAR areas mapped into the guest (the rest trap).
    pub fn mmapped_areas(&self) -> usize {
        lock(&self.state).maps.len()
    }

    /// Whether `[offset, offset + len)` lies inside BAR `bar` at the
    /// device (the guest picks the offset: checked before any access).
    fn at_device(&self, bar: usize, offset: u64, len: usize) -> bool {
        let size = self.region_sizes.get(bar).copied().unwrap_or(0);
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
    }

    fn device_read32(&self, reg: usize) -> u32 {
        let mut b = [0xffu8; 4];
        self.device
            .region_read(CONFIG_REGION, &mut b, (reg * 4) as u64);
        u32::from_le_bytes(b)
    }

    /// Applies the guest's message control: the table routes follow the
    /// enable and mask bits, and VFIO's MSI-X follows the enable bit.
    fn set_msix_control(&self, st: &mut State, ctrl: u16) {
        let ctrl = ctrl & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
        st.msix_control = ctrl;
        let Some(msix) = st.msix.as_mut() else {
            return;
        };
        msix.set_control(ctrl);
        let enable = ctrl & MSIX_ENABLE != 0;
        if enable && !st.vfio_msix {
            let fds: Vec<_> = (0..msix.len()).filter_map(|v| msix.irqfd(v)).collect();
            match self.device.enable_msix(fds) {
                Ok(()) => st.vfio_msix = true,
                Err(e) => log::error!("{}: enabling MSI-X in VFIO: {e}", self.name),
            }
        } else if !enable && st.vfio_msix {
            if let Err(e) = self.device.disable_msix() {
                log::error!("{}: disabling MSI-X in VFIO: {e}", self.name);
            }
            st.vfio_msix = false;
        }
    }
}

/// Finds the MSI-X capability and checks its table and PBA.
fn find_msix(read32: &dyn Fn(u64) -> u32, name: &str) -> Result<Option<MsixLayout>, String> {
    let status = (read32(regs::COMMAND as u64) >> 16) as u16;
    if status & regs::STATUS_CAP_LIST == 0 {
        return Ok(None);
    }
    let mut ptr = (read32(regs::CAP_PTR as u64) & 0xfc) as usize;
    for _ in 0..MAX_CAPS {
        if ptr < 0x40 {
            return Ok(None);
        }
        let head = read32(ptr as u64);
        if head as u8 == PCI_CAP_ID_MSIX {
            let vectors = u64::from((head >> 16) & 0x7ff) + 1;
            let table = read32(ptr as u64 + 4);
            let pba = read32(ptr as u64 + 8);
            let l = MsixLayout {
                cap: ptr,
                table_bar: (table & 7) as usize,
                table_off: u64::from(table & !7),
                table_len: vectors * 16,
                pba_bar: (pba & 7) as usize,
                pba_off: u64::from(pba & !7),
                pba_len: vectors.div_ceil(64) * 8,
            };
            if l.table_bar >= NUM_BARS || l.pba_bar >= NUM_BARS {
                return Err(format!("{name}: MSI-X table or PBA in no BAR: {l:?}"));
            }
            return Ok(Some(l));
        }
        ptr = ((head >> 8) & 0xfc) as usize;
    }
    Err(format!("{name}: capability list does not end"))
}

impl PciFunction for VfioPciFunction {
    fn config_read(&self, reg: usize) -> u32 {
        match reg {
            r if (regs::BAR0 / 4..regs::BAR0 / 4 + NUM_BARS).contains(&r) => {
                let i = r - regs::BAR0 / 4;
                lock(&self.state).shadow.read(r) | self.prefetch[i]
            }
            ROM_REG => 0,
            INTERRUPT_REG => {
                // Line from the shadow, pin 0, grant/latency from the device.
                (self.device_read32(reg) & 0xffff_0000)
                    | (lock(&self.state).shadow.read(reg) & 0xff)
            }
            _ => {
                let v = self.device_read32(reg);
                match self.msix_layout {
                    Some(l) if reg == l.cap / 4 => {
                        let ctrl = u32::from(lock(&self.state).msix_control);
                        let mask = u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16;
                        (v & !mask) | (ctrl << 16)
                    }
                    _ => v,
                }
            }
        }
    }

    fn config_write(&self, reg: usize, offset: usize, data: &[u8]) {
        if offset + data.len() > 4 {
            return;
        }
        let off = (reg * 4 + offset) as u64;
        match reg {
            r if (regs::BAR0 / 4..regs::BAR0 / 4 + NUM_BARS).contains(&r) => {
                let mut st = lock(&self.state);
                st.shadow.write(r, offset, data);
                let decoded = st.shadow.mapped_bars();
                st.maps.update(&decoded);
            }
            ROM_REG => {}
            INTERRUPT_REG => lock(&self.state).shadow.write(reg, offset, data),
            1 => {
                // Memory decode and bus mastering are the device's; the
                // shadow follows decode so the bus maps the BARs. Slots
                // go before decode goes off and come after it is on.
                let mut st = lock(&self.state);
                st.shadow.write(reg, offset, data);
                let decoded = st.shadow.mapped_bars();
                st.maps.remove_stale(&decoded);
                self.device.region_write(CONFIG_REGION, data, off);
                st.maps.update(&decoded);
            }
            _ => match self.msix_layout {
                Some(l) if reg == l.cap / 4 => {
                    // Only message control (bytes 2-3) is writable.
                    let mut st = lock(&self.state);
                    let mut ctrl = st.msix_control.to_le_bytes();
                    for (i, b) in data.iter().enumerate() {
                        if let Some(c) = (offset + i).checked_sub(2).and_then(|j| ctrl.get_mut(j)) {
                            *c = *b;
                        }
                    }
                    self.set_msix_control(&mut st, u16::from_le_bytes(ctrl));
                }
                _ => self.device.region_write(CONFIG_REGION, data, off),
            },
        }
    }

    fn mapped_bars(&self) -> Vec<(usize, u64, u64)> {
        lock(&self.state).shadow.mapped_bars()
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(l) = self.msix_layout {
            if let Some(o) = l.in_table(bar, offset, data.len()) {
                if let Some(m) = &lock(&self.state).msix {
                    m.table_read(o, data);
                }
                return;
            }
            if let Some(o) = l.in_pba(bar, offset, data.len()) {
                if let Some(m) = &lock(&self.state).msix {
                    m.pba_read(o, data);
                }
                return;
            }
        }
        if self.at_device(bar, offset, data.len()) {
            self.device.region_read(bar as u32, data, offset);
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(l) = self.msix_layout {
            if let Some(o) = l.in_table(bar, offset, data.len()) {
                if let Some(m) = lock(&self.state).msix.as_mut() {
                    m.table_write(o, data);
                }
                return;
            }
            if l.in_pba(bar, offset, data.len()).is_some() {
                return;
            }
        }
        if self.at_device(bar, offset, data.len()) {
            self.device.region_write(bar as u32, data, offset);
        }
    }
}

impl Drop for VfioPciFunction {
    fn drop(&mut self) {
        if lock(&self.state).vfio_msix {
            let _ = self.device.disable_msix();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_ranges() {
        let l = MsixLayout {
            cap: 0x40,
            table_bar: 1,
            table_off: 0x1000,
            table_len: 4 * 16,
            pba_bar: 1,
            pba_off: 0x2000,
            pba_len: 8,
        };
        assert_eq!(l.in_table(1, 0x1000, 4), Some(0));
        assert_eq!(l.in_table(1, 0x103c, 4), Some(0x3c));
        assert_eq!(l.in_table(1, 0x103e, 4), None, "crosses the end");
        assert_eq!(l.in_table(0, 0x1000, 4), None, "other BAR");
        assert_eq!(l.in_pba(1, 0x2004, 4), Some(4));
        assert_eq!(l.in_table(1, u64::MAX - 1, 4), None, "wraps");
    }

    #[test]
    fn msix_capability_walk() {
        // Header with a capability list: 0x40 (vendor, ID 9) -> 0x50 (MSI-X,
        // 3 vectors, table in BAR 1 at 0, PBA in BAR 1 at 0x800).
        let mut cfg = [0u32; 64];
        cfg[1] = u32::from(regs::STATUS_CAP_LIST) << 16;
        cfg[regs::CAP_PTR / 4] = 0x40;
        cfg[0x40 / 4] = 0x09 | (0x50 << 8);
        cfg[0x50 / 4] = u32::from(PCI_CAP_ID_MSIX) | (2 << 16);
        cfg[0x54 / 4] = 1;
        cfg[0x58 / 4] = 0x800 | 1;
        let read = |off: u64| cfg[(off / 4) as usize];
        let l = find_msix(&read, "t").unwrap().unwrap();
        assert_eq!(
            (l.cap, l.table_bar, l.table_off, l.table_len),
            (0x50, 1, 0, 48)
        );
        assert_eq!((l.pba_bar, l.pba_off, l.pba_len), (1, 0x800, 8));
        // A chain that loops is refused, not walked forever.
        let mut looped = cfg;
        looped[0x40 / 4] = 0x09 | (0x40 << 8);
        let read = |off: u64| looped[(off / 4) as usize];
        assert!(find_msix(&read, "t").is_err());
        // A table in BAR 7 (no such BAR) is refused.
        let mut bad = cfg;
        bad[0x54 / 4] = 7;
        let read = |off: u64| bad[(off / 4) as usize];
        assert!(find_msix(&read, "t").is_err());
    }
}
