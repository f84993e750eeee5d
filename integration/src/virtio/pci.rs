//! Modern virtio-pci transport (virtio 1.2, 4.1).
//!
//! One 64-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes) holds every structure:
//!
//! | offset   | structure                                       |
//! |----------|-------------------------------------------------|
//! | `0x0000` | common configuration                            |
//! | `0x1000` | ISR status                                      |
//! | `0x2000` | device-specific configuration                   |
//! | `0x3000` | notify: queue `n` at `0x3000 + 4 * n`           |
//! | `0x4000` | MSI-X table                                     |
//! | `0x6000` | MSI-X PBA                                       |
//!
//! Interrupts are MSI-X only: the function offers no INTx pin. Locks: the
//! transport state, then the device, then the MSI-X state; the vCPU path of
//! an inline notify takes the device lock only, and the device's interrupt
//! path takes only the MSI-X lock.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, ActiveQueue, NotifyMode, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::pci::msix::{self, GsiRouter, Msix};
use crate::pci::{Bdf, ConfigSpace, PciFunction};

/// virtio PCI vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector" for `msix_config` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// BAR 0 size.
pub const BAR_SIZE: u64 = 0x8000;
/// Offsets of the structures in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Queue notify registers.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue `n` notifies at `NOTIFY_OFFSET + 4 * n`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const PCI_CAP_ID_VNDR: u8 = 0x09;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Common configuration register offsets (virtio 1.2, 4.1.4.3).
mod common {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGENERATION: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_DESCHI: u64 = 0x24;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_AVAILHI: u64 = 0x2c;
    pub const Q_USEDLO: u64 = 0x30;
    pub const Q_USEDHI: u64 = 0x34;
    /// Size of the structure we implement.
    pub const LEN: u64 = 0x38;
    /// Fields as (offset, size).
    pub const FIELDS: [(u64, u64); 19] = [
        (DFSELECT, 4),
        (DF, 4),
        (GFSELECT, 4),
        (GF, 4),
        (MSIX, 2),
        (NUMQ, 2),
        (STATUS, 1),
        (CFGGENERATION, 1),
        (Q_SELECT, 2),
        (Q_SIZE, 2),
        (Q_MSIX, 2),
        (Q_ENABLE, 2),
        (Q_NOFF, 2),
        (Q_DESCLO, 4),
        (Q_DESCHI, 4),
        (Q_AVAILLO, 4),
        (Q_AVAILHI, 4),
        (Q_USEDLO, 4),
        (Q_USEDHI, 4),
    ];
}

/// The interrupt side of the transport, handed to the device.
pub struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    /// DEVICE_NEEDS_RESET raised by the device (see
    /// [`VirtioInterrupt::needs_reset`]); cleared by a reset.
    needs_reset: AtomicBool,
}

impl PciInterrupt {
    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.lock().unwrap().len() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        let Some(v) = self.queue_vectors.get(usize::from(queue)) else {
            return;
        };
        let v = v.load(Ordering::Acquire);
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        if v != VIRTIO_MSI_NO_VECTOR {
            self.msix.lock().unwrap().signal(v);
        }
    }

    fn signal_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        let v = self.config_vector.load(Ordering::Acquire);
        if v != VIRTIO_MSI_NO_VECTOR {
            self.msix.lock().unwrap().signal(v);
        }
    }

    fn needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config();
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueState {
    max: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Transport registers and the registered ioeventfds.
struct State {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueState>,
    /// (queue, eventfd, address) for each registered ioeventfd.
    ioevents: Vec<(u16, EventFd, u64)>,
    /// The driver wrote 0 and the device is still finishing its reset:
    /// the status reads back its old value until then.
    resetting: bool,
}

impl State {
    fn new(max_sizes: &[u16]) -> Self {
        State {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: max_sizes
                .iter()
                .map(|&m| QueueState {
                    max: m,
                    size: m,
                    ..Default::default()
                })
                .collect(),
            ioevents: Vec::new(),
            resetting: false,
        }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    bdf: Bdf,
    config: Mutex<ConfigSpace>,
    /// Config dword holding the MSI-X message control (upper half).
    msix_ctrl_reg: usize,
    state: Mutex<State>,
    device: Mutex<Box<dyn VirtioDevice>>,
    interrupt: Arc<PciInterrupt>,
    device_features: u64,
    notify_mode: NotifyMode,
    active: AtomicBool,
    vm: Option<Arc<VmFd>>,
}

fn vendor_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![PCI_CAP_ID_VNDR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

fn class_code(device_type: u32) -> u32 {
    match device_type {
        // Mass storage, other.
        2 => 0x01_80_00,
        // Unassigned class.
        _ => 0xff_00_00,
    }
}

impl VirtioPciDevice {
    /// Puts `device` behind a virtio-pci function at `bdf`, with BAR 0 at
    /// `bar_addr` ([`BAR_SIZE`] bytes, aligned). MSI-X vectors (one per
    /// queue plus one for configuration changes) get GSIs from `router`.
    /// `vm` registers the notify ioeventfds (`None` in unit tests).
    pub fn new(
        bdf: Bdf,
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        router: Arc<GsiRouter>,
        vm: Option<Arc<VmFd>>,
    ) -> std::io::Result<Self> {
        let max_sizes = device.queue_max_sizes();
        let nq = max_sizes.len();
        let vectors = (nq + 1) as u16;
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(
            VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            class_code(device_type),
            1,
            VIRTIO_PCI_VENDOR_ID,
            0x1100,
        );
        config.add_mem_bar(0, bar_addr, BAR_SIZE, true);
        config.add_capability(
            &vendor_cap(CAP_COMMON, COMMON_OFFSET, REGION_SIZE, None),
            &[],
        );
        config.add_capability(
            &vendor_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                REGION_SIZE,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        );
        config.add_capability(&vendor_cap(CAP_ISR, ISR_OFFSET, REGION_SIZE, None), &[]);
        config.add_capability(
            &vendor_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, REGION_SIZE, None),
            &[],
        );
        let (cap, mask) =
            msix::capability(vectors, 0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_off = config.add_capability(&cap, &mask);
        let msix = Msix::new(vectors, router)?;
        assert!(msix.table_size() <= MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET);
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..nq)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            bdf,
            config: Mutex::new(config),
            msix_ctrl_reg: msix_off / 4,
            state: Mutex::new(State::new(&max_sizes)),
            device_features: device.device_features(),
            notify_mode: device.notify_mode(),
            device: Mutex::new(device),
            interrupt,
            active: AtomicBool::new(false),
            vm,
        })
    }

    /// The function's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The device status register (tests, diagnostics).
    pub fn device_status(&self) -> u8 {
        let mut st = self.state.lock().unwrap();
        self.poll_reset(&mut st);
        self.status_of(&st)
    }

    /// The status as the driver reads it.
    fn status_of(&self, st: &State) -> u8 {
        let failed = st.status & status::DRIVER_OK != 0
            && self.interrupt.needs_reset.load(Ordering::Acquire);
        st.status | if failed { status::NEEDS_RESET } else { 0 }
    }

    fn bar0(&self) -> u64 {
        self.config.lock().unwrap().bar(0).map_or(0, |(a, _)| a)
    }

    fn common_bytes(&self, st: &State) -> [u8; common::LEN as usize] {
        let mut b = [0u8; common::LEN as usize];
        let mut put = |off: u64, v: &[u8]| {
            b[off as usize..off as usize + v.len()].copy_from_slice(v);
        };
        put(common::DFSELECT, &st.device_feature_select.to_le_bytes());
        let df = match st.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(common::DF, &df.to_le_bytes());
        put(common::GFSELECT, &st.driver_feature_select.to_le_bytes());
        let gf = match st.driver_feature_select {
            0 => st.driver_features as u32,
            1 => (st.driver_features >> 32) as u32,
            _ => 0,
        };
        put(common::GF, &gf.to_le_bytes());
        let cv = self.interrupt.config_vector.load(Ordering::Acquire);
        put(common::MSIX, &cv.to_le_bytes());
        put(common::NUMQ, &(st.queues.len() as u16).to_le_bytes());
        put(common::STATUS, &[self.status_of(st)]);
        put(common::CFGGENERATION, &[st.config_generation]);
        put(common::Q_SELECT, &st.queue_select.to_le_bytes());
        let qi = usize::from(st.queue_select);
        if let Some(q) = st.queues.get(qi) {
            let qv = self.interrupt.queue_vectors[qi].load(Ordering::Acquire);
            put(common::Q_SIZE, &q.size.to_le_bytes());
            put(common::Q_MSIX, &qv.to_le_bytes());
            put(common::Q_ENABLE, &u16::from(q.enabled).to_le_bytes());
            put(common::Q_NOFF, &st.queue_select.to_le_bytes());
            put(common::Q_DESCLO, &q.desc.to_le_bytes());
            put(common::Q_AVAILLO, &q.driver.to_le_bytes());
            put(common::Q_USEDLO, &q.device.to_le_bytes());
        }
        b
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let mut st = self.state.lock().unwrap();
        self.poll_reset(&mut st);
        let b = self.common_bytes(&st);
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn common_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        self.poll_reset(&mut st);
        if st.resetting {
            // The driver must wait for the status to read 0 first.
            log::debug!("{}: common config write while resetting: ignored", self.bdf);
            return;
        }
        let mut b = self.common_bytes(&st);
        let end = offset + data.len() as u64;
        if end > common::LEN {
            return;
        }
        b[offset as usize..end as usize].copy_from_slice(data);
        for (foff, fsize) in common::FIELDS {
            if foff < end && offset < foff + fsize {
                let mut v = [0u8; 4];
                v[..fsize as usize].copy_from_slice(&b[foff as usize..(foff + fsize) as usize]);
                self.write_field(&mut st, foff, u32::from_le_bytes(v));
            }
        }
    }

    fn write_field(&self, st: &mut State, field: u64, v: u32) {
        let qi = usize::from(st.queue_select);
        let locked = st.status & status::FEATURES_OK != 0;
        match field {
            common::DFSELECT => st.device_feature_select = v,
            common::GFSELECT => st.driver_feature_select = v,
            common::GF if !locked => {
                let (shift, keep) = match st.driver_feature_select {
                    0 => (0, 0xffff_ffff_0000_0000u64),
                    1 => (32, 0x0000_0000_ffff_ffffu64),
                    _ => return,
                };
                let f = (st.driver_features & keep) | (u64::from(v) << shift);
                st.driver_features = f & self.device_features;
            }
            common::MSIX => {
                let v = self.interrupt.valid_vector(v as u16);
                self.interrupt.config_vector.store(v, Ordering::Release);
            }
            common::STATUS => self.write_status(st, v as u8),
            common::Q_SELECT => st.queue_select = v as u16,
            common::Q_MSIX if qi < st.queues.len() => {
                let v = self.interrupt.valid_vector(v as u16);
                self.interrupt.queue_vectors[qi].store(v, Ordering::Release);
            }
            _ => {
                let Some(q) = st.queues.get_mut(qi) else {
                    return;
                };
                if q.enabled {
                    return;
                }
                let lo = |a: u64| (a & !0xffff_ffff) | u64::from(v);
                let hi = |a: u64| (a & 0xffff_ffff) | (u64::from(v) << 32);
                match field {
                    common::Q_SIZE => {
                        let s = v as u16;
                        if s.is_power_of_two() && s <= q.max {
                            q.size = s;
                        }
                    }
                    common::Q_ENABLE if v == 1 => q.enabled = true,
                    common::Q_DESCLO => q.desc = lo(q.desc),
                    common::Q_DESCHI => q.desc = hi(q.desc),
                    common::Q_AVAILLO => q.driver = lo(q.driver),
                    common::Q_AVAILHI => q.driver = hi(q.driver),
                    common::Q_USEDLO => q.device = lo(q.device),
                    common::Q_USEDHI => q.device = hi(q.device),
                    _ => {}
                }
            }
        }
    }

    fn write_status(&self, st: &mut State, new: u8) {
        if new == 0 {
            self.reset(st);
            return;
        }
        let old = st.status;
        let mut new = new;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            if st.driver_features & VIRTIO_F_VERSION_1 != 0 {
                self.device.lock().unwrap().ack_features(st.driver_features);
            } else {
                log::warn!("{}: driver did not accept VERSION_1", self.bdf);
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate(st) {
                log::warn!("{}: activation failed: {e}", self.bdf);
                new |= status::NEEDS_RESET;
                st.status = new;
                self.interrupt.signal_config();
                return;
            }
        }
        st.status = new;
    }

    fn activate(&self, st: &mut State) -> Result<(), String> {
        let event_idx = st.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let notify_base = self.bar0() + NOTIFY_OFFSET;
        let mut queues = Vec::new();
        for (i, qs) in st.queues.iter().enumerate() {
            if !qs.enabled {
                continue;
            }
            let mut q = Queue::new(qs.max).map_err(|e| format!("queue {i}: {e:?}"))?;
            q.set_size(qs.size);
            q.set_desc_table_address(Some(qs.desc as u32), Some((qs.desc >> 32) as u32));
            q.set_avail_ring_address(Some(qs.driver as u32), Some((qs.driver >> 32) as u32));
            q.set_used_ring_address(Some(qs.device as u32), Some((qs.device >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            let notify = match self.notify_mode {
                NotifyMode::Inline => None,
                NotifyMode::EventFd => {
                    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
                    let addr = notify_base + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                    if let Some(vm) = &self.vm {
                        vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                            .map_err(|e| format!("KVM_IOEVENTFD: {e}"))?;
                    }
                    let keep = evt.try_clone().map_err(|e| e.to_string())?;
                    st.ioevents.push((i as u16, keep, addr));
                    Some(evt)
                }
            };
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                notify,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let r = self.device.lock().unwrap().activate(queues, interrupt);
        match r {
            Ok(()) => {
                self.active.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.unregister_ioevents(st);
                Err(e.to_string())
            }
        }
    }

    fn unregister_ioevents(&self, st: &mut State) {
        for (_, evt, addr) in st.ioevents.drain(..) {
            if let Some(vm) = &self.vm {
                if let Err(e) =
                    vm.unregister_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                {
                    log::warn!("unregistering ioeventfd at {addr:#x}: {e}");
                }
            }
        }
    }

    /// The driver wrote 0 to the status: stop notifications now, start the
    /// device's reset, and finish it at once or when the device is done
    /// (the status reads its old value until then; the vCPU never waits).
    fn reset(&self, st: &mut State) {
        self.active.store(false, Ordering::Release);
        self.unregister_ioevents(st);
        if self.device.lock().unwrap().reset() {
            self.finish_reset(st);
        } else {
            st.resetting = true;
        }
    }

    /// Completes a reset left in progress if the device is done.
    fn poll_reset(&self, st: &mut State) {
        if st.resetting && self.device.lock().unwrap().reset_done() {
            self.finish_reset(st);
        }
    }

    /// Returns the registers to their reset values.
    fn finish_reset(&self, st: &mut State) {
        let max: Vec<u16> = st.queues.iter().map(|q| q.max).collect();
        let generation = st.config_generation;
        *st = State::new(&max);
        st.config_generation = generation;
        self.interrupt
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in &self.interrupt.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt.needs_reset.store(false, Ordering::Release);
    }

    fn notify(&self, queue: u16) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        match self.notify_mode {
            NotifyMode::Inline => self.device.lock().unwrap().queue_notify(queue),
            // The ioeventfd normally catches these; a write that exits
            // (e.g. after the guest moved the BAR) is forwarded to it.
            NotifyMode::EventFd => {
                let st = self.state.lock().unwrap();
                if let Some((_, evt, _)) = st.ioevents.iter().find(|(q, _, _)| *q == queue) {
                    let _ = evt.write(1);
                }
            }
        }
    }
}

impl PciFunction for VirtioPciDevice {
    fn config_read(&self, reg: usize) -> u32 {
        self.config.lock().unwrap().read(reg)
    }

    fn config_write(&self, reg: usize, offset: usize, data: &[u8]) {
        let mut c = self.config.lock().unwrap();
        c.write(reg, offset, data);
        if reg == self.msix_ctrl_reg && offset + data.len() > 2 {
            let ctrl = (c.read(reg) >> 16) as u16;
            drop(c);
            self.interrupt.msix.lock().unwrap().set_control(ctrl);
        }
    }

    fn mapped_bars(&self) -> Vec<(usize, u64, u64)> {
        self.config.lock().unwrap().mapped_bars()
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0);
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_OFFSET, data),
            o if o < DEVICE_CFG_OFFSET => {
                data.fill(0);
                if o == ISR_OFFSET {
                    // Reading clears it.
                    data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if o < NOTIFY_OFFSET => self
                .device
                .lock()
                .unwrap()
                .read_config(o - DEVICE_CFG_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => data.fill(0),
            o if o < MSIX_PBA_OFFSET => self
                .interrupt
                .msix
                .lock()
                .unwrap()
                .table_read(o - MSIX_TABLE_OFFSET, data),
            o => self
                .interrupt
                .msix
                .lock()
                .unwrap()
                .pba_read(o - MSIX_PBA_OFFSET, data),
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_OFFSET, data),
            o if o < DEVICE_CFG_OFFSET => {}
            o if o < NOTIFY_OFFSET => self
                .device
                .lock()
                .unwrap()
                .write_config(o - DEVICE_CFG_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                let nq = self.interrupt.queue_vectors.len() as u64;
                if q < nq {
                    self.notify(q as u16);
                }
            }
            o if o < MSIX_PBA_OFFSET => self
                .interrupt
                .msix
                .lock()
                .unwrap()
                .table_write(o - MSIX_TABLE_OFFSET, data),
            // The PBA is read-only.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;

    #[derive(Default)]
    struct Log {
        acked: Option<u64>,
        activated: Vec<(u16, u16, u64, u64, u64, bool, bool)>,
        notified: Vec<u16>,
        resets: u32,
        /// `reset_done` answers false this many more times.
        reset_busy: u32,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
    }

    struct Fake {
        log: Arc<Mutex<Log>>,
        mode: NotifyMode,
        fail: bool,
    }

    const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            23
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64, 8]
        }
        fn device_features(&self) -> u64 {
            OFFERED
        }
        fn ack_features(&mut self, features: u64) {
            self.log.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, d) in data.iter_mut().enumerate() {
                *d = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn notify_mode(&self) -> NotifyMode {
            self.mode
        }
        fn activate(
            &mut self,
            queues: Vec<ActiveQueue>,
            interrupt: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError("no".into()));
            }
            let mut l = self.log.lock().unwrap();
            for q in queues {
                l.activated.push((
                    q.index,
                    q.queue.size(),
                    q.queue.desc_table(),
                    q.queue.avail_ring(),
                    q.queue.used_ring(),
                    q.queue.event_idx_enabled(),
                    q.notify.is_some(),
                ));
            }
            l.interrupt = Some(interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) {
            self.log.lock().unwrap().notified.push(queue);
        }
        fn reset(&mut self) -> bool {
            let mut l = self.log.lock().unwrap();
            l.resets += 1;
            l.reset_busy == 0
        }
        fn reset_done(&mut self) -> bool {
            let mut l = self.log.lock().unwrap();
            l.reset_busy = l.reset_busy.saturating_sub(1);
            l.reset_busy == 0
        }
    }

    const BAR: u64 = 0xc000_0000;

    fn dev(mode: NotifyMode, fail: bool) -> (VirtioPciDevice, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let d = VirtioPciDevice::new(
            Bdf::new(1),
            Box::new(Fake {
                log: log.clone(),
                mode,
                fail,
            }),
            BAR,
            Arc::new(GsiRouter::new(None)),
            None,
        )
        .unwrap();
        (d, log)
    }

    fn w32(d: &VirtioPciDevice, off: u64, v: u32) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w16(d: &VirtioPciDevice, off: u64, v: u16) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w8(d: &VirtioPciDevice, off: u64, v: u8) {
        d.bar_write(0, off, &[v]);
    }
    fn r32(d: &VirtioPciDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r16(d: &VirtioPciDevice, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.bar_read(0, off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r8(d: &VirtioPciDevice, off: u64) -> u8 {
        let mut b = [0u8; 1];
        d.bar_read(0, off, &mut b);
        b[0]
    }

    /// Walks the capability list: (cap id, cfg_type, offset in BAR).
    fn caps(d: &VirtioPciDevice) -> Vec<(u8, u8, u32)> {
        let byte = |o: usize| (d.config_read(o / 4) >> ((o % 4) * 8)) as u8;
        let mut v = Vec::new();
        let mut p = byte(0x34) as usize;
        while p != 0 {
            v.push((byte(p), byte(p + 3), d.config_read(p / 4 + 2)));
            p = byte(p + 1) as usize;
        }
        v
    }

    fn negotiate(d: &VirtioPciDevice, features: u64) {
        w8(d, common::STATUS, status::ACKNOWLEDGE);
        w8(d, common::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(d, common::GFSELECT, 0);
        w32(d, common::GF, features as u32);
        w32(d, common::GFSELECT, 1);
        w32(d, common::GF, (features >> 32) as u32);
        w8(
            d,
            common::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(d: &VirtioPciDevice, q: u16, size: u16, base: u64) {
        w16(d, common::Q_SELECT, q);
        w16(d, common::Q_SIZE, size);
        w32(d, common::Q_DESCLO, base as u32);
        w32(d, common::Q_DESCHI, (base >> 32) as u32);
        d.bar_write(0, common::Q_AVAILLO, &(base + 0x1000).to_le_bytes());
        w32(d, common::Q_USEDLO, (base + 0x2000) as u32);
        w32(d, common::Q_USEDHI, (base >> 32) as u32);
        w16(d, common::Q_MSIX, q + 1);
        w16(d, common::Q_ENABLE, 1);
    }

    const ALL_OK: u8 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn header_and_capabilities() {
        let (d, _) = dev(NotifyMode::Inline, false);
        assert_eq!(d.config_read(0), 0x1057_1af4);
        assert_eq!(d.config_read(2) & 0xff, 1, "revision 1");
        assert_eq!(d.config_read(0x2c / 4), 0x1100_1af4);
        assert_eq!(d.config_read(0x3c / 4) >> 8 & 0xff, 0, "no INTx pin");
        assert_eq!(d.config_read(4), (BAR as u32) | 4);
        let c = caps(&d);
        assert_eq!(
            c.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
            vec![(9, 1), (9, 2), (9, 3), (9, 4), (0x11, 0)]
        );
        assert_eq!(c[0].2, 0);
        assert_eq!(c[1].2, 0x3000);
        assert_eq!(c[2].2, 0x1000);
        assert_eq!(c[3].2, 0x2000);
        // Sizing the BAR.
        d.config_write(4, 0, &[0xff; 4]);
        d.config_write(5, 0, &[0xff; 4]);
        assert_eq!(d.config_read(4), 0xffff_8004);
        assert_eq!(d.config_read(5), 0xffff_ffff);
    }

    #[test]
    fn feature_negotiation() {
        let (d, log) = dev(NotifyMode::Inline, false);
        assert_eq!(r16(&d, common::NUMQ), 2);
        w32(&d, common::DFSELECT, 0);
        assert_eq!(r32(&d, common::DF), OFFERED as u32);
        w32(&d, common::DFSELECT, 1);
        assert_eq!(r32(&d, common::DF), 1);
        w32(&d, common::DFSELECT, 2);
        assert_eq!(r32(&d, common::DF), 0);
        // Unoffered bits are dropped.
        negotiate(&d, VIRTIO_F_VERSION_1 | 1 | 2 | (1 << 40));
        assert_eq!(
            r8(&d, common::STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        assert_eq!(log.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1 | 1));
        // Locked after FEATURES_OK.
        w32(&d, common::GFSELECT, 0);
        w32(&d, common::GF, 0);
        assert_eq!(r32(&d, common::GF), 1);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (d, log) = dev(NotifyMode::Inline, false);
        negotiate(&d, 1);
        assert_eq!(r8(&d, common::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(log.lock().unwrap().acked, None);
        // DRIVER_OK without FEATURES_OK does not activate.
        w8(
            &d,
            common::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(log.lock().unwrap().interrupt.is_none());
    }

    #[test]
    fn queue_setup_activate_and_reset() {
        let (d, log) = dev(NotifyMode::Inline, false);
        negotiate(&d, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        w16(&d, common::Q_SELECT, 0);
        assert_eq!(r16(&d, common::Q_SIZE), 64);
        assert_eq!(r16(&d, common::Q_NOFF), 0);
        // Invalid sizes are ignored.
        w16(&d, common::Q_SIZE, 128);
        assert_eq!(r16(&d, common::Q_SIZE), 64);
        setup_queue(&d, 0, 32, 0x1_0000_0000);
        assert_eq!(r16(&d, common::Q_SIZE), 32);
        assert_eq!(r32(&d, common::Q_DESCHI), 1);
        assert_eq!(r16(&d, common::Q_MSIX), 1);
        assert_eq!(r16(&d, common::Q_ENABLE), 1);
        // Enabled queues are frozen.
        w16(&d, common::Q_SIZE, 16);
        assert_eq!(r16(&d, common::Q_SIZE), 32);
        // Vector beyond the table reads back as NO_VECTOR.
        w16(&d, common::Q_SELECT, 1);
        w16(&d, common::Q_MSIX, 3);
        assert_eq!(r16(&d, common::Q_MSIX), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(r16(&d, common::Q_NOFF), 1);
        // Unknown queue reads as 0.
        w16(&d, common::Q_SELECT, 5);
        assert_eq!(r16(&d, common::Q_SIZE), 0);
        w16(&d, common::MSIX, 0);
        assert_eq!(r16(&d, common::MSIX), 0);
        // Notifies before DRIVER_OK are dropped.
        w16(&d, NOTIFY_OFFSET, 0);
        w8(&d, common::STATUS, ALL_OK);
        assert_eq!(r8(&d, common::STATUS), ALL_OK);
        {
            let l = log.lock().unwrap();
            assert_eq!(
                l.activated,
                vec![(
                    0,
                    32,
                    0x1_0000_0000,
                    0x1_0000_1000,
                    0x1_0000_2000,
                    true,
                    false
                )]
            );
            assert!(l.notified.is_empty());
        }
        w16(&d, NOTIFY_OFFSET + 4, 1);
        w16(&d, NOTIFY_OFFSET + 8, 2); // no such queue
        assert_eq!(log.lock().unwrap().notified, vec![1]);

        // Interrupts: queue 0 -> vector 1, config -> vector 0 + ISR.
        let irq = log.lock().unwrap().interrupt.clone().unwrap();
        let msix_ctrl = (d.msix_ctrl_reg, 2);
        d.config_write(msix_ctrl.0, msix_ctrl.1, &msix::MSIX_ENABLE.to_le_bytes());
        // Unmask vectors 0 and 1.
        w32(&d, MSIX_TABLE_OFFSET + 12, 0);
        w32(&d, MSIX_TABLE_OFFSET + 16 + 12, 0);
        irq.signal_queue(0);
        irq.signal_config();
        {
            let m = d.interrupt.msix.lock().unwrap();
            assert_eq!(m.irqfd(1).unwrap().read().unwrap(), 1);
            assert_eq!(m.irqfd(0).unwrap().read().unwrap(), 1);
        }
        assert_eq!(r8(&d, ISR_OFFSET) & ISR_CONFIG, ISR_CONFIG);
        assert_eq!(r8(&d, ISR_OFFSET), 0, "read clears");
        // Masked vector: pending bit in the PBA.
        w32(&d, MSIX_TABLE_OFFSET + 16 + 12, 1);
        irq.signal_queue(0);
        assert_eq!(r8(&d, MSIX_PBA_OFFSET), 2);
        // Device config is forwarded.
        assert_eq!(r32(&d, DEVICE_CFG_OFFSET + 4), 0x0706_0504);

        // Reset.
        w8(&d, common::STATUS, 0);
        assert_eq!(r8(&d, common::STATUS), 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        w16(&d, common::Q_SELECT, 0);
        assert_eq!(r16(&d, common::Q_ENABLE), 0);
        assert_eq!(r16(&d, common::Q_SIZE), 64);
        assert_eq!(r16(&d, common::Q_MSIX), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(r16(&d, common::MSIX), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(r32(&d, common::GF), 0);
        w16(&d, NOTIFY_OFFSET, 0);
        assert_eq!(
            log.lock().unwrap().notified,
            vec![1],
            "inactive after reset"
        );
    }

    #[test]
    fn a_slow_reset_reads_back_non_zero_until_the_device_is_done() {
        let (d, log) = dev(NotifyMode::Inline, false);
        negotiate(&d, VIRTIO_F_VERSION_1);
        setup_queue(&d, 0, 8, 0x10_0000);
        w8(&d, common::STATUS, ALL_OK);
        // Busy for four polls (every common-config access polls).
        log.lock().unwrap().reset_busy = 4;
        w8(&d, common::STATUS, 0);
        // The vCPU was not held: the status says the reset is running.
        assert_eq!(r8(&d, common::STATUS), ALL_OK);
        // Writes while resetting are ignored; notifies are already off.
        w8(&d, common::STATUS, status::ACKNOWLEDGE);
        w16(&d, NOTIFY_OFFSET, 0);
        assert!(log.lock().unwrap().notified.is_empty());
        assert_eq!(r8(&d, common::STATUS), ALL_OK);
        assert_eq!(r8(&d, common::STATUS), 0, "done on the fourth poll");
        assert_eq!(log.lock().unwrap().resets, 1);
        w16(&d, common::Q_SELECT, 0);
        assert_eq!(r16(&d, common::Q_ENABLE), 0);
    }

    #[test]
    fn needs_reset_sets_the_status_bit_and_signals_config_until_reset() {
        let (d, log) = dev(NotifyMode::Inline, false);
        negotiate(&d, VIRTIO_F_VERSION_1);
        setup_queue(&d, 0, 8, 0x10_0000);
        w8(&d, common::STATUS, ALL_OK);
        let irq = log.lock().unwrap().interrupt.clone().unwrap();
        irq.needs_reset();
        irq.needs_reset();
        assert_eq!(r8(&d, common::STATUS), ALL_OK | status::NEEDS_RESET);
        assert_eq!(r8(&d, ISR_OFFSET) & ISR_CONFIG, ISR_CONFIG);
        w8(&d, common::STATUS, 0);
        assert_eq!(r8(&d, common::STATUS), 0);
        negotiate(&d, VIRTIO_F_VERSION_1);
        setup_queue(&d, 0, 8, 0x10_0000);
        w8(&d, common::STATUS, ALL_OK);
        assert_eq!(r8(&d, common::STATUS), ALL_OK, "cleared by the reset");
    }

    #[test]
    fn eventfd_mode_and_activation_failure() {
        let (d, log) = dev(NotifyMode::EventFd, false);
        negotiate(&d, VIRTIO_F_VERSION_1);
        setup_queue(&d, 1, 8, 0x10_0000);
        w8(&d, common::STATUS, ALL_OK);
        assert_eq!(
            log.lock().unwrap().activated,
            vec![(1, 8, 0x10_0000, 0x10_1000, 0x10_2000, false, true)]
        );
        assert_eq!(d.state.lock().unwrap().ioevents[0].2, BAR + 0x3004);
        w8(&d, common::STATUS, 0);
        assert!(d.state.lock().unwrap().ioevents.is_empty());

        let (d, _) = dev(NotifyMode::EventFd, true);
        negotiate(&d, VIRTIO_F_VERSION_1);
        setup_queue(&d, 0, 8, 0x10_0000);
        w8(&d, common::STATUS, ALL_OK);
        assert_ne!(r8(&d, common::STATUS) & status::NEEDS_RESET, 0);
        assert!(d.state.lock().unwrap().ioevents.is_empty());
    }
}
