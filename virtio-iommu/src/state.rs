//! Snapshot and restore of the device state (serde).
//!
//! Restore treats the state as untrusted input: every field is validated
//! against the device's configuration and limits before anything changes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{IommuConfig, ReservedRegion};
use crate::mapping::{MapFlags, Mapping, MappingTree};
use crate::protocol::features::VIRTIO_IOMMU_F_MMIO;

/// Version of the snapshot format.
pub const STATE_VERSION: u32 = 1;

/// Attachment of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Endpoint ID.
    pub id: u32,
    /// Domain it is attached to.
    pub domain: Option<u32>,
}

/// One domain and its mappings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// Domain ID.
    pub id: u32,
    /// Whether it is a bypass domain.
    pub bypass: bool,
    /// Mappings, in IOVA order.
    pub mappings: Vec<Mapping>,
}

/// Everything the guest has configured in the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The device configuration the state was taken with.
    pub config: IommuConfig,
    /// Current value of the `bypass` config byte.
    pub bypass: bool,
    /// Endpoints and their attachments.
    pub endpoints: Vec<EndpointState>,
    /// Domains and their mappings.
    pub domains: Vec<DomainState>,
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// A request is waiting for in-flight DMA; retry when it completes.
    #[error("an invalidation is still draining")]
    Busy,
    /// The device already has domains.
    #[error("restore needs a freshly reset device")]
    NotFresh,
    /// The snapshot format is unknown.
    #[error("unsupported state version {0}")]
    Version(u32),
    /// The state was taken with a different guest-visible configuration.
    #[error("state configuration differs from the device's: {0}")]
    ConfigMismatch(&'static str),
    /// Features outside what the device offers.
    #[error("acked features {0:#x} not offered")]
    Features(u64),
    /// An endpoint of the state is not registered on this device.
    #[error("endpoint {0:#x} unknown to this device")]
    UnknownEndpoint(u32),
    /// An endpoint appears twice.
    #[error("endpoint {0:#x} listed twice")]
    DuplicateEndpoint(u32),
    /// A domain is invalid.
    #[error("domain {0}: {1}")]
    Domain(u32, &'static str),
    /// A mapping is invalid.
    #[error("domain {domain} mapping {iova:#x}: {why}")]
    Mapping {
        /// Domain of the mapping.
        domain: u32,
        /// First IOVA of the mapping.
        iova: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A limit would be exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// An external mapper refused a restored mapping.
    #[error("external mapper failed for endpoint {0:#x}")]
    Mapper(u32),
}

/// Checks `state` against the device's `config`, `offered` features and
/// registered `endpoints` (with their extra reserved regions). Returns the
/// domains as validated trees.
pub(crate) fn validate(
    state: &IommuState,
    config: &IommuConfig,
    offered: u64,
    endpoints: &BTreeMap<u32, Vec<ReservedRegion>>,
) -> Result<BTreeMap<u32, (bool, MappingTree)>, StateError> {
    if state.version != STATE_VERSION {
        return Err(StateError::Version(state.version));
    }
    let c = &state.config;
    let mismatch = |what| Err(StateError::ConfigMismatch(what));
    if c.page_size_mask != config.page_size_mask {
        return mismatch("page_size_mask");
    }
    if c.address_width_bits != config.address_width_bits {
        return mismatch("address width");
    }
    if (c.domain_start, c.domain_end) != (config.domain_start, config.domain_end) {
        return mismatch("domain range");
    }
    if c.probe_size != config.probe_size {
        return mismatch("probe size");
    }
    if c.reserved_regions != config.reserved_regions {
        return mismatch("reserved regions");
    }
    if state.acked_features & !offered != 0 {
        return Err(StateError::Features(state.acked_features & !offered));
    }
    let limits = &config.limits;
    if state.domains.len() > limits.max_domains {
        return Err(StateError::Limit("domains"));
    }
    let mut seen = BTreeSet::new();
    for e in &state.endpoints {
        if !endpoints.contains_key(&e.id) {
            return Err(StateError::UnknownEndpoint(e.id));
        }
        if !seen.insert(e.id) {
            return Err(StateError::DuplicateEndpoint(e.id));
        }
    }
    let granule = config.granule() - 1;
    let mmio_ok = state.acked_features & (1 << VIRTIO_IOMMU_F_MMIO) != 0;
    let mut total = 0usize;
    let mut out = BTreeMap::new();
    for d in &state.domains {
        if !(config.domain_start..=config.domain_end).contains(&d.id) {
            return Err(StateError::Domain(d.id, "outside the domain range"));
        }
        let users: Vec<u32> = state
            .endpoints
            .iter()
            .filter(|e| e.domain == Some(d.id))
            .map(|e| e.id)
            .collect();
        if users.is_empty() {
            return Err(StateError::Domain(d.id, "no endpoint attached"));
        }
        if d.bypass && !d.mappings.is_empty() {
            return Err(StateError::Domain(d.id, "bypass domain with mappings"));
        }
        if d.mappings.len() > limits.max_mappings_per_domain {
            return Err(StateError::Limit("mappings per domain"));
        }
        total += d.mappings.len();
        if total > limits.max_mappings_total {
            return Err(StateError::Limit("mappings"));
        }
        let mut tree = MappingTree::new();
        for m in &d.mappings {
            let bad = |why| StateError::Mapping {
                domain: d.id,
                iova: m.iova,
                why,
            };
            if m.iova_end < m.iova {
                return Err(bad("empty range"));
            }
            if m.iova & granule != 0
                || m.gpa & granule != 0
                || m.iova_end.wrapping_add(1) & granule != 0
            {
                return Err(bad("not aligned to the granule"));
            }
            if m.iova_end > config.input_end() || m.gpa.checked_add(m.iova_end - m.iova).is_none() {
                return Err(bad("out of range"));
            }
            if MapFlags::from_bits(m.flags.bits()).is_none()
                || (m.flags.contains(MapFlags::MMIO) && !mmio_ok)
            {
                return Err(bad("invalid flags"));
            }
            let reserved = users.iter().any(|u| {
                config
                    .reserved_regions
                    .iter()
                    .chain(endpoints[u].iter())
                    .any(|r| r.overlaps(m.iova, m.iova_end))
            });
            if reserved {
                return Err(bad("overlaps a reserved region"));
            }
            tree.insert(*m)
                .map_err(|_| bad("overlaps another mapping"))?;
        }
        if out.insert(d.id, (d.bypass, tree)).is_some() {
            return Err(StateError::Domain(d.id, "listed twice"));
        }
    }
    for e in &state.endpoints {
        if let Some(d) = e.domain {
            if !out.contains_key(&d) {
                return Err(StateError::Domain(d, "attached but not listed"));
            }
        }
    }
    Ok(out)
}
