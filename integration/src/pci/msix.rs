//! MSI-X: the table and PBA, masking, and the KVM GSI routes behind them.
//!
//! Each vector owns a GSI (from [`FIRST_MSI_GSI`] up) with an irqfd. The
//! route for a GSI follows the vector's address/data whenever the vector can
//! deliver (MSI-X enabled, function and vector unmasked); a signal on a
//! vector that cannot deliver sets its pending bit, and the unmask that makes
//! it deliverable again sends it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs below this are the IOAPIC pins (and PIC lines), routed as KVM does
/// by default.
pub const FIRST_MSI_GSI: u32 = 24;
/// MSI-X capability ID.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// The VM's GSI routing table, shared by every device that adds MSI routes.
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so each update sends the
/// default IOAPIC/PIC routes for GSIs 0..24 along with every MSI route.
pub struct GsiRouter {
    vm: Option<Arc<VmFd>>,
    inner: Mutex<RouterInner>,
}

struct RouterInner {
    next_gsi: u32,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl GsiRouter {
    /// A router for `vm`; `None` only records (unit tests).
    pub fn new(vm: Option<Arc<VmFd>>) -> Self {
        GsiRouter {
            vm,
            inner: Mutex::new(RouterInner {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// A fresh GSI for an MSI vector.
    pub fn allocate(&self) -> u32 {
        let mut i = self.inner.lock().unwrap();
        let g = i.next_gsi;
        i.next_gsi += 1;
        g
    }

    /// Registers `evt` as an irqfd on `gsi`. KVM injects at once if `evt`
    /// was already signalled.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        match &self.vm {
            Some(vm) => vm.register_irqfd(evt, gsi),
            None => Ok(()),
        }
    }

    /// Unregisters the irqfd `evt` from `gsi`: signals stay in `evt`.
    pub fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        match &self.vm {
            Some(vm) => vm.unregister_irqfd(evt, gsi),
            None => Ok(()),
        }
    }

    /// Routes `gsi` to the MSI (`addr`, `data`); no ioctl if unchanged.
    pub fn set_msi(&self, gsi: u32, addr: u64, data: u32) -> Result<(), kvm_ioctls::Error> {
        let mut i = self.inner.lock().unwrap();
        if i.msi.get(&gsi) == Some(&(addr, data)) {
            return Ok(());
        }
        i.msi.insert(gsi, (addr, data));
        self.commit(&i)
    }

    /// The MSI route of `gsi`, if any.
    pub fn msi_route(&self, gsi: u32) -> Option<(u64, u32)> {
        self.inner.lock().unwrap().msi.get(&gsi).copied()
    }

    /// The full routing table: default irqchip routes, then the MSI ones.
    fn entries(i: &RouterInner) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for gsi in 0..FIRST_MSI_GSI {
            if gsi < 16 {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                e.u.irqchip.irqchip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                e.u.irqchip.pin = gsi % 8;
                v.push(e);
            }
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            v.push(e);
        }
        for (&gsi, &(addr, data)) in &i.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            v.push(e);
        }
        v
    }

    fn commit(&self, i: &RouterInner) -> Result<(), kvm_ioctls::Error> {
        let Some(vm) = &self.vm else {
            return Ok(());
        };
        let entries = Self::entries(i);
        let mut table =
            KvmIrqRouting::new(entries.len()).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        table.as_mut_slice().copy_from_slice(&entries);
        vm.set_gsi_routing(&table)
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn dword(&self, i: usize) -> u32 {
        [self.addr_lo, self.addr_hi, self.data, self.ctrl][i]
    }
    fn set_dword(&mut self, i: usize, v: u32) {
        match i {
            0 => self.addr_lo = v & !3,
            1 => self.addr_hi = v,
            2 => self.data = v,
            _ => self.ctrl = v & VECTOR_MASKED,
        }
    }
    fn msg(&self) -> (u64, u32) {
        (
            u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            self.data,
        )
    }
}

/// The MSI-X state of one function: table, PBA, message control bits, and
/// the irqfd of each vector.
///
/// Two kinds of signaller: the VMM ([`Msix::signal`], which holds a
/// vector's message as pending while it cannot be delivered), or a device
/// that writes the irqfds itself (VFIO: [`Msix::new_external`]). For the
/// latter, a vector's irqfd is registered with KVM only while the vector
/// can deliver, so a masked vector's signals wait in its eventfd and KVM
/// delivers them when the registration comes back at the unmask.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    router: Arc<GsiRouter>,
    /// Signalled by a device, not by [`Msix::signal`].
    external: bool,
    /// External mode: whether each irqfd is registered with KVM now.
    connected: Vec<bool>,
}

impl Msix {
    /// `vectors` vectors (all masked), each with a GSI and an irqfd that
    /// the VMM signals through [`Msix::signal`].
    pub fn new(vectors: u16, router: Arc<GsiRouter>) -> std::io::Result<Self> {
        Self::build(vectors, router, false)
    }

    /// `vectors` vectors (all masked) whose irqfds a device signals
    /// directly (handed to VFIO); see [`Msix`].
    pub fn new_external(vectors: u16, router: Arc<GsiRouter>) -> std::io::Result<Self> {
        Self::build(vectors, router, true)
    }

    fn build(vectors: u16, router: Arc<GsiRouter>, external: bool) -> std::io::Result<Self> {
        let n = usize::from(vectors);
        let mut gsis = Vec::with_capacity(n);
        let mut irqfds = Vec::with_capacity(n);
        for _ in 0..n {
            let gsi = router.allocate();
            let evt = EventFd::new(EFD_NONBLOCK)?;
            if !external {
                router
                    .register_irqfd(&evt, gsi)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            }
            gsis.push(gsi);
            irqfds.push(evt);
        }
        Ok(Msix {
            entries: vec![
                Entry {
                    ctrl: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            gsis,
            irqfds,
            router,
            external,
            connected: vec![false; n],
        })
    }

    /// External mode: whether `vector`'s irqfd is registered with KVM.
    pub fn is_connected(&self, vector: usize) -> bool {
        self.connected.get(vector).copied().unwrap_or(false)
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True with no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Table size in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// PBA size in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// The GSI of `vector`.
    pub fn gsi(&self, vector: usize) -> Option<u32> {
        self.gsis.get(vector).copied()
    }

    /// The irqfd of `vector` (tests watch it).
    pub fn irqfd(&self, vector: usize) -> Option<&EventFd> {
        self.irqfds.get(vector)
    }

    /// Whether the vector is pending.
    pub fn is_pending(&self, vector: usize) -> bool {
        self.pending.get(vector).copied().unwrap_or(false)
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries[v].ctrl & VECTOR_MASKED == 0
    }

    /// Brings the route of `v` up to date and sends its pending message
    /// once it can be delivered.
    fn sync(&mut self, v: usize) {
        let can = self.deliverable(v);
        if self.external && !can && self.connected[v] {
            if let Err(e) = self.router.unregister_irqfd(&self.irqfds[v], self.gsis[v]) {
                log::warn!("KVM_IRQFD deassign: {e}");
            }
            self.connected[v] = false;
        }
        if !can {
            return;
        }
        let (addr, data) = self.entries[v].msg();
        if let Err(e) = self.router.set_msi(self.gsis[v], addr, data) {
            log::warn!("KVM_SET_GSI_ROUTING: {e}");
        }
        if self.external {
            // After the route: a signal that waited is delivered to the
            // message the guest has just made deliverable.
            if !self.connected[v] {
                match self.router.register_irqfd(&self.irqfds[v], self.gsis[v]) {
                    Ok(()) => self.connected[v] = true,
                    Err(e) => log::warn!("KVM_IRQFD: {e}"),
                }
            }
            return;
        }
        if std::mem::take(&mut self.pending[v]) {
            let _ = self.irqfds[v].write(1);
        }
    }

    /// Updates the enable and function-mask bits from message control.
    pub fn set_control(&mut self, ctrl: u16) {
        let enabled = ctrl & MSIX_ENABLE != 0;
        let masked = ctrl & MSIX_FUNCTION_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.entries.len() {
            self.sync(v);
        }
    }

    /// Sends `vector`, or marks it pending while it cannot be delivered.
    /// Out-of-range vectors are ignored.
    pub fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return;
        }
        if self.deliverable(v) {
            let _ = self.irqfds[v].write(1);
        } else {
            self.pending[v] = true;
        }
    }

    /// Reads the table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            let e = (o / MSIX_ENTRY_SIZE) as usize;
            let dw = ((o % MSIX_ENTRY_SIZE) / 4) as usize;
            *d = match self.entries.get(e) {
                Some(en) => en.dword(dw).to_le_bytes()[(o % 4) as usize],
                None => 0,
            };
        }
    }

    /// Writes the table at `offset` (any size up to 8, naturally aligned).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let o = offset + i as u64;
            let e = (o / MSIX_ENTRY_SIZE) as usize;
            let dw = ((o % MSIX_ENTRY_SIZE) / 4) as usize;
            let Some(en) = self.entries.get_mut(e) else {
                continue;
            };
            let shift = (o % 4) * 8;
            let v = (en.dword(dw) & !(0xff << shift)) | (u32::from(*b) << shift);
            en.set_dword(dw, v);
            if touched.last() != Some(&e) {
                touched.push(e);
            }
        }
        for e in touched {
            self.sync(e);
        }
    }

    /// Reads the PBA at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let first = ((offset + i as u64) * 8) as usize;
            *d = (0..8)
                .filter(|b| self.pending.get(first + b).copied().unwrap_or(false))
                .fold(0u8, |a, b| a | (1 << b));
        }
    }

    /// Masks every vector and clears pending bits and message control
    /// (function reset). Routes stay until overwritten.
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                ctrl: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
        if self.external {
            for v in 0..self.entries.len() {
                self.sync(v);
            }
        }
    }
}

/// The MSI-X capability body: ID, next (filled by the config space), message
/// control, table offset/BIR, PBA offset/BIR; and its write mask (only the
/// enable and function-mask bits).
pub fn capability(vectors: u16, bar: u8, table_off: u32, pba_off: u32) -> ([u8; 12], [u8; 12]) {
    let mut c = [0u8; 12];
    c[0] = PCI_CAP_ID_MSIX;
    c[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
    c[4..8].copy_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
    c[8..12].copy_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
    let mut m = [0u8; 12];
    m[3] = 0xc0;
    (c, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(m: &Msix, v: usize) -> bool {
        m.irqfd(v).unwrap().read().is_ok()
    }

    fn program(m: &mut Msix, v: u64, addr: u32, data: u32, masked: bool) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 4, &0u32.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn external_irqfds_follow_the_mask() {
        let router = Arc::new(GsiRouter::new(None));
        let mut m = Msix::new_external(2, router.clone()).unwrap();
        assert!(!m.is_connected(0) && !m.is_connected(1));
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        assert!(!m.is_connected(0), "MSI-X still disabled");
        m.set_control(MSIX_ENABLE);
        assert!(m.is_connected(0) && !m.is_connected(1));
        assert_eq!(
            router.msi_route(m.gsi(0).unwrap()),
            Some((0xfee0_0000, 0x30))
        );
        // Masking the vector, or the function, disconnects the irqfd.
        m.table_write(12, &1u32.to_le_bytes());
        assert!(!m.is_connected(0));
        m.table_write(12, &0u32.to_le_bytes());
        assert!(m.is_connected(0));
        m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(!m.is_connected(0));
        m.set_control(MSIX_ENABLE);
        assert!(m.is_connected(0));
        m.reset();
        assert!(!m.is_connected(0));
    }

    #[test]
    fn gsis_and_routes() {
        let router = Arc::new(GsiRouter::new(None));
        let mut a = Msix::new(3, router.clone()).unwrap();
        let b = Msix::new(2, router.clone()).unwrap();
        assert_eq!(a.gsi(0), Some(24));
        assert_eq!(a.gsi(2), Some(26));
        assert_eq!(b.gsi(0), Some(27));
        // Masked vectors get no route yet.
        program(&mut a, 1, 0xfee0_0000, 0x41, true);
        assert_eq!(router.msi_route(25), None);
        a.set_control(MSIX_ENABLE);
        assert_eq!(router.msi_route(25), None);
        a.table_write(16 + 12, &0u32.to_le_bytes());
        assert_eq!(router.msi_route(25), Some((0xfee0_0000, 0x41)));
        // The default irqchip routes are always part of the table.
        let entries = GsiRouter::entries(&router.inner.lock().unwrap());
        assert_eq!(entries.len(), 16 + 24 + 1);
        let mut t = [0u8; 4];
        a.table_read(16 + 8, &mut t);
        assert_eq!(u32::from_le_bytes(t), 0x41);
        a.table_read(12, &mut t);
        assert_eq!(u32::from_le_bytes(t), 1, "vector 0 still masked");
    }

    #[test]
    fn mask_and_pending() {
        let router = Arc::new(GsiRouter::new(None));
        let mut m = Msix::new(2, router).unwrap();
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
        // Disabled: pending.
        m.signal(0);
        assert!(m.is_pending(0) && !fired(&m, 0));
        let mut p = [0u8; 8];
        m.pba_read(0, &mut p);
        assert_eq!(p[0], 1);
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        assert!(!fired(&m, 0), "MSI-X still disabled");
        m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(!fired(&m, 0), "function masked");
        m.set_control(MSIX_ENABLE);
        assert!(fired(&m, 0), "pending delivered on function unmask");
        assert!(!m.is_pending(0));
        m.signal(0);
        assert!(fired(&m, 0));
        // Vector mask.
        m.table_write(12, &1u32.to_le_bytes());
        m.signal(0);
        assert!(!fired(&m, 0) && m.is_pending(0));
        m.table_write(12, &0u32.to_le_bytes());
        assert!(fired(&m, 0));
        // Out of range is ignored; reset masks everything.
        m.signal(7);
        m.reset();
        m.signal(0);
        assert!(!fired(&m, 0) && m.is_pending(0));
        let mut t = [0u8; 4];
        m.table_read(12, &mut t);
        assert_eq!(t, [1, 0, 0, 0]);
    }

    #[test]
    fn capability_layout() {
        let (c, m) = capability(3, 0, 0x4000, 0x6000);
        assert_eq!(c[0], 0x11);
        assert_eq!(u16::from_le_bytes([c[2], c[3]]), 2);
        assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 0x6000);
        assert_eq!(m[3], 0xc0);
    }
}
