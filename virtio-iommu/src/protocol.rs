//! Wire formats of the virtio-iommu device (virtio 1.3, "IOMMU device").
//!
//! Every type here is a plain `#[repr(C)]` structure with little-endian
//! fields that implements [`ByteValued`], so it can be read from and written
//! to guest memory directly. Nothing in this module interprets the values:
//! validation lives with the request engine.

use vm_memory::endian::{Le16, Le32, Le64};
use vm_memory::ByteValued;

/// Virtio device ID of the IOMMU device.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Index of the request queue.
pub const REQUEST_QUEUE: usize = 0;
/// Index of the event (fault report) queue.
pub const EVENT_QUEUE: usize = 1;
/// Number of virtqueues of the device.
pub const NUM_QUEUES: usize = 2;

/// Feature bits of the device (bit numbers).
pub mod features {
    /// `input_range` is valid.
    pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
    /// `domain_range` is valid.
    pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
    /// MAP and UNMAP requests are available.
    pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
    /// Deprecated: unattached endpoints bypass translation. Never offered.
    pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
    /// PROBE requests are available.
    pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
    /// The MAP_F_MMIO flag is available.
    pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
    /// The `bypass` config field and ATTACH_F_BYPASS are available.
    pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;
    /// Virtio 1.0 compliance (generic feature bit).
    pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
}

/// Request types.
pub mod req_type {
    /// Attach an endpoint to a domain.
    pub const ATTACH: u8 = 1;
    /// Detach an endpoint from a domain.
    pub const DETACH: u8 = 2;
    /// Map an IOVA range.
    pub const MAP: u8 = 3;
    /// Unmap an IOVA range.
    pub const UNMAP: u8 = 4;
    /// Probe the properties of an endpoint.
    pub const PROBE: u8 = 5;
}

/// Request status codes, written into [`ReqTail::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Status {
    /// All good.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// All status codes, in numeric order.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];

    /// Short name as used in the specification (`S_OK`, `S_INVAL`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "S_OK",
            Status::IoErr => "S_IOERR",
            Status::Unsupp => "S_UNSUPP",
            Status::DevErr => "S_DEVERR",
            Status::Inval => "S_INVAL",
            Status::Range => "S_RANGE",
            Status::NoEnt => "S_NOENT",
            Status::Fault => "S_FAULT",
            Status::NoMem => "S_NOMEM",
        }
    }

    /// Decodes a status byte.
    pub fn from_u8(v: u8) -> Option<Status> {
        Status::ALL.get(usize::from(v)).copied()
    }
}

/// MAP flag: read access is allowed.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: write access is allowed.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the range is memory-mapped I/O (needs `F_MMIO`).
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// ATTACH flag: the domain is a bypass domain (needs `F_BYPASS_CONFIG`).
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// PROBE property type: end of the list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// PROBE property type: reserved memory region.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// Mask of the `type` bits in a probe property header (the top 4 bits are reserved).
pub const VIRTIO_IOMMU_PROBE_T_MASK: u16 = 0xfff;

/// RESV_MEM subtype: the range cannot be mapped.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: the range is an MSI doorbell.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: unknown or internal error.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: the address is not mapped or the access is not permitted.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;

/// Fault flag: the faulting access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the faulting access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// A 64-bit inclusive range (`struct virtio_iommu_range_64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Range64 {
    /// First address.
    pub start: Le64,
    /// Last address (inclusive).
    pub end: Le64,
}

/// A 32-bit inclusive range (`struct virtio_iommu_range_32`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Range32 {
    /// First value.
    pub start: Le32,
    /// Last value (inclusive).
    pub end: Le32,
}

/// Device configuration layout (`struct virtio_iommu_config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct VirtioIommuConfig {
    /// Bitmask of supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: Le64,
    /// Range of IOVAs the device translates.
    pub input_range: Range64,
    /// Range of valid domain IDs.
    pub domain_range: Range32,
    /// Size of the `properties` buffer of a PROBE request.
    pub probe_size: Le32,
    /// 1 when unattached endpoints bypass translation.
    pub bypass: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

/// Offset of the `bypass` byte in [`VirtioIommuConfig`].
pub const CONFIG_BYPASS_OFFSET: usize = 36;

/// Request head (`struct virtio_iommu_req_head`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqHead {
    /// Request type.
    pub type_: u8,
    /// Reserved; the device ignores it.
    pub reserved: [u8; 3],
}

/// Request tail (`struct virtio_iommu_req_tail`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqTail {
    /// Status code.
    pub status: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

/// ATTACH body (after the head, before the tail).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqAttach {
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// ATTACH flags.
    pub flags: Le32,
    /// Reserved; must be zero.
    pub reserved: [u8; 4],
}

/// DETACH body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqDetach {
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Reserved; ignored.
    pub reserved: [u8; 8],
}

/// MAP body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqMap {
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA.
    pub virt_start: Le64,
    /// Last IOVA (inclusive).
    pub virt_end: Le64,
    /// First guest-physical address.
    pub phys_start: Le64,
    /// MAP flags.
    pub flags: Le32,
}

/// UNMAP body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqUnmap {
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA.
    pub virt_start: Le64,
    /// Last IOVA (inclusive).
    pub virt_end: Le64,
    /// Reserved; a non-zero value is rejected with `S_INVAL`.
    pub reserved: [u8; 4],
}

/// PROBE body (device-readable part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqProbe {
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Reserved; ignored.
    pub reserved: [u8; 64],
}

impl Default for ReqProbe {
    fn default() -> Self {
        ReqProbe {
            endpoint: Le32::default(),
            reserved: [0; 64],
        }
    }
}

/// Probe property header (`struct virtio_iommu_probe_property`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ProbeProperty {
    /// Property type (low 12 bits) and reserved bits.
    pub type_: Le16,
    /// Size of the value that follows, in bytes.
    pub length: Le16,
}

/// RESV_MEM property (`struct virtio_iommu_probe_resv_mem`), header included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ProbeResvMem {
    /// Property header; `length` is 20.
    pub head: ProbeProperty,
    /// RESERVED or MSI.
    pub subtype: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// First reserved IOVA.
    pub start: Le64,
    /// Last reserved IOVA (inclusive).
    pub end: Le64,
}

/// Fault report written into event queue buffers (`struct virtio_iommu_fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct FaultRecord {
    /// Fault reason.
    pub reason: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// Fault flags.
    pub flags: Le32,
    /// Faulting endpoint.
    pub endpoint: Le32,
    /// Reserved, zero.
    pub reserved1: Le32,
    /// Faulting address, when `F_ADDRESS` is set.
    pub address: Le64,
}

// SAFETY: all of the following are `repr(C, packed)` structures made only of
// integers and byte arrays: they have no padding and every bit pattern is a
// valid value.
unsafe impl ByteValued for Range64 {}
// SAFETY: see above.
unsafe impl ByteValued for Range32 {}
// SAFETY: see above.
unsafe impl ByteValued for VirtioIommuConfig {}
// SAFETY: see above.
unsafe impl ByteValued for ReqHead {}
// SAFETY: see above.
unsafe impl ByteValued for ReqTail {}
// SAFETY: see above.
unsafe impl ByteValued for ReqAttach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqDetach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqMap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqUnmap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqProbe {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeProperty {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeResvMem {}
// SAFETY: see above.
unsafe impl ByteValued for FaultRecord {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn wire_sizes_match_the_specification() {
        assert_eq!(size_of::<VirtioIommuConfig>(), 40);
        assert_eq!(size_of::<ReqHead>(), 4);
        assert_eq!(size_of::<ReqTail>(), 4);
        assert_eq!(size_of::<ReqAttach>(), 16);
        assert_eq!(size_of::<ReqDetach>(), 16);
        assert_eq!(size_of::<ReqMap>(), 32);
        assert_eq!(size_of::<ReqUnmap>(), 24);
        assert_eq!(size_of::<ReqProbe>(), 68);
        assert_eq!(size_of::<ProbeProperty>(), 4);
        assert_eq!(size_of::<ProbeResvMem>(), 24);
        assert_eq!(size_of::<FaultRecord>(), 24);
    }

    #[test]
    fn bypass_offset_matches_layout() {
        let cfg = VirtioIommuConfig {
            bypass: 0xab,
            ..Default::default()
        };
        assert_eq!(cfg.as_slice()[CONFIG_BYPASS_OFFSET], 0xab);
    }

    #[test]
    fn status_round_trips() {
        for s in Status::ALL {
            assert_eq!(Status::from_u8(s as u8), Some(s));
        }
        assert_eq!(Status::from_u8(9), None);
    }
}
