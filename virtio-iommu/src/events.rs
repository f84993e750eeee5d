//! Fault reporting: translation failures become fault records that the
//! device writes into buffers the driver posted on the event queue.
//!
//! Reporting never blocks the translation path: records go into a bounded
//! queue ([`crate::Limits::max_pending_faults`]); when it is full the record
//! is dropped and counted. The VMM drains the queue into the event virtqueue
//! when the fault notifier fires or when the driver posts buffers.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::endian::{Le32, Le64};
use vm_memory::{Bytes, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::Metrics;
use crate::protocol::{
    FaultRecord, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING,
};

/// A translation fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// Faulting endpoint.
    pub endpoint: u32,
    /// Faulting address (valid with `F_ADDRESS`).
    pub address: u64,
}

fn access_flags(access: Permissions) -> u32 {
    match access {
        Permissions::No => 0,
        Permissions::Read => VIRTIO_IOMMU_FAULT_F_READ,
        Permissions::Write => VIRTIO_IOMMU_FAULT_F_WRITE,
        Permissions::ReadWrite => VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE,
    }
}

impl Fault {
    /// The endpoint accessed memory without being attached (R_DOMAIN).
    pub fn domain(endpoint: u32, access: Permissions) -> Self {
        Fault {
            reason: VIRTIO_IOMMU_FAULT_R_DOMAIN,
            flags: access_flags(access),
            endpoint,
            address: 0,
        }
    }

    /// `address` was unmapped or not permitted (R_MAPPING).
    pub fn mapping(endpoint: u32, address: u64, access: Permissions) -> Self {
        Fault {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flags: access_flags(access) | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            endpoint,
            address,
        }
    }

    /// The wire record.
    pub fn record(&self) -> FaultRecord {
        FaultRecord {
            reason: self.reason,
            reserved: [0; 3],
            flags: Le32::from(self.flags),
            endpoint: Le32::from(self.endpoint),
            reserved1: Le32::from(0),
            address: Le64::from(self.address),
        }
    }
}

/// Bounded queue of faults waiting for event buffers.
pub(crate) struct FaultQueue {
    pending: Mutex<VecDeque<Fault>>,
    capacity: usize,
    notifier: Mutex<Option<Arc<EventFd>>>,
}

impl FaultQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        FaultQueue {
            pending: Mutex::new(VecDeque::new()),
            capacity,
            notifier: Mutex::new(None),
        }
    }

    pub(crate) fn set_notifier(&self, n: Option<Arc<EventFd>>) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// Queues a fault, or drops it when the queue is full.
    pub(crate) fn report(&self, f: Fault, metrics: &Metrics) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            metrics.faults_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(f);
        drop(q);
        metrics.faults_reported.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = n.write(1);
        }
    }

    pub(crate) fn pop(&self) -> Option<Fault> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    pub(crate) fn push_front(&self, f: Fault) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_front(f);
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn clear(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Writes `rec` into the writable part of `chain`; returns the used length
/// (0 when the buffer is too small or not writable).
fn write_record<M>(mem: &M, chain: DescriptorChain<&M>, rec: &FaultRecord) -> u32
where
    M: GuestMemory,
{
    let bytes = vm_memory::ByteValued::as_slice(rec);
    let mut written = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            // A device-readable descriptor in an event buffer is malformed.
            return 0;
        }
        let n = (desc.len() as usize).min(bytes.len() - written);
        if mem
            .write_slice(&bytes[written..written + n], desc.addr())
            .is_err()
        {
            return 0;
        }
        written += n;
        if written == bytes.len() {
            return written as u32;
        }
    }
    0
}

/// Moves pending faults into event-queue buffers. Returns whether at least
/// one buffer was used (the caller then notifies the driver if needed).
pub(crate) fn deliver<Q, M>(
    faults: &FaultQueue,
    metrics: &Metrics,
    queue: &mut Q,
    mem: &M,
) -> Result<bool, virtio_queue::Error>
where
    Q: QueueT,
    M: GuestMemory,
{
    let mut used = false;
    while let Some(fault) = faults.pop() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            faults.push_front(fault);
            break;
        };
        let head = chain.head_index();
        let len = write_record(mem, chain, &fault.record());
        queue.add_used(mem, head, len)?;
        used = true;
        if len == 0 {
            // The buffer could not hold the record: keep it for the next one.
            faults.push_front(fault);
        } else {
            metrics.faults_delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(used)
}
