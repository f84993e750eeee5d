//! ACPI tables (hardware-reduced): RSDP -> XSDT -> FADT (-> DSDT), MADT.
//! The DSDT holds `_S5_`, COM1, the CMOS RTC and the PCI0 host bridge.
//!
//! Built with the `acpi_tables` crate; only the MADT interrupt source
//! overrides, which the crate has no type for, are encoded here.
//!
//! Power-off and reset go through one I/O port, [`ACPI_SLEEP_PORT`]: the
//! FADT names it as the sleep control, sleep status and reset register, and
//! the DSDT's `_S5_` package gives the S5 sleep type Linux writes there.

use acpi_tables::aml::{
    AddressSpace as AmlAddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt,
    Memory32Fixed, Name, Package, ResourceTemplate, Zero, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::mptable::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::pci::{Bdf, BAR_WINDOW_END, BAR_WINDOW_START, ECAM_BASE, ECAM_SIZE};

/// Where the RSDP goes: in the BIOS area Linux scans (0xe0000..0xfffff),
/// below the MP table at 0xf0000. The other tables follow it.
pub const RSDP_START: u64 = 0xe_0000;
/// End (exclusive) of the room for the tables.
pub const ACPI_END: u64 = crate::mptable::MPTABLE_START;

/// I/O port of the sleep control/status and reset registers.
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// Sleep type for S5 (soft off), as in the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register: SLP_EN bit and SLP_TYP field (bits 2..4).
pub const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Value written to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;

const OEM_ID: [u8; 6] = *b"RUSTVM";
const OEM_REVISION: u32 = 1;

/// What a write to the sleep/reset port asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepPortAction {
    None,
    PowerOff,
    Reset,
}

/// Decodes a byte written to [`ACPI_SLEEP_PORT`].
pub fn sleep_port_write(value: u8) -> SleepPortAction {
    if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
        SleepPortAction::PowerOff
    } else if value == ACPI_RESET_VALUE {
        SleepPortAction::Reset
    } else {
        // E.g. clearing WAK_STS (0x80) in the status register.
        SleepPortAction::None
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

fn align8(a: u64) -> u64 {
    (a + 7) & !7
}

/// COM1 and its interrupt, as an ACPI device: hardware-reduced Linux has no
/// legacy PIC and maps no ISA IRQ unless a device asks for it.
fn com1() -> Vec<u8> {
    let irq = Interrupt::new(true, true, false, false, 4);
    let io = IO::new(0x3f8, 0x3f8, 0, 8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = EISAName::new("PNP0501");
    bytes(&Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &Zero {}),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The CMOS RTC without an alarm interrupt (the emulated one raises none);
/// without it Linux's rtc_cmos wants the legacy IRQ 8 and fails.
fn rtc() -> Vec<u8> {
    let io = IO::new(0x70, 0x70, 1, 2);
    let crs = ResourceTemplate::new(vec![&io]);
    let hid = EISAName::new("PNP0B00");
    bytes(&Device::new(
        "_SB_.RTC_".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The PCI host bridge: bus 0, the 0xcf8 config ports, the I/O space
/// outside them and the 32-bit BAR window (below ECAM, which sits below the
/// IOAPIC).
fn pci0() -> Vec<u8> {
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let bus = AmlAddressSpace::new_bus_number(0u16, 0u16);
    let cfg = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AmlAddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = AmlAddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        BAR_WINDOW_START as u32,
        (BAR_WINDOW_END - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg, &io_lo, &io_hi, &mmio]);
    bytes(&Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_CID".into(), &cid),
            &Name::new("_SEG".into(), &Zero {}),
            &Name::new("_UID".into(), &Zero {}),
            &Name::new("_BBN".into(), &Zero {}),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// A motherboard resource reserving ECAM, so that Linux accepts the MCFG
/// region ("reserved as ACPI motherboard resource").
fn mbrd() -> Vec<u8> {
    let hid = EISAName::new("PNP0C02");
    let ecam = Memory32Fixed::new(true, ECAM_BASE as u32, ECAM_SIZE as u32);
    let crs = ResourceTemplate::new(vec![&ecam]);
    bytes(&Device::new(
        "_SB_.MBRD".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &Zero {}),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// MCFG: ECAM for segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, *b"VMMMCFG ", OEM_REVISION);
    m.add_ecam(ECAM_BASE, 0, 0, 0);
    bytes(&m)
}

/// Where the virtio-iommu sits and which PCI functions it translates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuTopology {
    /// The virtio-iommu-pci function.
    pub iommu: Bdf,
    /// Endpoints behind it (`iommu=on` disks); endpoint ID = BDF.
    pub endpoints: Vec<Bdf>,
}

fn viot_dev(b: Bdf) -> PciDevice {
    PciDevice::new(0, b.bus, b.dev, b.func)
}

/// VIOT: one virtio-iommu-pci node and one single-function PCI range per
/// endpoint (endpoint ID = BDF).
fn viot(t: &IommuTopology) -> Vec<u8> {
    let mut v = VIOT::new(OEM_ID, *b"VMMVIOT ", OEM_REVISION);
    let h = v.add_virtio_pci_iommu(VirtIoPciIommu::new(viot_dev(t.iommu)));
    for &ep in &t.endpoints {
        v.add_pci_range(PciRange::new(viot_dev(ep), viot_dev(ep), &h));
    }
    bytes(&v)
}

fn dsdt() -> Vec<u8> {
    let mut aml = Vec::new();
    // Name (_S5_, Package () { 5 }): sleep type A = 5, B = 0.
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut aml);
    aml.extend_from_slice(&com1());
    aml.extend_from_slice(&rtc());
    aml.extend_from_slice(&pci0());
    aml.extend_from_slice(&mbrd());
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMMDSDT ", OEM_REVISION);
    sdt.append_slice(&aml);
    sdt.as_slice().to_vec()
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"VMMFACP ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::Unspecified);
    b.sleep_control_reg = io_gas(ACPI_SLEEP_PORT);
    b.sleep_status_reg = io_gas(ACPI_SLEEP_PORT);
    b.reset_reg = io_gas(ACPI_SLEEP_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"RUSTVMM\0").into();
    bytes(&b.finalize())
}

/// MADT interrupt source override (type 2), which `acpi_tables` lacks.
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = 2;
    e[1] = 10;
    e[2] = 0; // ISA bus
    e[3] = irq;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"VMMAPIC ",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // Same IOAPIC ID as in the MP table.
    m.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    let mut t = bytes(&m);
    // Hardware-reduced Linux sets up no legacy PIC and no ISA identity
    // mappings; name the serial IRQ explicitly (edge, active high).
    t.extend_from_slice(&interrupt_source_override(4, 4, 0));
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// The tables, laid out for `base` (the RSDP address): one blob to copy
/// to guest memory at `base`. A VIOT is added when there is an IOMMU.
pub fn build(cpus: u8, base: u64, iommu: Option<&IommuTopology>) -> Vec<u8> {
    let rsdp_len = Rsdp::len() as u64;
    let dsdt = dsdt();
    let dsdt_addr = align8(base + rsdp_len);
    let fadt = fadt(dsdt_addr);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let madt = madt(cpus);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let mcfg = mcfg();
    let mcfg_addr = align8(madt_addr + madt.len() as u64);
    let viot = iommu.map(viot).unwrap_or_default();
    let viot_addr = align8(mcfg_addr + mcfg.len() as u64);
    let xsdt_addr = align8(viot_addr + viot.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    if !viot.is_empty() {
        xsdt.add_entry(viot_addr);
    }
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let mut blob = Vec::new();
    for (addr, t) in [
        (base, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (viot_addr, &viot),
        (xsdt_addr, &xsdt),
    ] {
        blob.resize((addr - base) as usize, 0);
        blob.extend_from_slice(t);
    }
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    /// The table at guest address `addr`, checked: signature, length in
    /// range, checksum zero.
    fn table<'a>(blob: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - RSDP_START) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        assert!(len >= 36 && off + len <= blob.len());
        let t = &blob[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_chain_and_checksums() {
        for cpus in [1u8, 2, 64] {
            let blob = build(cpus, RSDP_START, None);
            assert!(RSDP_START + blob.len() as u64 <= ACPI_END);
            // RSDP v2: both checksums, XSDT pointer.
            assert_eq!(&blob[..8], b"RSD PTR ");
            assert_eq!(blob[15], 2);
            assert_eq!(sum(&blob[..20]), 0);
            assert_eq!(u32_at(&blob, 20), 36);
            assert_eq!(sum(&blob[..36]), 0);
            let xsdt = table(&blob, u64_at(&blob, 24), b"XSDT");
            assert_eq!(xsdt.len(), 36 + 3 * 8);
            let fadt = table(&blob, u64_at(xsdt, 36), b"FACP");
            assert_eq!(fadt.len(), 276);
            let madt = table(&blob, u64_at(xsdt, 44), b"APIC");

            // FADT: hardware-reduced, X_DSDT, sleep registers on the port.
            let flags = u32_at(fadt, 112);
            assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
            assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
            let dsdt = table(&blob, u64_at(fadt, 140), b"DSDT");
            for gas_off in [116usize, 244, 256] {
                // reset, sleep control, sleep status
                assert_eq!(fadt[gas_off], 1, "system I/O");
                assert_eq!(fadt[gas_off + 1], 8);
                assert_eq!(u64_at(fadt, gas_off + 4), u64::from(ACPI_SLEEP_PORT));
            }
            assert_eq!(fadt[128], ACPI_RESET_VALUE);

            // DSDT: Name (_S5_, Package (1) { 5 }).
            assert_eq!(
                &dsdt[36..46],
                &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05]
            );
            // Then the COM1 and RTC devices (DeviceOp, PkgLength, name).
            let com1 = com1();
            assert_eq!(&dsdt[46..46 + com1.len()], &com1[..]);
            assert_eq!(&com1[..2], &[0x5b, 0x82]);
            assert!(com1.windows(4).any(|w| w == b"COM1"));
            let rtc = rtc();
            assert_eq!(
                &dsdt[46 + com1.len()..46 + com1.len() + rtc.len()],
                &rtc[..]
            );
            let pci0 = pci0();
            let rest = &dsdt[46 + com1.len() + rtc.len()..];
            assert_eq!(&rest[..pci0.len()], &pci0[..]);
            assert_eq!(&rest[pci0.len()..], &mbrd()[..]);
            // MCFG: one ECAM entry for bus 0.
            let mcfg = table(&blob, u64_at(xsdt, 52), b"MCFG");
            assert_eq!(mcfg.len(), 44 + 16);
            assert_eq!(u64_at(mcfg, 44), ECAM_BASE);
            assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0..0");

            // MADT: LAPIC address, one LAPIC per CPU, IOAPIC, override.
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
            assert_eq!(madt.len(), 44 + 8 * cpus as usize + 12 + 10);
            for id in 0..cpus as usize {
                let e = &madt[44 + 8 * id..52 + 8 * id];
                assert_eq!(&e[..4], &[0, 8, id as u8, id as u8]);
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let io = &madt[44 + 8 * cpus as usize..];
            assert_eq!(&io[..3], &[1, 12, cpus]);
            assert_eq!(u32_at(io, 4), IOAPIC_ADDR);
            assert_eq!(u32_at(io, 8), 0, "GSI base");
            assert_eq!(&io[12..22], &interrupt_source_override(4, 4, 0));
            assert_eq!(&io[12..16], &[2, 10, 0, 4]);
        }
    }

    #[test]
    fn viot_with_iommu() {
        let topo = IommuTopology {
            iommu: Bdf::new(1),
            endpoints: vec![Bdf::new(2), Bdf::new(4)],
        };
        let blob = build(2, RSDP_START, Some(&topo));
        assert!(RSDP_START + blob.len() as u64 <= ACPI_END);
        let xsdt = table(&blob, u64_at(&blob, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 4 * 8);
        let viot = table(&blob, u64_at(xsdt, 60), b"VIOT");
        // Header: node count 3, node offset 48; then the IOMMU node.
        assert_eq!(&viot[36..40], &[3, 0, 48, 0]);
        assert_eq!(viot.len(), 48 + 16 + 2 * 24);
        let iommu = &viot[48..64];
        assert_eq!(&iommu[..4], &[3, 0, 16, 0]);
        assert_eq!(&iommu[4..8], &[0, 0, 0x08, 0], "segment 0, BDF 00:01.0");
        for (i, bdf) in [0x10u16, 0x20].into_iter().enumerate() {
            let r = &viot[64 + 24 * i..88 + 24 * i];
            assert_eq!(&r[..4], &[1, 0, 24, 0]);
            assert_eq!(u32_at(r, 4), u32::from(bdf), "endpoint start = BDF");
            assert_eq!(&r[8..12], &[0, 0, 0, 0], "segments");
            assert_eq!(u16::from_le_bytes([r[12], r[13]]), bdf);
            assert_eq!(u16::from_le_bytes([r[14], r[15]]), bdf);
            assert_eq!(u16::from_le_bytes([r[16], r[17]]), 48, "output node");
        }
    }

    #[test]
    fn sleep_port_decoding() {
        let s5 = SLP_EN | (S5_SLEEP_TYPE << SLP_TYP_SHIFT);
        assert_eq!(s5, 0x34);
        assert_eq!(sleep_port_write(s5), SleepPortAction::PowerOff);
        assert_eq!(sleep_port_write(ACPI_RESET_VALUE), SleepPortAction::Reset);
        // Clearing WAK_STS, or S5 type without SLP_EN, does nothing.
        assert_eq!(sleep_port_write(0x80), SleepPortAction::None);
        assert_eq!(sleep_port_write(S5_SLEEP_TYPE << 2), SleepPortAction::None);
        // Another sleep state is not a power-off.
        assert_eq!(sleep_port_write(SLP_EN | (3 << 2)), SleepPortAction::None);
    }
}
