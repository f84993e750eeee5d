//! The VM: KVM objects, guest memory, legacy devices and vCPU threads.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use virtio_iommu::Metrics;

use crate::acpi::{sleep_port_write, SleepPortAction, ACPI_SLEEP_PORT};
use crate::boot::{load_guest, BootEntry};
use crate::config::{SerialMode, VmConfig};
use crate::cpu::setup_vcpu;
use crate::layout::*;
use crate::pci::PciBus;
use crate::rtc::{Rtc, RTC_DATA, RTC_INDEX};
use crate::vcpu_hold::{VcpuHold, VcpuSlot};

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error("vCPU {0}: {1}")]
    Cpu(u8, crate::cpu::CpuError),
    #[error("serial output {0}: {1}")]
    SerialOutput(String, std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("spawning vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("device: {0}")]
    Device(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// Guest asked for a reset (i8042, triple fault, KVM system event).
    Reset(String),
    /// Guest powered off (ACPI sleep register, KVM system event, or every
    /// vCPU halted with interrupts disabled: Linux's `poweroff` without
    /// ACPI).
    Shutdown(String),
    /// Something went wrong; carries the message.
    Error(String),
    /// SIGTERM or SIGINT stopped the VMM (the guest was still running).
    Signal(i32),
}

impl VmExit {
    /// Process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset(_) | VmExit::Shutdown(_) => 0,
            VmExit::Error(_) => 1,
            // What a shell reports for a process that the signal ended.
            VmExit::Signal(sig) => 128 + sig,
        }
    }
}

/// Serial interrupt line: an eventfd wired to GSI 4 with KVM_IRQFD.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type SerialDevice = Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

const COM1: u16 = 0x3f8;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const I8042_STATUS_OBF: u8 = 0x01;

/// Port I/O devices shared by the vCPU threads.
pub struct PioBus {
    serial: Option<Mutex<SerialDevice>>,
    rtc: Mutex<Rtc>,
}

/// What a port write asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    Reset,
    /// ACPI reset register.
    AcpiReset,
    /// ACPI sleep control register, S5 with SLP_EN.
    AcpiPowerOff,
}

impl PioBus {
    /// A bus with an optional serial port (COM1) and the CMOS RTC.
    pub fn new(serial: Option<Mutex<SerialDevice>>) -> Self {
        PioBus {
            serial,
            rtc: Mutex::new(Rtc::new()),
        }
    }

    /// Handles an IN; unknown ports read as all ones (absent hardware).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match (port, &self.serial) {
            (COM1..=0x3ff, Some(s)) if data.len() == 1 => {
                data[0] = s.lock().unwrap().read((port - COM1) as u8);
            }
            (RTC_INDEX | RTC_DATA, _) if data.len() == 1 => {
                data[0] = self.rtc.lock().unwrap().read(port);
            }
            // No i8042: a status with "output buffer full" that never drains
            // tells Linux at once that there is no controller (a zero status
            // makes it wait for replies), and "input buffer empty" lets the
            // keyboard-controller reset go out without a long busy wait.
            (I8042_CMD, _) => data.fill(I8042_STATUS_OBF),
            // Sleep status: never asleep, WAK_STS clear.
            (ACPI_SLEEP_PORT, _) => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Handles an OUT.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        match (port, &self.serial) {
            (COM1..=0x3ff, Some(s)) if data.len() == 1 => {
                if let Err(e) = s.lock().unwrap().write((port - COM1) as u8, data[0]) {
                    log::warn!("serial write: {e:?}");
                }
                PioAction::None
            }
            (I8042_CMD, _) if data.first() == Some(&I8042_RESET) => PioAction::Reset,
            (ACPI_SLEEP_PORT, _) if data.len() == 1 => match sleep_port_write(data[0]) {
                SleepPortAction::PowerOff => PioAction::AcpiPowerOff,
                SleepPortAction::Reset => PioAction::AcpiReset,
                SleepPortAction::None => PioAction::None,
            },
            (RTC_INDEX | RTC_DATA, _) if data.len() == 1 => {
                self.rtc.lock().unwrap().write(port, data[0]);
                PioAction::None
            }
            _ => PioAction::None,
        }
    }

    /// Flushes the serial output.
    pub fn flush(&self) {
        if let Some(s) = &self.serial {
            let _ = s.lock().unwrap().writer_mut().flush();
        }
    }
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    pio: Arc<PioBus>,
    pci: Arc<PciBus>,
    metrics: Option<Arc<Metrics>>,
    /// Per-disk summaries printed at exit.
    disks: Vec<crate::virtio::block::DiskReport>,
    /// Per passed-through device summaries printed at exit.
    passthrough: Vec<crate::vfio::PassthroughReport>,
    /// Where the vCPUs park when a fence holds them.
    hold: Arc<VcpuHold>,
    _mem: GuestMemoryMmap,
}

fn serial_output(mode: &SerialMode) -> Result<Option<Box<dyn Write + Send>>, VmError> {
    Ok(match mode {
        SerialMode::Tty => Some(Box::new(std::io::stdout())),
        SerialMode::Null => Some(Box::new(std::io::sink())),
        SerialMode::Off => None,
        SerialMode::File(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| VmError::SerialOutput(p.display().to_string(), e))?;
            Some(Box::new(std::io::LineWriter::new(f)))
        }
    })
}

impl Vm {
    /// Creates the VM, loads the guest and sets up the vCPUs.
    pub fn new(cfg: &VmConfig) -> Result<Self, VmError> {
        let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = Arc::new(kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(cfg.mem_size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = crate::memory::guest_ram(&ranges, cfg.mem_shared).map_err(VmError::Memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which the Vm keeps alive
            // for as long as the VM fd exists.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let hold = VcpuHold::new(SIGRTMIN());
        // Linux takes CPUs and interrupt wiring from the ACPI MADT; the MP
        // table only serves guests booted with acpi=off.
        let mp = crate::mptable::build(cfg.cpus, crate::mptable::MPTABLE_START);
        mem.write_slice(&mp, GuestAddress(crate::mptable::MPTABLE_START))
            .map_err(|e| VmError::Memory(e.to_string()))?;
        let crate::devices::PciSetup {
            bus: pci,
            topology,
            metrics,
            disks,
            passthrough,
        } = crate::devices::build(cfg, &vm, &mem, &hold).map_err(VmError::Device)?;
        let acpi = crate::acpi::build(cfg.cpus, crate::acpi::RSDP_START, topology.as_ref());
        mem.write_slice(&acpi, GuestAddress(crate::acpi::RSDP_START))
            .map_err(|e| VmError::Memory(e.to_string()))?;

        let entry: BootEntry = load_guest(
            &mem,
            cfg.mem_size,
            &cfg.kernel,
            cfg.initramfs.as_deref(),
            &cfg.cmdline,
        )?;

        let serial = match serial_output(&cfg.serial)? {
            Some(out) => {
                let evt = EventFd::new(libc_efd_nonblock()).map_err(VmError::EventFd)?;
                vm.register_irqfd(&evt, 4).map_err(kvm("KVM_IRQFD"))?;
                Some(Mutex::new(Serial::new(EventFdTrigger(evt), out)))
            }
            None => None,
        };

        let supported = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            setup_vcpu(&vcpu, id, cfg.cpus, &supported, &mem, entry)
                .map_err(|e| VmError::Cpu(id, e))?;
            vcpus.push(vcpu);
        }
        if cfg.mem_prefault {
            let p = crate::memory::prefault(&kvm_sys, &vcpus[0], &mem).map_err(VmError::Memory)?;
            log::info!(
                "prefault: {} MiB populated, {} MiB mapped for the guest in {:.1?}",
                p.populated >> 20,
                p.mapped >> 20,
                p.took
            );
        }

        Ok(Vm {
            _kvm: kvm_sys,
            vm,
            vcpus,
            pio: Arc::new(PioBus::new(serial)),
            pci: Arc::new(pci),
            metrics,
            disks,
            passthrough,
            hold,
            _mem: mem,
        })
    }

    /// Runs the vCPUs until the guest resets, shuts down or fails; returns
    /// why. vCPU threads still blocked in KVM_RUN are left behind: the caller
    /// is expected to exit the process.
    pub fn run(self) -> Result<VmExit, VmError> {
        let Vm {
            _kvm,
            vm,
            vcpus,
            pio,
            pci,
            metrics,
            disks,
            mut passthrough,
            hold,
            _mem,
        } = self;
        let (tx, rx) = mpsc::channel::<VmExit>();
        let kick = SIGRTMIN();
        register_signal_handler(kick, noop_signal_handler)
            .map_err(|e| VmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        for sig in [libc::SIGTERM, libc::SIGINT] {
            register_signal_handler(sig, stop_signal_handler)
                .map_err(|e| VmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        }
        let states: Arc<Vec<AtomicU8>> =
            Arc::new((0..vcpus.len()).map(|_| AtomicU8::new(RUNNING)).collect());
        let watches: Arc<Vec<ExitWatch>> =
            Arc::new((0..vcpus.len()).map(|_| ExitWatch::default()).collect());
        let mut handles = Vec::new();
        for (id, mut vcpu) in vcpus.into_iter().enumerate() {
            let tx = tx.clone();
            let pio = pio.clone();
            let pci = pci.clone();
            let states = states.clone();
            let watches = watches.clone();
            let mem = _mem.clone();
            let hold = hold.clone();
            let h = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let slot = hold.register();
                    let exit = vcpu_loop(
                        id,
                        &mut vcpu,
                        (&pio, &pci),
                        (&states[id], &watches[id], &slot),
                        &mem,
                    );
                    drop(slot);
                    crate::trace::thread_exit();
                    let _ = tx.send(exit);
                    // Keep the fd open until the process exits.
                    std::mem::forget(vcpu);
                })
                .map_err(VmError::Thread)?;
            handles.push(h);
        }
        drop(tx);
        // Linux powers off through the ACPI sleep register; booted with
        // acpi=off, its poweroff ends in `cli; hlt` on every CPU,
        // which the in-kernel irqchip never reports. Kick the vCPUs now and
        // then; each one records whether it sat halted with interrupts off.
        let mut quiet_ticks = 0;
        let mut tick = 0u64;
        let (mut stall_ticks, mut stall_reports) = (0u32, 0u32);
        let exit = loop {
            match rx.recv_timeout(HALT_CHECK_INTERVAL) {
                Ok(exit) => break exit,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break VmExit::Error("all vCPU threads ended".into())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(sig) = stop_requested() {
                // Say where the guest is: a run stopped from outside is
                // usually one whose guest stopped making progress.
                STOPPING.store(true, Ordering::Relaxed);
                for _ in 0..2 {
                    for h in &handles {
                        let _ = h.kill(kick);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                for (id, w) in watches.iter().enumerate() {
                    w.report_state(id);
                }
                break VmExit::Signal(sig);
            }
            for (id, w) in watches.iter().enumerate() {
                w.check(id);
            }
            // Once a second: does each VFIO container still mirror its
            // endpoint's domain? (Counted in the exit report.)
            tick += 1;
            if tick.is_multiple_of(5) {
                for p in &mut passthrough {
                    p.check();
                }
            }
            // A device reported a stall: the vCPUs record their registers at
            // the next kicks; say where they are a few times.
            if crate::virtio::block::STALL_SEEN.load(Ordering::Relaxed) && stall_reports < 5 {
                stall_ticks += 1;
                if stall_ticks % 10 == 0 {
                    stall_reports += 1;
                    for (id, w) in watches.iter().enumerate() {
                        w.report_state(id);
                    }
                }
            }
            let snapshot: Vec<u8> = states.iter().map(|s| s.load(Ordering::Acquire)).collect();
            if all_stopped(&snapshot) {
                quiet_ticks += 1;
                if quiet_ticks >= HALT_CHECKS_TO_STOP {
                    break VmExit::Shutdown(
                        "all vCPUs halted with interrupts disabled (poweroff without ACPI)".into(),
                    );
                }
            } else {
                quiet_ticks = 0;
            }
            for h in &handles {
                let _ = h.kill(kick);
            }
        };
        pio.flush();
        crate::trace::dump();
        if let Some(m) = &metrics {
            eprintln!("{}", m.snapshot());
        }
        for d in &disks {
            eprintln!("{d}");
        }
        for p in &passthrough {
            eprintln!("{p}");
        }
        // Other vCPUs may still be inside KVM_RUN: never unmap guest memory
        // or close the VM under them; the process exits next.
        std::mem::forget(vm);
        std::mem::forget(_mem);
        std::mem::forget(_kvm);
        Ok(exit)
    }
}

fn libc_efd_nonblock() -> i32 {
    libc::EFD_NONBLOCK
}

/// vCPU run states as seen at the last kick.
const RUNNING: u8 = 0;
/// Halted with interrupts disabled: only an NMI or INIT could wake it.
const HALTED_IF0: u8 = 1;
/// An AP that never received its startup IPI.
const NOT_STARTED: u8 = 2;

const HALT_CHECK_INTERVAL: Duration = Duration::from_millis(200);
const HALT_CHECKS_TO_STOP: u32 = 2;

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Set when a signal stops the VMM: the vCPUs record their state at the
/// next kick, for the stop report.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The last SIGTERM/SIGINT received (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn stop_signal_handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// The signal that asked the VMM to stop, if any.
fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// True when no vCPU can make progress: every one is halted with interrupts
/// off or was never started, and at least one is halted.
pub fn all_stopped(states: &[u8]) -> bool {
    states.iter().all(|&s| s != RUNNING) && states.contains(&HALTED_IF0)
}

/// Classifies a vCPU interrupted by the kick signal.
fn classify(vcpu: &VcpuFd) -> u8 {
    let Ok(mp) = vcpu.get_mp_state() else {
        return RUNNING;
    };
    match mp.mp_state {
        KVM_MP_STATE_HALTED => match vcpu.get_regs() {
            Ok(r) if r.rflags & (1 << 9) == 0 => HALTED_IF0,
            _ => RUNNING,
        },
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => NOT_STARTED,
        _ => RUNNING,
    }
}

/// How long a vCPU may spend handling one exit before the VMM says so.
const EXIT_STUCK_AFTER: Duration = Duration::from_secs(2);

/// What a vCPU thread is doing outside KVM_RUN, for the stuck-exit report:
/// a device model that blocks a vCPU (a lock, a drain) shows up in the log
/// with the access that led there.
#[derive(Default)]
pub struct ExitWatch {
    /// Microseconds since `EPOCH` when the exit's handling began; 0 while
    /// the vCPU is in the guest.
    since_us: AtomicU64,
    /// Guest address (MMIO) or port of the exit.
    addr: AtomicU64,
    /// Already reported this episode.
    reported: AtomicBool,
    /// Where the guest was when last interrupted (registers, pending
    /// events, local APIC), recorded while a device reports a stall or the
    /// VMM is being stopped by a signal: the report then says whether a
    /// guest that stopped making progress is halted, spinning with
    /// interrupts off, or has an interrupt pending that never got in.
    state: Mutex<String>,
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_us() -> u64 {
    let e = EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl ExitWatch {
    fn begin(&self, addr: u64) {
        self.addr.store(addr, Ordering::Relaxed);
        self.since_us.store(now_us(), Ordering::Release);
    }

    fn end(&self) {
        self.since_us.store(0, Ordering::Release);
        self.reported.store(false, Ordering::Relaxed);
    }

    fn record_state(&self, vcpu: &VcpuFd, mem: &GuestMemoryMmap) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = describe_vcpu(vcpu, mem);
    }

    /// Says where the vCPU was when last interrupted.
    fn report_state(&self, id: usize) {
        log::warn!(
            "vCPU {id}: {}",
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        );
    }

    /// Logs once per episode when the exit has taken too long.
    fn check(&self, id: usize) {
        let since = self.since_us.load(Ordering::Acquire);
        if since == 0 {
            return;
        }
        let took = Duration::from_micros(now_us().saturating_sub(since));
        if took >= EXIT_STUCK_AFTER && !self.reported.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vCPU {id} has been handling an exit at {:#x} for {:.1}s",
                self.addr.load(Ordering::Relaxed),
                took.as_secs_f64()
            );
        }
    }
}

/// Reads `len` bytes at guest virtual address `va` through the guest's
/// 4-level page tables at `cr3` (long mode, no LA57); `None` where a level
/// is not present or the bytes cross into an unmapped page.
pub fn read_guest_virt(mem: &GuestMemoryMmap, cr3: u64, va: u64, len: usize) -> Option<Vec<u8>> {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let translate = |va: u64| -> Option<u64> {
        let mut table = cr3 & ADDR;
        for level in (0..4).rev() {
            let index = (va >> (12 + 9 * level)) & 0x1ff;
            let entry: u64 = mem.read_obj(GuestAddress(table + 8 * index)).ok()?;
            if entry & PRESENT == 0 {
                return None;
            }
            // 1 GiB (level 2) and 2 MiB (level 1) pages.
            if (level == 2 || level == 1) && entry & HUGE != 0 {
                let size = 1u64 << (12 + 9 * level);
                return Some((entry & ADDR & !(size - 1)) | (va & (size - 1)));
            }
            table = entry & ADDR;
        }
        Some(table | (va & 0xfff))
    };
    // One walk per page touched, then the bytes within that page.
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let at = va.wrapping_add(done as u64);
        let n = (0x1000 - (at & 0xfff) as usize).min(len - done);
        let gpa = translate(at)?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(gpa))
            .ok()?;
        done += n;
    }
    Some(out)
}

/// One line on a vCPU's state: registers, control registers, pending
/// events, the local APIC's priority, in-service and pending vectors and
/// timer, and the code bytes at RIP.
pub fn describe_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Ok(m) = vcpu.get_mp_state() {
        let _ = write!(out, "mp_state={}", m.mp_state);
    }
    let regs = vcpu.get_regs().ok();
    let sregs = vcpu.get_sregs().ok();
    if let Some(r) = &regs {
        let _ = write!(
            out,
            " rip={:#x} rsp={:#x} rflags={:#x} (IF={})",
            r.rip,
            r.rsp,
            r.rflags,
            (r.rflags >> 9) & 1
        );
    }
    if let Some(s) = &sregs {
        let _ = write!(
            out,
            " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        );
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        let _ = write!(
            out,
            " irq_injected={} irq_nr={:#x} shadow={} nmi_pending={} nmi_injected={} \
             exc_injected={} exc_nr={}",
            e.interrupt.injected,
            e.interrupt.nr,
            e.interrupt.shadow,
            e.nmi.pending,
            e.nmi.injected,
            e.exception.injected,
            e.exception.nr
        );
        if e.exception.has_error_code != 0 {
            let _ = write!(out, " exc_error={:#x}", e.exception.error_code);
        }
    }
    if let Ok(l) = vcpu.get_lapic() {
        let reg = |off: usize| {
            let b = &l.regs[off..off + 4];
            u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
        };
        // Highest vector set in a 256-bit APIC register array.
        let highest = |base: usize| {
            (0..8)
                .rev()
                .find_map(|i| {
                    let v = reg(base + 0x10 * i);
                    (v != 0).then(|| 32 * i as u32 + 31 - v.leading_zeros())
                })
                .map_or("-".to_string(), |v| format!("{v:#x}"))
        };
        let _ = write!(
            out,
            " apic: tpr={:#x} ppr={:#x} isr={} irr={} lvt_timer={:#x} tmict={:#x} tmcct={:#x}",
            reg(0x80),
            reg(0xa0),
            highest(0x100),
            highest(0x200),
            reg(0x320),
            reg(0x380),
            reg(0x390)
        );
    }
    // The TSC-deadline timer against the TSC: a deadline in the past with
    // the timer vector neither pending nor in service is a lost timer.
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    let entries = [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE].map(|index| kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    });
    if let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&entries) {
        if vcpu.get_msrs(&mut msrs) == Ok(2) {
            let m = msrs.as_slice();
            let _ = write!(out, " tsc={:#x} tsc_deadline={:#x}", m[0].data, m[1].data);
        }
    }
    // Long mode with paging: the instruction bytes at RIP, to tell what
    // the guest is executing without its symbols.
    const EFER_LMA: u64 = 1 << 10;
    if let (Some(r), Some(s)) = (regs, sregs) {
        if s.efer & EFER_LMA != 0 {
            // A page-table root outside guest RAM cannot be the guest's
            // own (on the nested bed: L1's CR3 leaking into L2).
            let root = s.cr3 & 0x000f_ffff_ffff_f000;
            if mem.read_obj::<u64>(GuestAddress(root)).is_err() {
                let _ = write!(out, " cr3_outside_ram");
            }
            if let Some(code) = read_guest_virt(mem, s.cr3, r.rip, 16) {
                let hex: String = code.iter().map(|b| format!("{b:02x}")).collect();
                let _ = write!(out, " code={hex}");
            }
            // The top of the stack: return addresses say how it got there.
            if let Some(stack) = read_guest_virt(mem, s.cr3, r.rsp, 64) {
                let words: Vec<String> = stack
                    .chunks_exact(8)
                    .map(|w| format!("{:x}", u64::from_le_bytes(w.try_into().unwrap())))
                    .collect();
                let _ = write!(out, " stack={}", words.join(","));
            }
        }
    }
    out
}

fn vcpu_loop(
    id: usize,
    vcpu: &mut VcpuFd,
    (pio, pci): (&PioBus, &PciBus),
    (state, watch, slot): (&AtomicU8, &ExitWatch, &VcpuSlot),
    mem: &GuestMemoryMmap,
) -> VmExit {
    loop {
        watch.end();
        slot.checkpoint();
        let r = vcpu.run();
        if !matches!(&r, Err(e) if e.errno() == libc::EINTR) {
            state.store(RUNNING, Ordering::Release);
        }
        match &r {
            Ok(VcpuExit::IoIn(port, _)) | Ok(VcpuExit::IoOut(port, _)) => {
                crate::trace::record(crate::trace::Event::VcpuPio, u64::from(*port));
                watch.begin(u64::from(*port))
            }
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => {
                crate::trace::record(crate::trace::Event::VcpuMmio, *addr);
                watch.begin(*addr)
            }
            _ => {}
        }
        match r {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pci.pio_read(port, data) {
                    pio.read(port, data)
                }
            }
            Ok(VcpuExit::IoOut(port, data)) if pci.pio_write(port, data) => {}
            Ok(VcpuExit::IoOut(port, data)) => match pio.write(port, data) {
                PioAction::None => {}
                PioAction::Reset => return VmExit::Reset(format!("i8042 reset on vCPU {id}")),
                PioAction::AcpiReset => {
                    return VmExit::Reset(format!("ACPI reset register on vCPU {id}"))
                }
                PioAction::AcpiPowerOff => {
                    return VmExit::Shutdown(format!(
                        "ACPI sleep register: S5 power-off on vCPU {id}"
                    ))
                }
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !pci.mmio_read(addr, data) {
                    data.fill(0xff)
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                pci.mmio_write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // Only seen without an in-kernel LAPIC; keep going.
            }
            Ok(VcpuExit::Shutdown) => {
                // Linux resets through ACPI, the i8042 or a system event;
                // a shutdown exit is a guest that faulted beyond repair.
                log::warn!(
                    "vCPU {id} at its triple fault: {}",
                    describe_vcpu(vcpu, mem)
                );
                return VmExit::Reset(format!("triple fault (KVM_EXIT_SHUTDOWN) on vCPU {id}"));
            }
            Ok(VcpuExit::SystemEvent(kind, data)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => {
                        VmExit::Shutdown(format!("system event shutdown on vCPU {id}"))
                    }
                    KVM_SYSTEM_EVENT_RESET => {
                        VmExit::Reset(format!("system event reset on vCPU {id}"))
                    }
                    KVM_SYSTEM_EVENT_CRASH => {
                        VmExit::Error(format!("guest crash event on vCPU {id}"))
                    }
                    _ => {
                        VmExit::Error(format!("unknown system event {kind} {data:?} on vCPU {id}"))
                    }
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExit::Error(format!(
                    "KVM_EXIT_FAIL_ENTRY on vCPU {id}: hardware reason {reason:#x}, cpu {cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                return VmExit::Error(format!("KVM_EXIT_INTERNAL_ERROR on vCPU {id}"))
            }
            Ok(other) => {
                return VmExit::Error(format!("unhandled vCPU {id} exit: {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR => {
                state.store(classify(vcpu), Ordering::Release);
                if crate::virtio::block::STALL_SEEN.load(Ordering::Relaxed)
                    || STOPPING.load(Ordering::Relaxed)
                {
                    watch.record_state(vcpu, mem);
                }
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return VmExit::Error(format!("KVM_RUN on vCPU {id}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_and_absent_ports() {
        let bus = PioBus::new(None);
        assert_eq!(bus.write(0x64, &[0xfe]), PioAction::Reset);
        assert_eq!(bus.write(0x64, &[0xd1]), PioAction::None);
        assert_eq!(bus.write(0x80, &[0xfe]), PioAction::None);
        assert_eq!(bus.write(0x3c0, &[0x80]), PioAction::None);
        assert_eq!(bus.write(0x3c0, &[0x34]), PioAction::AcpiPowerOff);
        assert_eq!(bus.write(0x3c0, &[0x01]), PioAction::AcpiReset);
        let mut b = [0u8; 1];
        bus.read(0x64, &mut b);
        assert_eq!(b, [0x01], "output full, input empty");
        bus.read(0x60, &mut b);
        assert_eq!(b, [0xff]);
        bus.write(0x70, &[0x0d]);
        bus.read(0x71, &mut b);
        assert_eq!(b, [0x80]);
        let mut w = [0u8; 4];
        bus.read(0xcfc, &mut w);
        assert_eq!(w, [0xff; 4]);
    }

    #[test]
    fn serial_output_reaches_writer() {
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(libc_efd_nonblock()).unwrap();
        let serial = Serial::new(
            EventFdTrigger(evt.try_clone().unwrap()),
            Box::new(Shared(buf.clone())) as Box<dyn Write + Send>,
        );
        let bus = PioBus::new(Some(Mutex::new(serial)));
        // Enable the THR-empty interrupt, then send two bytes.
        bus.write(0x3f9, &[0x02]);
        bus.write(0x3f8, b"o");
        bus.write(0x3f8, b"k");
        assert_eq!(&*buf.lock().unwrap(), b"ok");
        assert!(evt.read().unwrap() >= 1, "interrupt raised");
        let mut lsr = [0u8];
        bus.read(0x3fd, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn guest_virtual_reads_walk_4k_and_2m_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000; PD[0] -> PT at
        // 0x4000 (4 KiB pages), PD[1] a 2 MiB page at 4 MiB.
        let va_base = 0xffff_ffff_8000_0000u64;
        let pml4 = (va_base >> 39) & 0x1ff;
        let pdpt = (va_base >> 30) & 0x1ff;
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + 8 * pml4))
            .unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000 + 8 * pdpt))
            .unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x40_0083u64, GuestAddress(0x3008)).unwrap();
        // PT[5] -> page at 0x7000.
        mem.write_obj(0x7003u64, GuestAddress(0x4000 + 8 * 5))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x7ffe)).unwrap();
        mem.write_slice(b"huge", GuestAddress(0x40_1234)).unwrap();
        let cr3 = 0x1000;
        // 0x5ffe..0x6000 maps to 0x7ffe..; the next page (PT[6]) is absent.
        assert_eq!(
            read_guest_virt(&mem, cr3, va_base + 0x5ffe, 2).as_deref(),
            Some(&b"he"[..])
        );
        assert_eq!(read_guest_virt(&mem, cr3, va_base + 0x5ffe, 5), None);
        assert_eq!(
            read_guest_virt(&mem, cr3, va_base + 0x20_1234, 4).as_deref(),
            Some(&b"huge"[..])
        );
        assert_eq!(read_guest_virt(&mem, cr3, 0x1000, 1), None);
    }

    #[test]
    fn halt_detection() {
        assert!(all_stopped(&[HALTED_IF0]));
        assert!(all_stopped(&[HALTED_IF0, NOT_STARTED]));
        assert!(all_stopped(&[HALTED_IF0, HALTED_IF0]));
        assert!(!all_stopped(&[RUNNING]));
        assert!(!all_stopped(&[NOT_STARTED, NOT_STARTED]));
        assert!(!all_stopped(&[HALTED_IF0, RUNNING]));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExit::Reset("x".into()).exit_code(), 0);
        assert_eq!(VmExit::Shutdown("x".into()).exit_code(), 0);
        assert_eq!(VmExit::Error("x".into()).exit_code(), 1);
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 143);
    }
}
