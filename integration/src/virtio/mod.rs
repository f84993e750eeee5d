//! Virtio devices and the interface between a device and its transport.
//!
//! The PCI transport (`pci`) owns the virtio-pci registers: feature
//! negotiation, queue setup, MSI-X vectors and device status. A device only
//! sees the [`VirtioDevice`] calls: what it offers, what the driver
//! accepted, config space accesses, and `activate` with ready queues once
//! the driver sets DRIVER_OK.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod idle_poll;
pub mod iommu;
pub mod pci;
pub mod poll_health;

/// Locks `m`, taking over a lock poisoned by a panicking holder: that panic
/// already ended the VMM's usefulness; keep serving rather than poisoning
/// every later access.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// virtio device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
}

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// How the device is told that the driver made buffers available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyMode {
    /// The transport registers an ioeventfd per queue and hands it to the
    /// device in [`ActiveQueue::notify`]; the device waits on it in its own
    /// thread.
    EventFd,
    /// The notify write exits to the vCPU thread that made it, and the
    /// transport calls [`VirtioDevice::queue_notify`] right there. For
    /// devices whose requests are cheap and latency-bound (the IOMMU: the
    /// guest spins until each reply), this skips a thread wake-up.
    Inline,
}

/// A queue the driver has enabled, handed to the device at activation.
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, configured with the driver's ring addresses and size.
    pub queue: Queue,
    /// Notify eventfd (registered with KVM as an ioeventfd) when the device
    /// asked for [`NotifyMode::EventFd`].
    pub notify: Option<EventFd>,
}

/// Sends the device's interrupts (MSI-X messages) to the guest.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that `queue` has new used entries.
    fn signal_queue(&self, queue: u16);
    /// Signals a configuration change.
    fn signal_config(&self);
    /// The device cannot go on without a reset (its ring was revoked):
    /// the transport sets DEVICE_NEEDS_RESET in the device status and
    /// signals a configuration change (virtio 1.2, 2.1.2). Never blocks:
    /// the IOMMU calls it while it executes an invalidation.
    fn needs_reset(&self);
}

/// Why activation failed (the transport sets NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block, 23 = IOMMU).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers (including transport bits such as
    /// VERSION_1 and ACCESS_PLATFORM).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of the offered ones);
    /// called once when the driver sets FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// How notifications reach the device.
    fn notify_mode(&self) -> NotifyMode {
        NotifyMode::EventFd
    }
    /// The driver set DRIVER_OK: start serving the enabled queues.
    fn activate(
        &mut self,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// A notify for `queue` in [`NotifyMode::Inline`] mode, on the vCPU
    /// thread that wrote the notify register.
    fn queue_notify(&mut self, _queue: u16) {}
    /// The driver reset the device (status 0): stop serving, forget the
    /// queues, return to the pre-activation state. Runs on a vCPU thread,
    /// so it must not wait for I/O or for pins: it starts the reset and
    /// returns whether it is already complete, i.e. no worker touches
    /// guest memory on the device's behalf any more. If not, the
    /// transport keeps the device status non-zero and polls
    /// [`VirtioDevice::reset_done`] each time the driver reads it.
    fn reset(&mut self) -> bool;
    /// Whether a reset that [`VirtioDevice::reset`] left in progress has
    /// completed (never blocks).
    fn reset_done(&mut self) -> bool {
        true
    }
}
