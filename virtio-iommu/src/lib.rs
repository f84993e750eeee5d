//! A virtio-iommu device model with blocking invalidation.
//!
//! When the guest sends UNMAP, DETACH, or an ATTACH that moves an endpoint,
//! this device publishes the reply only after every in-flight DMA that
//! overlaps the invalidated translation has finished. Endpoint devices
//! translate through an [`EndpointHandle`] and hold a [`Pin`] for as long
//! as they use the host pointers; the [`tracker`] makes invalidations wait
//! for the pins they overlap.
//!
//! The crate is transport- and VMM-agnostic: it depends on vm-memory,
//! virtio-queue and vmm-sys-util only. A VMM creates a [`VirtioIommu`],
//! registers endpoints, wires the request queue's notification to
//! [`VirtioIommu::process_requests`] and watches
//! [`VirtioIommu::drain_eventfd`] to publish replies whose drains completed.
//!
//! Modules, one concept each:
//! - [`protocol`] — wire formats of the specification;
//! - [`config`] — the VMM's configuration and limits;
//! - [`mapping`] — the per-domain interval map;
//! - [`lease`] — the atomic protocol of long-held, revocable translations;
//! - [`tracker`] — pins, drains and revocation (the invariant);
//! - [`fence`] — guest pages taken from DMA the host cannot cancel;
//! - [`translate`] — the endpoint handle, also a `vm_memory::Iommu`;
//! - [`queue_area`] — virtqueue rings translated once, revoked strictly;
//! - [`address_space`] — ATTACH/DETACH/MAP/UNMAP semantics;
//! - [`engine`] — request queue parsing and ordering;
//! - [`events`] — fault reporting;
//! - [`mapper`] — propagation to external (VFIO) mappers;
//! - [`state`] — snapshot and restore;
//! - [`metrics`] — counters.

#![warn(missing_docs)]
// Under `--cfg loom` only the tracker is built for the models; the rest of
// the crate (and what only it uses) is left out.
#![cfg_attr(all(loom, not(test)), allow(dead_code))]

pub mod config;
pub mod drain;
pub mod lease;
pub mod mapping;
pub mod metrics;
pub mod protocol;
mod sync;
pub mod tracker;

pub mod fence;

pub mod address_space;
pub mod events;
pub mod mapper;

#[cfg(not(loom))]
pub mod device;
#[cfg(not(loom))]
pub mod engine;
#[cfg(not(loom))]
pub mod queue_area;
#[cfg(not(loom))]
pub mod state;
#[cfg(not(loom))]
pub mod translate;

#[cfg(all(not(loom), any(test, feature = "test-utils")))]
pub mod testing;

#[cfg(all(test, loom))]
mod loom_tests;

/// The crate's README (its registry page), whose examples run as doc tests
/// (they drive the device through the `test-utils` test driver).
#[cfg(all(doctest, feature = "test-utils"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use address_space::{AddressSpace, EndpointError, Outcome};
pub use config::{IommuConfig, Limits, ReservedKind, ReservedRegion};
#[cfg(not(loom))]
pub use device::{EndpointOptions, Error, VirtioIommu, FENCE_RETRY_MIN, QUEUE_SIZE};
pub use drain::Drain;
pub use fence::Fence;
pub use mapper::ExternalMapper;
pub use mapping::{MapFlags, Mapping};
pub use metrics::{Metrics, MetricsSnapshot};
pub use protocol::Status;
#[cfg(not(loom))]
pub use queue_area::{AreaGuard, AreaSpec, QueueAreas, QueueMemory};
#[cfg(not(loom))]
pub use state::IommuState;
pub use tracker::{GpaRange, Pin, PinWrite, RevokeHook, TranslateError};
#[cfg(not(loom))]
pub use translate::EndpointHandle;
