//! Intel MultiProcessor Specification 1.4 table: tells a guest without ACPI
//! about its CPUs, the IOAPIC and the ISA interrupt wiring, so that Linux
//! brings up the application processors and uses the IOAPIC.

/// Where the floating pointer and the configuration table go (BIOS area,
/// which Linux scans for "_MP_").
pub const MPTABLE_START: u64 = 0xf_0000;
/// In-kernel IOAPIC and LAPIC addresses.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, for
/// placement at guest address `base`.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id); // LAPIC ID
        entries.push(0x14); // LAPIC version
        entries.push(0x01 | if id == 0 { 0x02 } else { 0 }); // enabled, BSP
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 0x01]); // IOAPIC, enabled
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, bus-default polarity/trigger, ISA irq -> pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of all.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::new();
    let len = (44 + entries.len()) as u16;
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"VMM         ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn layout_and_checksums() {
        for cpus in [1u8, 2, 64] {
            let t = build(cpus, MPTABLE_START);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 16 + 2);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (2 + 16 + 2));
            // The BSP is flagged, APs are not.
            assert_eq!(cfg[44 + 3], 3);
            if cpus > 1 {
                assert_eq!(cfg[44 + 20 + 1], 1);
                assert_eq!(cfg[44 + 20 + 3], 1);
            }
            assert!(MPTABLE_START + t.len() as u64 <= 0x10_0000);
        }
    }
}
