//! Endpoints, domains and their mappings: the semantics of ATTACH, DETACH,
//! MAP and UNMAP, independent of how requests arrive.
//!
//! The address space has a single writer (the request engine). Endpoint
//! devices read it concurrently through [`EndpointHandle`]s; see
//! [`crate::tracker`] for how invalidations wait for their in-flight DMA.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering as StdOrdering;

use vmm_sys_util::eventfd::EventFd;

use crate::config::{IommuConfig, ReservedRegion};
use crate::drain::Drain;
use crate::mapper::ExternalMapper;
use crate::mapping::{MapFlags, Mapping, TreeError};
use crate::protocol::Status;
use crate::sync::Arc;
use crate::tracker::{Domain, DrainCollector, EndpointCore, Shared, VIA_GLOBAL_BYPASS};
#[cfg(not(loom))]
use crate::translate::EndpointHandle;

/// Why the VMM's own call on the address space failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// The endpoint ID is already registered.
    #[error("endpoint {0:#x} already exists")]
    Exists(u32),
    /// Too many endpoints.
    #[error("endpoint limit ({0}) reached")]
    Limit(usize),
    /// The endpoint does not exist.
    #[error("endpoint {0:#x} does not exist")]
    NoSuchEndpoint(u32),
    /// The endpoint-specific reserved regions are invalid.
    #[error("invalid reserved regions: {0}")]
    Regions(#[from] crate::config::ConfigError),
}

pub(crate) struct EndpointEntry {
    pub core: Arc<EndpointCore>,
    pub mapper: Option<Arc<dyn ExternalMapper>>,
    pub regions: Vec<ReservedRegion>,
    pub domain: Option<u32>,
}

pub(crate) struct DomainEntry {
    pub dom: Arc<Domain>,
    pub endpoints: BTreeSet<u32>,
}

/// Result of a request on the address space: the status to reply with, and
/// the drain that must complete before the reply is published.
#[derive(Debug)]
pub struct Outcome {
    /// Status of the request.
    pub status: Status,
    /// In-flight DMA the reply must wait for.
    pub drain: Option<Arc<Drain>>,
}

impl From<Status> for Outcome {
    fn from(status: Status) -> Self {
        Outcome {
            status,
            drain: None,
        }
    }
}

/// The device's translation state.
pub struct AddressSpace {
    pub(crate) config: IommuConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) endpoints: BTreeMap<u32, EndpointEntry>,
    pub(crate) domains: BTreeMap<u32, DomainEntry>,
    pub(crate) total_mappings: usize,
    next_uid: u64,
    notifier: Option<Arc<EventFd>>,
    removed: Vec<Mapping>,
}

impl AddressSpace {
    pub(crate) fn new(config: IommuConfig, shared: Arc<Shared>) -> Self {
        AddressSpace {
            config,
            shared,
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            total_mappings: 0,
            next_uid: VIA_GLOBAL_BYPASS + 1,
            notifier: None,
            removed: Vec::new(),
        }
    }

    /// Sets the eventfd written when a drain completes.
    pub(crate) fn set_drain_notifier(&mut self, n: Option<Arc<EventFd>>) {
        self.notifier = n;
    }

    #[cfg(not(loom))]
    pub(crate) fn add_endpoint(
        &mut self,
        id: u32,
        mapper: Option<Arc<dyn ExternalMapper>>,
        regions: Vec<ReservedRegion>,
    ) -> Result<EndpointHandle, EndpointError> {
        self.add_endpoint_core(id, mapper, regions)
            .map(EndpointHandle::new)
    }

    pub(crate) fn add_endpoint_core(
        &mut self,
        id: u32,
        mapper: Option<Arc<dyn ExternalMapper>>,
        regions: Vec<ReservedRegion>,
    ) -> Result<Arc<EndpointCore>, EndpointError> {
        if self.endpoints.contains_key(&id) {
            return Err(EndpointError::Exists(id));
        }
        if self.endpoints.len() >= self.shared.limits.max_endpoints {
            return Err(EndpointError::Limit(self.shared.limits.max_endpoints));
        }
        let mut all = self.config.reserved_regions.clone();
        all.extend_from_slice(&regions);
        crate::config::validate_regions(&all)?;
        let core = Arc::new(EndpointCore::new(id, self.shared.clone()));
        self.endpoints.insert(
            id,
            EndpointEntry {
                core: core.clone(),
                mapper,
                regions,
                domain: None,
            },
        );
        Ok(core)
    }

    #[cfg(not(loom))]
    pub(crate) fn endpoint(&self, id: u32) -> Option<EndpointHandle> {
        self.endpoints
            .get(&id)
            .map(|e| EndpointHandle::new(e.core.clone()))
    }

    /// Reserved regions reported for (and enforced on) endpoint `id`.
    pub(crate) fn regions_of(&self, id: u32) -> Option<impl Iterator<Item = &ReservedRegion>> {
        let e = self.endpoints.get(&id)?;
        Some(self.config.reserved_regions.iter().chain(e.regions.iter()))
    }

    fn domain_in_range(&self, domain: u32) -> bool {
        (self.config.domain_start..=self.config.domain_end).contains(&domain)
    }

    pub(crate) fn next_uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid - 1
    }

    fn new_drain(&self) -> DrainCollector {
        DrainCollector::new(self.notifier.clone(), self.config.drain)
    }

    /// Ends collection: tells the owners of the leases it closed (revoke
    /// hook, R_MAPPING fault) and returns the drain only if something must
    /// be waited for. Call with no endpoint or domain lock held: the hooks
    /// are the device's code.
    fn finish_drain(&self, drain: DrainCollector) -> Option<Arc<Drain>> {
        let (d, revoked) = drain.finish();
        for r in revoked {
            self.shared
                .metrics
                .areas_revoked
                .fetch_add(1, StdOrdering::Relaxed);
            self.shared.faults.report(
                crate::events::Fault::mapping(r.endpoint, r.iova, r.access),
                &self.shared.metrics,
            );
            if let Some(hook) = r.hook {
                hook();
            }
        }
        // The control mode replies at once (the pins' records still take
        // the drain's releases; nobody waits for them).
        let d = d.filter(|_| self.config.drain)?;
        self.shared
            .metrics
            .drains
            .fetch_add(1, StdOrdering::Relaxed);
        Some(d)
    }

    /// Points endpoint `id`'s translation at `dom` and makes `drain` wait
    /// for every pin made through the previous translation.
    fn switch_endpoint(&mut self, id: u32, dom: Option<Arc<Domain>>, drain: &mut DrainCollector) {
        let entry = self.endpoints.get_mut(&id).expect("caller checked");
        entry.domain = dom.as_ref().map(|d| d.id);
        let core = entry.core.clone();
        core.switch(dom, drain);
        #[cfg(not(loom))]
        EndpointHandle::invalidate_iotlb(&core, 0, u64::MAX);
    }

    /// Unmaps `mappings` from `mapper`; false if any unmap failed (logged
    /// and counted).
    fn mapper_unmap<'m>(
        &self,
        mapper: &dyn ExternalMapper,
        mappings: impl IntoIterator<Item = &'m Mapping>,
    ) -> bool {
        let mut ok = true;
        for m in mappings {
            if let Err(e) = mapper.unmap(m.iova, m.size()) {
                log::error!("external unmap {:#x}+{:#x} failed: {e}", m.iova, m.size());
                self.shared
                    .metrics
                    .mapper_errors
                    .fetch_add(1, StdOrdering::Relaxed);
                ok = false;
            }
        }
        ok
    }

    fn mapper_unmap_all(&self, mapper: &dyn ExternalMapper, dom: &Domain) -> bool {
        let all: Vec<Mapping> = dom.mappings.read(0).iter().collect();
        self.mapper_unmap(mapper, &all)
    }

    /// Removes endpoint `ep` from domain `dom_id`'s bookkeeping, unmapping
    /// the domain from its mapper and freeing the domain when it empties.
    /// Does not touch the endpoint's translation state.
    fn leave_domain(&mut self, ep: u32, dom_id: u32) -> bool {
        let mut ok = true;
        let mapper = self.endpoints.get(&ep).and_then(|e| e.mapper.clone());
        let Some(d) = self.domains.get_mut(&dom_id) else {
            return ok;
        };
        d.endpoints.remove(&ep);
        let dom = d.dom.clone();
        let empty = d.endpoints.is_empty();
        if let Some(m) = mapper {
            ok = self.mapper_unmap_all(m.as_ref(), &dom);
        }
        if empty {
            // "After all endpoints have been successfully detached from a
            // domain, it ceases to exist": its mappings go with it.
            self.domains.remove(&dom_id);
            let mut tree = dom.mappings.write();
            self.total_mappings -= tree.len();
            tree.clear();
        }
        ok
    }

    /// ATTACH `endpoint` to `domain` (created if needed).
    pub(crate) fn attach(&mut self, domain: u32, endpoint: u32, bypass: bool) -> Outcome {
        if !self.domain_in_range(domain) {
            return Status::Range.into();
        }
        let Some(entry) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt.into();
        };
        let mapper = entry.mapper.clone();
        let old = entry.domain;
        match self.domains.get(&domain) {
            Some(d) if d.dom.bypass != bypass => return Status::Inval.into(),
            Some(_) => {}
            None if self.domains.len() >= self.shared.limits.max_domains => {
                return Status::NoMem.into()
            }
            None => {}
        }
        if old == Some(domain) {
            return Status::Ok.into();
        }
        if bypass && mapper.is_some() {
            // An external mapper would need all of guest memory identity-mapped.
            return Status::Unsupp.into();
        }
        let mut status = Status::Ok;
        // "As if the driver issued a DETACH request followed by the ATTACH."
        if let Some(old) = old {
            if !self.leave_domain(endpoint, old) {
                status = Status::DevErr;
            }
        }
        let dom = match self.domains.get(&domain) {
            Some(d) => d.dom.clone(),
            None => {
                let uid = self.next_uid();
                let dom = Arc::new(Domain::new(domain, uid, bypass));
                self.domains.insert(
                    domain,
                    DomainEntry {
                        dom: dom.clone(),
                        endpoints: BTreeSet::new(),
                    },
                );
                dom
            }
        };
        let mut drain = self.new_drain();
        if let Some(m) = &mapper {
            if let Err(e) = self.mapper_map_all(m.as_ref(), &dom) {
                log::error!("attaching endpoint {endpoint:#x}: external map failed: {e}");
                if self
                    .domains
                    .get(&domain)
                    .is_some_and(|d| d.endpoints.is_empty())
                {
                    self.domains.remove(&domain);
                }
                self.switch_endpoint(endpoint, None, &mut drain);
                return Outcome {
                    status: Status::DevErr,
                    drain: self.finish_drain(drain),
                };
            }
        }
        self.domains
            .get_mut(&domain)
            .expect("inserted above")
            .endpoints
            .insert(endpoint);
        self.switch_endpoint(endpoint, Some(dom), &mut drain);
        Outcome {
            status,
            drain: self.finish_drain(drain),
        }
    }

    /// Maps all of `dom` into `mapper`, undoing the partial work on failure.
    fn mapper_map_all(&self, mapper: &dyn ExternalMapper, dom: &Domain) -> std::io::Result<()> {
        let tree = dom.mappings.read(0);
        let mut done = Vec::new();
        for m in tree.iter() {
            if let Err(e) = mapper.map(m.iova, m.gpa, m.size(), m.flags) {
                self.shared
                    .metrics
                    .mapper_errors
                    .fetch_add(1, StdOrdering::Relaxed);
                for d in done {
                    let d: Mapping = d;
                    let _ = mapper.unmap(d.iova, d.size());
                }
                return Err(e);
            }
            done.push(m);
        }
        Ok(())
    }

    /// DETACH `endpoint` from `domain`.
    pub(crate) fn detach(&mut self, domain: u32, endpoint: u32) -> Outcome {
        if !self.domain_in_range(domain) {
            return Status::Range.into();
        }
        let Some(entry) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt.into();
        };
        if entry.domain != Some(domain) {
            return Status::Inval.into();
        }
        let status = if self.leave_domain(endpoint, domain) {
            Status::Ok
        } else {
            Status::DevErr
        };
        let mut drain = self.new_drain();
        self.switch_endpoint(endpoint, None, &mut drain);
        Outcome {
            status,
            drain: self.finish_drain(drain),
        }
    }

    /// MAP `[start, end]` -> `gpa` in `domain`.
    pub(crate) fn map(
        &mut self,
        domain: u32,
        start: u64,
        end: u64,
        gpa: u64,
        flags: MapFlags,
    ) -> Status {
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        if d.dom.bypass || end < start {
            return Status::Inval;
        }
        let g = self.config.granule() - 1;
        if start & g != 0 || gpa & g != 0 || end.wrapping_add(1) & g != 0 {
            return Status::Range;
        }
        if end > self.config.input_end() || gpa.checked_add(end - start).is_none() {
            return Status::Range;
        }
        for ep in &d.endpoints {
            if self
                .regions_of(*ep)
                .is_some_and(|mut r| r.any(|r| r.overlaps(start, end)))
            {
                return Status::Inval;
            }
        }
        let dom = d.dom.clone();
        {
            let tree = dom.mappings.read(0);
            if tree.overlaps(start, end) {
                return Status::Inval;
            }
            if tree.len() >= self.shared.limits.max_mappings_per_domain
                || self.total_mappings >= self.shared.limits.max_mappings_total
            {
                return Status::NoMem;
            }
        }
        let m = Mapping {
            iova: start,
            iova_end: end,
            gpa,
            flags,
        };
        // Propagate first, so that a failure leaves nothing behind.
        let mappers: Vec<Arc<dyn ExternalMapper>> = d
            .endpoints
            .iter()
            .filter_map(|ep| self.endpoints.get(ep).and_then(|e| e.mapper.clone()))
            .collect();
        for (i, mapper) in mappers.iter().enumerate() {
            if let Err(e) = mapper.map(start, gpa, m.size(), flags) {
                log::error!("external map {start:#x}-{end:#x} failed: {e}");
                self.shared
                    .metrics
                    .mapper_errors
                    .fetch_add(1, StdOrdering::Relaxed);
                for done in &mappers[..i] {
                    let _ = done.unmap(start, m.size());
                }
                return Status::DevErr;
            }
        }
        let inserted = dom.mappings.write().insert(m);
        match inserted {
            Ok(()) => {
                self.total_mappings += 1;
                Status::Ok
            }
            Err(TreeError::Overlap | TreeError::Split) => Status::Inval,
        }
    }

    /// UNMAP `[start, end]` in `domain`.
    pub(crate) fn unmap(&mut self, domain: u32, start: u64, end: u64) -> Outcome {
        if !self.domain_in_range(domain) {
            return Status::Range.into();
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt.into();
        };
        if d.dom.bypass || end < start {
            return Status::Inval.into();
        }
        let dom = d.dom.clone();
        let mut removed = std::mem::take(&mut self.removed);
        removed.clear();
        {
            // Rule 2 of the tracker: remove under the write lock first...
            let mut tree = dom.mappings.write();
            if tree.check_unmap(start, end).is_err() {
                self.removed = removed;
                return Status::Range.into();
            }
            tree.remove_range(start, end, &mut removed);
        }
        if removed.is_empty() {
            self.removed = removed;
            return Status::Ok.into();
        }
        self.total_mappings -= removed.len();
        let mut status = Status::Ok;
        let mut drain = self.new_drain();
        for ep in &self.domains[&domain].endpoints {
            let entry = &self.endpoints[ep];
            if let Some(mapper) = &entry.mapper {
                if !self.mapper_unmap(mapper.as_ref(), &removed) {
                    status = Status::DevErr;
                }
            }
            // ...then collect the pins that overlap.
            entry.core.collect_range(dom.uid, start, end, &mut drain);
            #[cfg(not(loom))]
            EndpointHandle::invalidate_iotlb(&entry.core, start, end);
        }
        self.removed = removed;
        Outcome {
            status,
            drain: self.finish_drain(drain),
        }
    }

    /// Device reset: every endpoint is detached and every domain removed.
    /// Returns the drain of the DMA still in flight through them.
    pub(crate) fn reset(&mut self) -> Option<Arc<Drain>> {
        let mut drain = self.new_drain();
        let ids: Vec<(u32, Option<u32>)> = self
            .endpoints
            .iter()
            .map(|(id, e)| (*id, e.domain))
            .collect();
        for (id, dom) in ids {
            if let Some(dom) = dom {
                self.leave_domain(id, dom);
            }
            self.switch_endpoint(id, None, &mut drain);
        }
        debug_assert!(self.domains.is_empty());
        self.domains.clear();
        self.total_mappings = 0;
        // Records from before the reset mean nothing to the next driver
        // (the closed queue areas' faults included).
        let d = self.finish_drain(drain);
        self.shared.faults.clear();
        d
    }

    /// Applies a new value of the config `bypass` byte. Turning bypass off
    /// removes the identity translation of unattached endpoints; the
    /// returned drain covers DMA still in flight through it.
    pub(crate) fn set_bypass(&mut self, on: bool) -> Option<Arc<Drain>> {
        let was = self.shared.bypass.swap(on, StdOrdering::AcqRel);
        if was == on || on {
            return None;
        }
        let mut drain = self.new_drain();
        for e in self.endpoints.values() {
            if e.domain.is_none() {
                e.core
                    .collect_range(VIA_GLOBAL_BYPASS, 0, u64::MAX, &mut drain);
                #[cfg(not(loom))]
                EndpointHandle::invalidate_iotlb(&e.core, 0, u64::MAX);
            }
        }
        self.finish_drain(drain)
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of mappings over all domains.
    pub fn mapping_count(&self) -> usize {
        self.total_mappings
    }

    /// The domain endpoint `id` is attached to.
    pub fn attached_domain(&self, id: u32) -> Option<u32> {
        self.endpoints.get(&id).and_then(|e| e.domain)
    }

    /// The mappings of `domain` as `(iova, size)` in IOVA order, or `None`
    /// for a domain that does not exist. For inspection (a VMM comparing
    /// an external mapper's state with the domain's); it copies them all.
    pub fn domain_mappings(&self, domain: u32) -> Option<Vec<(u64, u64)>> {
        let d = self.domains.get(&domain)?;
        let tree = d.dom.mappings.read(0);
        Some(tree.iter().map(|m| (m.iova, m.size())).collect())
    }
}
