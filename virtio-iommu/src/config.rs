//! Device configuration chosen by the VMM: page sizes, ranges, reserved
//! regions, limits on guest-growable state and the revocation grace period.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{VIRTIO_IOMMU_RESV_MEM_T_MSI, VIRTIO_IOMMU_RESV_MEM_T_RESERVED};

/// Start of the x86 MSI doorbell window.
pub const X86_MSI_START: u64 = 0xfee0_0000;
/// Last address of the x86 MSI doorbell window.
pub const X86_MSI_END: u64 = 0xfeef_ffff;

/// Kind of a reserved IOVA region reported by PROBE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservedKind {
    /// The range cannot be mapped (`RESV_MEM_T_RESERVED`).
    Reserved,
    /// The range is an MSI doorbell (`RESV_MEM_T_MSI`).
    Msi,
}

impl ReservedKind {
    /// The RESV_MEM subtype byte.
    pub fn subtype(self) -> u8 {
        match self {
            ReservedKind::Reserved => VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
            ReservedKind::Msi => VIRTIO_IOMMU_RESV_MEM_T_MSI,
        }
    }
}

/// A reserved IOVA region, inclusive on both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedRegion {
    /// First reserved IOVA.
    pub start: u64,
    /// Last reserved IOVA (inclusive).
    pub end: u64,
    /// What the region is.
    pub kind: ReservedKind,
}

impl ReservedRegion {
    /// The x86 MSI doorbell region, `0xfee00000-0xfeefffff`.
    pub fn x86_msi() -> Self {
        ReservedRegion {
            start: X86_MSI_START,
            end: X86_MSI_END,
            kind: ReservedKind::Msi,
        }
    }

    /// Whether `[start, end]` overlaps this region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start <= self.end && self.start <= end
    }
}

/// Bounds on everything a guest can make the device allocate.
///
/// Requests that would exceed a limit fail with `S_NOMEM`; nothing grows
/// without bound on guest input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum number of live domains.
    pub max_domains: usize,
    /// Maximum number of endpoints the VMM may register.
    pub max_endpoints: usize,
    /// Maximum number of mappings in one domain.
    pub max_mappings_per_domain: usize,
    /// Maximum number of mappings over all domains.
    pub max_mappings_total: usize,
    /// Maximum number of pins one endpoint may hold at once.
    pub max_pins_per_endpoint: usize,
    /// Maximum number of fault records queued for the event queue.
    pub max_pending_faults: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_endpoints: 4096,
            max_mappings_per_domain: 1 << 18,
            max_mappings_total: 1 << 18,
            max_pins_per_endpoint: 1 << 14,
            max_pending_faults: 256,
        }
    }
}

/// Configuration of a virtio-iommu device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuConfig {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: u64,
    /// Width of the input (IOVA) address space in bits, 1..=64.
    pub address_width_bits: u8,
    /// First valid domain ID.
    pub domain_start: u32,
    /// Last valid domain ID (inclusive).
    pub domain_end: u32,
    /// Size of the PROBE properties buffer, in bytes.
    pub probe_size: u32,
    /// Initial value of the `bypass` config byte (and its value after a
    /// system reset).
    pub bypass: bool,
    /// Offer `VIRTIO_IOMMU_F_MMIO`.
    pub offer_mmio: bool,
    /// Offer `VIRTIO_IOMMU_F_PROBE`.
    pub offer_probe: bool,
    /// Reserved regions reported for every endpoint and refused by MAP.
    pub reserved_regions: Vec<ReservedRegion>,
    /// Limits on guest-growable state.
    pub limits: Limits,
    /// How long an invalidation waits for in-flight DMA before asking the
    /// pin holders to revoke it.
    #[serde(with = "duration_micros")]
    pub revoke_grace: Duration,
    /// How long after the revocation grace pins may still hold an
    /// invalidation before the VMM is asked to fence the guest pages they
    /// cover ([`crate::fence`]; `VirtioIommu::fences_due`). `None`
    /// (default): never; the invalidation waits for the pins however long
    /// the host's I/O takes.
    #[serde(default, with = "opt_duration_micros")]
    pub fence_after: Option<Duration>,
    /// Whether invalidations wait for in-flight DMA (default true).
    ///
    /// `false` is an **unsafe control mode**: UNMAP, DETACH, ATTACH-move,
    /// bypass 1 -> 0 and reset complete without waiting for pins, and
    /// leased queue areas are never revoked, which is how Cloud Hypervisor,
    /// QEMU and crosvm behave. It exists to measure what draining costs and
    /// to show that a test can see the difference; a device in this mode
    /// can write guest memory after the guest took it back.
    #[serde(default = "strict_default")]
    pub drain: bool,
}

fn strict_default() -> bool {
    true
}

impl Default for IommuConfig {
    fn default() -> Self {
        IommuConfig {
            page_size_mask: 0x1000,
            address_width_bits: 64,
            domain_start: 0,
            domain_end: 0xffff,
            probe_size: 512,
            bypass: false,
            offer_mmio: true,
            offer_probe: true,
            reserved_regions: if cfg!(target_arch = "x86_64") {
                vec![ReservedRegion::x86_msi()]
            } else {
                Vec::new()
            },
            limits: Limits::default(),
            revoke_grace: Duration::from_millis(100),
            fence_after: None,
            drain: true,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `page_size_mask` has no bit set.
    #[error("page_size_mask must have at least one bit set")]
    EmptyPageSizeMask,
    /// `address_width_bits` is 0 or above 64.
    #[error("address width {0} is not within 1..=64")]
    AddressWidth(u8),
    /// The domain range is empty.
    #[error("domain range {0}..={1} is empty")]
    DomainRange(u32, u32),
    /// The probe buffer cannot hold a single RESV_MEM property.
    #[error("probe_size {0} is smaller than one RESV_MEM property (24 bytes) or above 64 KiB")]
    ProbeSize(u32),
    /// A reserved region is empty or two of them overlap.
    #[error("reserved region {start:#x}-{end:#x} is empty or overlaps another")]
    ReservedRegion {
        /// First address of the offending region.
        start: u64,
        /// Last address of the offending region.
        end: u64,
    },
    /// More than one MSI region.
    #[error("at most one MSI reserved region may be reported")]
    TwoMsiRegions,
}

/// Largest probe buffer accepted: PROBE writes at most this many bytes.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

impl IommuConfig {
    /// The mapping granule in bytes (lowest set bit of `page_size_mask`).
    pub fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros()
    }

    /// The last translatable IOVA.
    pub fn input_end(&self) -> u64 {
        if self.address_width_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.address_width_bits) - 1
        }
    }

    /// Checks the configuration for internal consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageSizeMask);
        }
        if self.address_width_bits == 0 || self.address_width_bits > 64 {
            return Err(ConfigError::AddressWidth(self.address_width_bits));
        }
        if self.domain_start > self.domain_end {
            return Err(ConfigError::DomainRange(self.domain_start, self.domain_end));
        }
        if !(24..=MAX_PROBE_SIZE).contains(&self.probe_size) {
            return Err(ConfigError::ProbeSize(self.probe_size));
        }
        validate_regions(&self.reserved_regions)
    }
}

/// Checks that regions are non-empty, pairwise disjoint, with at most one MSI region.
pub(crate) fn validate_regions(regions: &[ReservedRegion]) -> Result<(), ConfigError> {
    for (i, r) in regions.iter().enumerate() {
        let bad = ConfigError::ReservedRegion {
            start: r.start,
            end: r.end,
        };
        if r.start > r.end {
            return Err(bad);
        }
        if regions[..i].iter().any(|o| o.overlaps(r.start, r.end)) {
            return Err(bad);
        }
    }
    if regions
        .iter()
        .filter(|r| r.kind == ReservedKind::Msi)
        .count()
        > 1
    {
        return Err(ConfigError::TwoMsiRegions);
    }
    Ok(())
}

mod duration_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

mod opt_duration_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_reports_x86_msi() {
        let c = IommuConfig::default();
        c.validate().unwrap();
        assert_eq!(c.granule(), 4096);
        assert_eq!(c.input_end(), u64::MAX);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(c.reserved_regions, vec![ReservedRegion::x86_msi()]);
    }

    #[test]
    fn address_width_gives_input_range() {
        let c = IommuConfig {
            address_width_bits: 48,
            ..Default::default()
        };
        assert_eq!(c.input_end(), (1 << 48) - 1);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = [
            IommuConfig {
                page_size_mask: 0,
                ..Default::default()
            },
            IommuConfig {
                address_width_bits: 65,
                ..Default::default()
            },
            IommuConfig {
                domain_start: 5,
                domain_end: 4,
                ..Default::default()
            },
            IommuConfig {
                probe_size: 8,
                ..Default::default()
            },
            IommuConfig {
                reserved_regions: vec![ReservedRegion::x86_msi(), ReservedRegion::x86_msi()],
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
