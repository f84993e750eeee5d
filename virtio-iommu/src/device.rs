//! The virtio-iommu device: features, configuration space, queues,
//! endpoints, snapshot. Transport-agnostic: the VMM owns the virtqueues and
//! the interrupts and calls in when the driver notifies or a drain ends.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::address_space::DomainEntry;
use crate::address_space::{AddressSpace, EndpointError};
use crate::config::{ConfigError, IommuConfig, ReservedRegion};
use crate::drain::Drain;
use crate::engine::RequestEngine;
use crate::events::{self, FaultQueue};
use crate::fence::Fence;
use crate::mapper::ExternalMapper;
use crate::metrics::Metrics;
use crate::protocol::{features::*, Range32, Range64, VirtioIommuConfig, CONFIG_BYPASS_OFFSET};
use crate::state::{self, DomainState, EndpointState, IommuState, StateError, STATE_VERSION};
use crate::sync::Arc;
use crate::tracker::{Domain, Shared};
use crate::translate::EndpointHandle;

/// Default (and maximum) virtqueue size.
pub const QUEUE_SIZE: u16 = 256;

/// The shortest wait before the pins of an invalidation are fenced again
/// after a fence failed (each try may hold the vCPUs until the VMM gives
/// up on them).
pub const FENCE_RETRY_MIN: Duration = Duration::from_millis(100);

/// Errors of device construction and setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// Queue access failed.
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// Per-endpoint options.
#[derive(Default)]
pub struct EndpointOptions {
    /// Where MAP/UNMAP in the endpoint's domain are propagated (VFIO).
    pub mapper: Option<Arc<dyn ExternalMapper>>,
    /// Reserved regions of this endpoint besides the device-wide ones.
    pub reserved_regions: Vec<ReservedRegion>,
}

/// A virtio-iommu device with blocking invalidation.
pub struct VirtioIommu {
    config: IommuConfig,
    avail_features: u64,
    acked_features: u64,
    space: AddressSpace,
    engine: RequestEngine,
    shared: Arc<Shared>,
    drain_evt: Arc<EventFd>,
    fault_evt: Arc<EventFd>,
    /// Drains of resets still in flight (see [`VirtioIommu::reset`]).
    pending_resets: Vec<Arc<Drain>>,
    /// Drain of a bypass 1 -> 0 still in flight (see
    /// [`VirtioIommu::write_config`]).
    pending_bypass: Option<Arc<Drain>>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("domains", &self.space.domain_count())
            .field("mappings", &self.space.mapping_count())
            .field("engine", &self.engine)
            .finish()
    }
}

impl VirtioIommu {
    /// Creates a device with `config`.
    pub fn new(config: IommuConfig) -> Result<Self, Error> {
        config.validate()?;
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            fence_gate: Default::default(),
            bypass: crate::sync::AtomicBool::new(config.bypass),
            metrics,
            faults: FaultQueue::new(config.limits.max_pending_faults),
            limits: config.limits,
            input_end: config.input_end(),
        });
        let drain_evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let fault_evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        shared.faults.set_notifier(Some(fault_evt.clone()));
        let mut space = AddressSpace::new(config.clone(), shared.clone());
        space.set_drain_notifier(Some(drain_evt.clone()));
        let mut avail = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
            | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
            | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
            | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        if config.offer_probe {
            avail |= 1 << VIRTIO_IOMMU_F_PROBE;
        }
        if config.offer_mmio {
            avail |= 1 << VIRTIO_IOMMU_F_MMIO;
        }
        Ok(VirtioIommu {
            config,
            avail_features: avail,
            acked_features: 0,
            space,
            engine: RequestEngine::default(),
            shared,
            drain_evt,
            fault_evt,
            pending_resets: Vec::new(),
            pending_bypass: None,
        })
    }

    /// The virtio device type (23).
    pub fn device_type(&self) -> u32 {
        crate::protocol::VIRTIO_ID_IOMMU
    }

    /// Maximum sizes of the request and event queues.
    pub fn queue_max_sizes(&self) -> [u16; 2] {
        [QUEUE_SIZE, QUEUE_SIZE]
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.avail_features
    }

    /// Records the driver's acknowledged features (unoffered bits are dropped).
    pub fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Features negotiated with the driver.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn config_space(&self) -> VirtioIommuConfig {
        VirtioIommuConfig {
            page_size_mask: self.config.page_size_mask.into(),
            input_range: Range64 {
                start: 0u64.into(),
                end: self.config.input_end().into(),
            },
            domain_range: Range32 {
                start: self.config.domain_start.into(),
                end: self.config.domain_end.into(),
            },
            probe_size: self.config.probe_size.into(),
            // Reads 1 until a change to 0 has drained: see write_config.
            bypass: u8::from(self.shared.bypass.load(Ordering::Acquire) || self.bypass_draining()),
            reserved: [0; 3],
        }
    }

    /// Reads the configuration space; bytes beyond it read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        let bytes = cfg.as_slice();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// Writes the configuration space. Only `bypass` is writable, only
    /// with `F_BYPASS_CONFIG` negotiated, and only with 0 or 1; everything
    /// else is ignored.
    ///
    /// Never blocks. Turning bypass off takes effect at once (unattached
    /// endpoints stop translating), but DMA may still be in flight through
    /// the identity translation it removed: until that has drained the
    /// `bypass` field reads back 1, and a driver that needs the guarantee
    /// polls it (as it polls the device status after a reset). While it
    /// reads back 1 further writes are ignored, which bounds the drains a
    /// driver can pile up. [`VirtioIommu::revoke_overdue`] revokes the
    /// blocking pins after the grace period.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.acked_features & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0 {
            return;
        }
        if offset != CONFIG_BYPASS_OFFSET as u64 || data.is_empty() || data[0] > 1 {
            log::warn!("virtio-iommu: ignored config write at {offset:#x}");
            return;
        }
        if self.bypass_draining() {
            log::warn!("virtio-iommu: bypass write while the previous change drains: ignored");
            return;
        }
        self.pending_bypass = self.space.set_bypass(data[0] == 1);
    }

    /// Whether a change of `bypass` to 0 still waits for DMA.
    fn bypass_draining(&self) -> bool {
        self.pending_bypass
            .as_ref()
            .is_some_and(|d| !d.is_complete())
    }

    /// Registers endpoint `id` (for PCI: segment << 16 | BDF) and returns
    /// its translation handle.
    pub fn add_endpoint(&mut self, id: u32) -> Result<EndpointHandle, EndpointError> {
        self.add_endpoint_with(id, EndpointOptions::default())
    }

    /// Registers endpoint `id` with options.
    pub fn add_endpoint_with(
        &mut self,
        id: u32,
        opts: EndpointOptions,
    ) -> Result<EndpointHandle, EndpointError> {
        self.space
            .add_endpoint(id, opts.mapper, opts.reserved_regions)
    }

    /// The handle of a registered endpoint.
    pub fn endpoint(&self, id: u32) -> Option<EndpointHandle> {
        self.space.endpoint(id)
    }

    /// The address space (read-only view for inspection).
    pub fn address_space(&self) -> &AddressSpace {
        &self.space
    }

    /// Handles the request queue: publishes a parked reply whose drain has
    /// completed, then executes available requests (see
    /// [`crate::engine`] for the ordering). Call it when the driver
    /// notifies the request queue and when [`VirtioIommu::drain_eventfd`]
    /// fires. Returns whether used entries were added.
    pub fn process_requests<Q: QueueT, M: GuestMemory>(
        &mut self,
        queue: &mut Q,
        mem: &M,
    ) -> Result<bool, Error> {
        self.engine
            .process(&mut self.space, self.acked_features, queue, mem)
            .map_err(Error::Queue)
    }

    /// Writes pending fault records into the event queue. Call it when the
    /// driver notifies the event queue and when
    /// [`VirtioIommu::fault_eventfd`] fires.
    pub fn process_events<Q: QueueT, M: GuestMemory>(
        &mut self,
        queue: &mut Q,
        mem: &M,
    ) -> Result<bool, Error> {
        events::deliver(&self.shared.faults, &self.shared.metrics, queue, mem).map_err(Error::Queue)
    }

    /// Written when a parked request's drain completes.
    pub fn drain_eventfd(&self) -> &EventFd {
        &self.drain_evt
    }

    /// Written when a fault is queued for the event queue.
    pub fn fault_eventfd(&self) -> &EventFd {
        &self.fault_evt
    }

    /// Number of fault records waiting for event buffers.
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.len()
    }

    /// The drain the parked request waits for, if any.
    pub fn parked_drain(&self) -> Option<Arc<Drain>> {
        self.engine.parked_drain().cloned()
    }

    /// Every drain still waited for: the parked request's, a pending
    /// reset's, a pending bypass change's.
    fn waiting_drains(&self) -> impl Iterator<Item = &Arc<Drain>> {
        self.engine
            .parked_drain()
            .into_iter()
            .chain(self.pending_resets.iter())
            .chain(self.pending_bypass.iter())
            .filter(|d| !d.is_complete())
    }

    /// When the holders of pins that an invalidation waits for (the parked
    /// request, a reset, a bypass change) should next be asked to revoke.
    pub fn revoke_deadline(&self) -> Option<Instant> {
        self.revoke_deadlines().min()
    }

    /// The earliest revocation deadline after `now` (see
    /// [`VirtioIommu::revoke_deadline`]): after a VMM has called
    /// [`VirtioIommu::revoke_overdue`] with `now`, when it next needs to.
    pub fn revoke_deadline_after(&self, now: Instant) -> Option<Instant> {
        self.revoke_deadlines().filter(|&t| t > now).min()
    }

    /// The revocation deadline of each invalidation still waiting.
    fn revoke_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let grace = self.config.revoke_grace;
        self.waiting_drains().map(move |d| d.started() + grace)
    }

    /// Calls the revoke hooks of pins holding up an invalidation whose
    /// grace period has passed. Returns how many hooks were called.
    pub fn revoke_overdue(&mut self, now: Instant) -> usize {
        let grace = self.config.revoke_grace;
        self.waiting_drains()
            .filter(|d| now >= d.started() + grace)
            .map(|d| d.revoke())
            .sum()
    }

    /// When the pins still holding an invalidation should be fenced
    /// ([`crate::fence`]): `revoke_grace` plus `fence_after` after it
    /// started (or, after a fence of its pins failed, when the next may be
    /// tried), for the earliest invalidation not handed to a fence.
    /// `None` without [`IommuConfig::fence_after`].
    pub fn fence_deadline(&self) -> Option<Instant> {
        self.waiting_drains()
            .filter(|d| !d.fence_claimed())
            .filter_map(|d| self.fence_due_at(d))
            .min()
    }

    /// When `d`'s pins are due for a fence; `None` without `fence_after`.
    fn fence_due_at(&self, d: &Drain) -> Option<Instant> {
        let first = d.started() + self.config.revoke_grace + self.config.fence_after?;
        Some(d.fence_retry_at().map_or(first, |retry| retry.max(first)))
    }

    /// How long a drain waits before its pins are fenced again after a
    /// fence failed (doubling with each failure): `fence_after`, and at
    /// least [`FENCE_RETRY_MIN`].
    fn fence_retry_after(&self) -> Duration {
        self.config
            .fence_after
            .unwrap_or_default()
            .max(FENCE_RETRY_MIN)
    }

    /// The pins still holding the invalidations whose fence deadline has
    /// passed (see [`VirtioIommu::fence_deadline`]), claimed for one
    /// [`Fence`], or `None` when none is due or none can be fenced. Each
    /// invalidation is handed to one fence at a time; if that fence fails
    /// (the VMM drops it), it is due again after `fence_after` (at least
    /// [`FENCE_RETRY_MIN`]), twice as long after each further failure, at
    /// most 10 s.
    ///
    /// The caller fences the pages with no lock of this device held
    /// (fencing holds the vCPUs, which may be waiting for that lock), then
    /// calls [`Fence::complete`]; the replies follow through
    /// [`VirtioIommu::drain_eventfd`] as for any drain.
    pub fn fences_due(&self, now: Instant) -> Option<Fence> {
        self.config.fence_after?;
        let due = self
            .waiting_drains()
            .filter(|d| !d.fence_claimed() && self.fence_due_at(d).is_some_and(|t| now >= t));
        Fence::claim(
            due,
            &self.shared,
            self.space.endpoints.values().map(|e| &e.core),
            self.fence_retry_after(),
        )
    }

    /// Spins for at most `budget` waiting for the parked request's drain;
    /// true if it completed (or nothing is parked). The Linux driver
    /// busy-waits for every reply, so a VMM may prefer to spend a short
    /// budget polling here over the wake-up latency of sleeping on
    /// [`VirtioIommu::drain_eventfd`].
    pub fn poll_parked(&self, budget: std::time::Duration) -> bool {
        let Some(d) = self.engine.parked_drain() else {
            return true;
        };
        let start = Instant::now();
        loop {
            if d.is_complete() {
                return true;
            }
            if start.elapsed() >= budget {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Waits at most `timeout` for the parked request (if any) to become
    /// publishable, revoking its blockers once the grace period has
    /// passed; true if nothing is parked any more or its drain completed.
    /// For VMMs without an event loop. Blocks the caller for at most
    /// `timeout`: call it from the device's own thread, never from a vCPU
    /// with an unbounded timeout (a backend that never releases a pin
    /// would hang it).
    pub fn wait_parked(&self, timeout: std::time::Duration) -> bool {
        let Some(d) = self.engine.parked_drain() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let revoke_at = d.started() + self.config.revoke_grace;
        if revoke_at < deadline
            && !d.wait_timeout(revoke_at.saturating_duration_since(Instant::now()))
        {
            d.revoke();
        }
        d.wait_timeout(deadline.saturating_duration_since(Instant::now()))
    }

    /// Device reset: every endpoint detached, domains removed, the parked
    /// request forgotten. `bypass` keeps its value.
    ///
    /// Never blocks. The translations are gone when it returns, but DMA
    /// may still be in flight through them: the reset is complete only when
    /// [`VirtioIommu::reset_pending`] says false, and a transport keeps the
    /// device status reading non-zero until then (virtio 1.2, 2.1.2: the
    /// driver polls the status after writing 0). Returns whether the reset
    /// is already complete.
    pub fn reset(&mut self) -> bool {
        self.engine.reset();
        self.acked_features = 0;
        if let Some(d) = self.space.reset() {
            self.pending_resets.push(d);
        }
        !self.reset_pending()
    }

    /// Whether DMA through translations removed by a reset (or a bypass
    /// change) is still in flight. Forgets completed drains and revokes
    /// overdue blockers (see [`VirtioIommu::revoke_overdue`]), so a
    /// transport that calls it on each status read also drives revocation.
    pub fn reset_pending(&mut self) -> bool {
        self.revoke_overdue(Instant::now());
        self.pending_resets.retain(|d| !d.is_complete());
        if !self.bypass_draining() {
            self.pending_bypass = None;
        }
        !self.pending_resets.is_empty() || self.pending_bypass.is_some()
    }

    /// System reset: [`VirtioIommu::reset`], and `bypass` back to its
    /// initial value. Never blocks; see [`VirtioIommu::reset_pending`].
    /// Returns whether the reset is already complete.
    pub fn system_reset(&mut self) -> bool {
        self.reset();
        if let Some(d) = self.space.set_bypass(self.config.bypass) {
            self.pending_resets.push(d);
        }
        !self.reset_pending()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Captures the guest-configured state. Fails while a request is
    /// parked or a reset or bypass change is draining.
    pub fn snapshot(&self) -> Result<IommuState, StateError> {
        if self.waiting_drains().next().is_some() {
            return Err(StateError::Busy);
        }
        let endpoints = self
            .space
            .endpoints
            .iter()
            .map(|(&id, e)| EndpointState {
                id,
                domain: e.domain,
            })
            .collect();
        let domains = self
            .space
            .domains
            .iter()
            .map(|(&id, d)| DomainState {
                id,
                bypass: d.dom.bypass,
                mappings: d.dom.mappings.read(0).iter().collect(),
            })
            .collect();
        Ok(IommuState {
            version: STATE_VERSION,
            acked_features: self.acked_features,
            config: self.config.clone(),
            bypass: self.shared.bypass.load(Ordering::Acquire),
            endpoints,
            domains,
        })
    }

    /// Restores a state taken by [`VirtioIommu::snapshot`] onto a freshly
    /// created device whose endpoints are registered. The state is
    /// validated completely before anything changes.
    pub fn restore(&mut self, state: &IommuState) -> Result<(), StateError> {
        if self.space.domain_count() != 0 || self.waiting_drains().next().is_some() {
            return Err(StateError::NotFresh);
        }
        let regions: BTreeMap<u32, Vec<ReservedRegion>> = self
            .space
            .endpoints
            .iter()
            .map(|(&id, e)| (id, e.regions.clone()))
            .collect();
        let domains = state::validate(state, &self.config, self.avail_features, &regions)?;
        // External mappers first: a refusal leaves the device untouched.
        let mut mapped: Vec<(Arc<dyn ExternalMapper>, u64, u64)> = Vec::new();
        for e in &state.endpoints {
            let (Some(d), Some(mapper)) = (e.domain, self.space.endpoints[&e.id].mapper.clone())
            else {
                continue;
            };
            for m in domains[&d].1.iter() {
                if mapper.map(m.iova, m.gpa, m.size(), m.flags).is_err() {
                    for (mp, iova, size) in &mapped {
                        let _ = mp.unmap(*iova, *size);
                    }
                    return Err(StateError::Mapper(e.id));
                }
                mapped.push((mapper.clone(), m.iova, m.size()));
            }
        }
        let mut total = 0;
        let mut doms = BTreeMap::new();
        for (id, (bypass, tree)) in domains {
            let uid = self.space.next_uid();
            let dom = Arc::new(Domain::new(id, uid, bypass));
            total += tree.len();
            *dom.mappings.write() = tree;
            doms.insert(id, dom);
        }
        for e in &state.endpoints {
            let entry = self.space.endpoints.get_mut(&e.id).expect("validated");
            entry.domain = e.domain;
            let dom = e.domain.map(|d| doms[&d].clone());
            entry.core.set_domain(dom);
            if let Some(d) = e.domain {
                self.space
                    .domains
                    .entry(d)
                    .or_insert_with(|| DomainEntry {
                        dom: doms[&d].clone(),
                        endpoints: Default::default(),
                    })
                    .endpoints
                    .insert(e.id);
            }
        }
        self.space.total_mappings = total;
        self.acked_features = state.acked_features;
        self.shared.bypass.store(state.bypass, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::Permissions;

    use crate::protocol::req_type;
    use crate::testing::{unmap_body, Harness};
    use crate::{IommuConfig, Status};

    const EP: u32 = 8;
    const DOM: u32 = 1;

    #[test]
    fn poll_parked_says_whether_the_parked_unmap_may_be_published() {
        let mut h = Harness::new(IommuConfig::default());
        h.dev.add_endpoint(EP).unwrap();
        assert_eq!(h.attach(DOM, EP, 0), Some(Status::Ok));
        assert_eq!(h.map(DOM, 0x1000, 0x1fff, 0x10_000, 3), Some(Status::Ok));
        let shown = format!("{:?}", h.dev);
        assert!(shown.contains("domains: 1") && shown.contains("mappings: 1"));

        // Nothing parked: nothing to wait for.
        assert!(h.dev.parked_drain().is_none());
        assert!(h.dev.poll_parked(Duration::ZERO));

        // DMA in flight under the UNMAP: the request parks, and polling
        // spends its budget without the drain completing.
        let pin = h
            .dev
            .endpoint(EP)
            .unwrap()
            .pin(0x1000, 8, Permissions::Write)
            .unwrap();
        h.post(0, req_type::UNMAP, &unmap_body(DOM, 0x1000, 0x1fff));
        assert!(!h.dev.process_requests(&mut h.reqq, &h.mem).unwrap());
        assert!(h.dev.parked_drain().is_some());
        let budget = Duration::from_millis(2);
        let t = Instant::now();
        assert!(!h.dev.poll_parked(budget));
        assert!(t.elapsed() >= budget);
        assert_eq!(h.posted_status(0), 0xee, "no reply yet");

        // The DMA ends on another thread while the device polls: the poll
        // returns true and the reply can be published.
        let dma = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            drop(pin);
        });
        assert!(h.dev.poll_parked(Duration::from_secs(30)));
        dma.join().unwrap();
        assert!(h.dev.process_requests(&mut h.reqq, &h.mem).unwrap());
        assert_eq!(h.posted_status(0), Status::Ok as u8);
        assert!(h.dev.parked_drain().is_none());
    }
}
