//! The virtio-iommu device: the `virtio-iommu` crate behind the transport.
//!
//! Linux maps and unmaps every DMA buffer with a request of its own (three
//! of each for a 4 KiB block read: header, data, status) and spins until
//! each reply is in the used ring, so what decides the guest-visible cost
//! is the latency from a request being made available to its reply. Two
//! ways to serve the request queue:
//!
//! - **Polling** (default, `poll` > 0): after a kick (an ioeventfd, no exit
//!   to this process), the device thread turns the driver's notifications
//!   off and polls the ring, serving each request as soon as it appears,
//!   until the queue has been idle for the polling window; then it turns
//!   notifications back on and sleeps. The window adapts between 50 µs
//!   and `poll` (see [`PollWindow`]) so that it spans the gap between the
//!   MAPs before a DMA and the UNMAPs after it: most requests then cost
//!   neither a VM exit nor a thread wake-up. The price is up to one host
//!   CPU busy for the window after each burst; `--iommu poll_us=0` turns
//!   polling off. Optionally ([`Iommu::set_idle_poll`]), after 50 µs
//!   without a request the thread polls at idle scheduling priority
//!   ([`IdlePoller`], with a watchdog against starvation), so that other
//!   threads never queue behind it.
//! - **Inline** (`poll` = 0): the notify write exits to the vCPU thread that
//!   made it ([`NotifyMode::Inline`]), which runs the queue right there.
//! - **Inline first** (`inline_first`, with polling): the kick exits to the
//!   vCPU, which serves the queue itself and then wakes the poller for the
//!   rest of the burst, unless the poller has been losing its CPU (a busy
//!   host: see [`super::poll_health`]); then every request is served
//!   inline until a later probe finds the poller running again.
//!
//! A request that must wait for in-flight DMA is parked by the crate; the
//! poller (or the vCPU, for a short budget) keeps checking its drain, and
//! otherwise the device thread completes it when the crate's drain eventfd
//! fires. The same thread delivers faults and calls the revoke hooks when
//! the grace period has passed; a vCPU that leaves a request parked always
//! wakes it (in every inline mode, backoff or not), so that it arms that
//! deadline.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_iommu::{EndpointHandle, IommuConfig, Metrics, VirtioIommu};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::idle_poll::IdlePoller;
use super::poll_health::{PollHealth, PreemptionDetector};
use super::{lock, ActivateError, ActiveQueue, NotifyMode, VirtioDevice, VirtioInterrupt};
use crate::fence::PageFencer;

/// Virtio device type of the IOMMU.
pub const VIRTIO_ID_IOMMU: u32 = 23;
pub use crate::config::DEFAULT_POLL;
const REQUEST_QUEUE: u16 = 0;
const EVENT_QUEUE: u16 = 1;
/// How long a vCPU thread spins for a parked request's drain before
/// leaving it to the event thread (inline mode). The guest spins for the
/// reply anyway.
const INLINE_DRAIN_BUDGET: Duration = Duration::from_micros(200);

const TOKEN_DRAIN: u64 = 0;
const TOKEN_FAULT: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_REQ_KICK: u64 = 3;
const TOKEN_EVT_KICK: u64 = 4;

/// State shared by the vCPU threads and the event thread.
struct Inner {
    dev: VirtioIommu,
    requests: Option<Queue>,
    events: Option<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

/// Read access to the device's domains (exit reports).
#[derive(Clone)]
pub struct IommuInspector(Arc<Mutex<Inner>>);

impl IommuInspector {
    /// Calls `f` with the domain endpoint `id` is attached to and that
    /// domain's mappings as `(iova, size)` (`None` while it is not
    /// attached). No request runs meanwhile, so `f` also sees every
    /// external mapper in the state that matches this domain.
    pub fn with_endpoint_domain<R>(
        &self,
        id: u32,
        f: impl FnOnce(Option<(u32, Vec<(u64, u64)>)>) -> R,
    ) -> R {
        let inner = lock(&self.0);
        let space = inner.dev.address_space();
        let d = space
            .attached_domain(id)
            .map(|dom| (dom, space.domain_mappings(dom).unwrap_or_default()));
        f(d)
    }
}

/// After the crate has worked on queue `index`: interrupts the driver if
/// used entries were added and the ring asks for it. Returns whether used
/// entries were added.
fn publish(
    q: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: Option<&Arc<dyn VirtioInterrupt>>,
    processed: Result<bool, virtio_iommu::Error>,
) -> bool {
    match processed {
        Ok(true) => {
            if q.needs_notification(mem).unwrap_or(true) {
                if let Some(i) = interrupt {
                    i.signal_queue(index);
                }
            }
            true
        }
        Ok(false) => false,
        Err(e) => {
            log::warn!("virtio-iommu: queue {index}: {e}");
            false
        }
    }
}

impl Inner {
    /// Runs the request queue; publishes what completed. Returns whether
    /// any reply was published. Linux gives its request queue no callback
    /// (it spins on the used ring), so the ring usually says no interrupt
    /// is needed: skipping it saves an injection per request.
    fn run_requests(&mut self, mem: &GuestMemoryMmap) -> bool {
        let Some(q) = self.requests.as_mut() else {
            return false;
        };
        let r = self.dev.process_requests(q, mem);
        publish(q, REQUEST_QUEUE, mem, self.interrupt.as_ref(), r)
    }

    /// Turns the driver's kicks for the request queue on or off. Turning
    /// them on returns whether requests arrived meanwhile (they would not
    /// be kicked).
    fn request_kicks(&mut self, mem: &GuestMemoryMmap, on: bool) -> bool {
        let Some(q) = self.requests.as_mut() else {
            return false;
        };
        if on {
            q.enable_notification(mem).unwrap_or(true)
        } else {
            let _ = q.disable_notification(mem);
            false
        }
    }

    /// Delivers pending fault records.
    fn run_events(&mut self, mem: &GuestMemoryMmap) {
        let Some(q) = self.events.as_mut() else {
            return;
        };
        let r = self.dev.process_events(q, mem);
        publish(q, EVENT_QUEUE, mem, self.interrupt.as_ref(), r);
    }
}

/// The virtio-iommu PCI function's device half.
pub struct Iommu {
    mem: GuestMemoryMmap,
    inner: Arc<Mutex<Inner>>,
    metrics: Arc<Metrics>,
    poll: Duration,
    idle_poll: bool,
    /// Kicks exit to the vCPU, which serves first (see the module docs).
    inline_first: bool,
    /// Whether the poller has its CPU (inline first only).
    health: Arc<PollHealth>,
    /// Wakes the event thread after an inline kick (whenever kicks are
    /// served inline): to poll for the rest of the burst, and to arm the
    /// revocation of a request left parked.
    poll_wake: Option<EventFd>,
    /// Takes pages from the guest when `fence_after` is configured.
    fencer: Option<Arc<PageFencer>>,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Iommu {
    /// A device with the crate's defaults for x86 (4 KiB pages, the MSI
    /// doorbell reserved, unattached endpoints blocked).
    /// Polls for up to [`DEFAULT_POLL`] after activity.
    pub fn new(mem: GuestMemoryMmap) -> Result<Self, virtio_iommu::Error> {
        Self::with_config(mem, IommuConfig::default(), DEFAULT_POLL)
    }

    /// A device with an explicit configuration and upper bound of the
    /// polling window (zero: no polling, requests run inline on the
    /// notifying vCPU).
    pub fn with_config(
        mem: GuestMemoryMmap,
        config: IommuConfig,
        poll: Duration,
    ) -> Result<Self, virtio_iommu::Error> {
        let dev = VirtioIommu::new(config)?;
        let metrics = dev.metrics();
        Ok(Iommu {
            mem,
            inner: Arc::new(Mutex::new(Inner {
                dev,
                requests: None,
                events: None,
                interrupt: None,
            })),
            metrics,
            poll,
            idle_poll: false,
            inline_first: false,
            health: PollHealth::new(),
            poll_wake: None,
            fencer: None,
            stop: None,
            thread: None,
        })
    }

    /// Registers endpoint `id` (the PCI requester ID of a device behind
    /// this IOMMU) and returns the handle its DMA translates through.
    pub fn add_endpoint(&mut self, id: u32) -> Result<EndpointHandle, String> {
        lock(&self.inner)
            .dev
            .add_endpoint(id)
            .map_err(|e| format!("endpoint {id:#x}: {e}"))
    }

    /// Registers endpoint `id` whose DMA is translated by someone else
    /// (a VFIO container): the domain's mappings are propagated to
    /// `mapper` before each reply.
    pub fn add_external_endpoint(
        &mut self,
        id: u32,
        mapper: Arc<dyn virtio_iommu::ExternalMapper>,
    ) -> Result<EndpointHandle, String> {
        lock(&self.inner)
            .dev
            .add_endpoint_with(
                id,
                virtio_iommu::EndpointOptions {
                    mapper: Some(mapper),
                    ..Default::default()
                },
            )
            .map_err(|e| format!("endpoint {id:#x}: {e}"))
    }

    /// A view of the device's domains for exit reports.
    pub fn inspector(&self) -> IommuInspector {
        IommuInspector(self.inner.clone())
    }

    /// Whether a quiet request queue is polled at idle priority (default
    /// off; see [`IdlePoller`]). Takes effect at the next activation.
    pub fn set_idle_poll(&mut self, on: bool) {
        self.idle_poll = on;
    }

    /// Whether kicks exit to the vCPU, which serves the queue before it
    /// wakes the poller (off unless set; the command line's
    /// `inline_first` defaults to on; see the module documentation). Has
    /// no effect without polling. Takes effect at the next activation.
    pub fn set_inline_first(&mut self, on: bool) {
        self.inline_first = on;
    }

    /// Fences the pages of DMA that still holds an invalidation at the
    /// crate's fence deadline (`IommuConfig::fence_after`); without a
    /// fencer, invalidations wait for the DMA however long it takes.
    /// Takes effect at the next activation.
    pub fn set_fencer(&mut self, fencer: PageFencer) {
        self.fencer = Some(Arc::new(fencer));
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    fn stop_thread(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The event thread: completes parked requests when their drain ends,
/// revokes overdue pins, and delivers faults.
fn event_loop(
    inner: Arc<Mutex<Inner>>,
    mem: GuestMemoryMmap,
    stop: EventFd,
    mut kicks: Kicks,
    fencer: Option<Arc<PageFencer>>,
) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("virtio-iommu: epoll: {e}");
            return;
        }
    };
    let (drain_fd, fault_fd) = {
        let g = lock(&inner);
        (
            g.dev.drain_eventfd().try_clone(),
            g.dev.fault_eventfd().try_clone(),
        )
    };
    let (Ok(drain_fd), Ok(fault_fd)) = (drain_fd, fault_fd) else {
        log::error!("virtio-iommu: cloning eventfds failed");
        return;
    };
    let mut fds = vec![
        (drain_fd.as_raw_fd(), TOKEN_DRAIN),
        (fault_fd.as_raw_fd(), TOKEN_FAULT),
        (stop.as_raw_fd(), TOKEN_STOP),
    ];
    if let Some(k) = &kicks.requests {
        fds.push((k.as_raw_fd(), TOKEN_REQ_KICK));
    }
    if let Some(k) = &kicks.events {
        fds.push((k.as_raw_fd(), TOKEN_EVT_KICK));
    }
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::error!("virtio-iommu: epoll_ctl: {e}");
            return;
        }
    }
    let mut events = [EpollEvent::default(); 5];
    // Created here: it manages the calling (this) thread's priority.
    let mut idle = if kicks.window.enabled() && kicks.idle_poll {
        IdlePoller::new()
    } else {
        IdlePoller::disabled()
    };
    // The parked drain whose holders were already asked to revoke: wait
    // for their release without spinning, and report if it takes long.
    let mut revoked: Option<(*const virtio_iommu::Drain, Instant)> = None;
    loop {
        let (drain, deadline, fence_at) = {
            let g = lock(&inner);
            let fence_at = fencer.as_ref().and_then(|_| g.dev.fence_deadline());
            (g.dev.parked_drain(), g.dev.revoke_deadline(), fence_at)
        };
        let drain_id = drain.as_ref().map(Arc::as_ptr);
        if revoked.is_some_and(|(id, _)| Some(id) != drain_id) {
            revoked = None;
        }
        let until = |t: Instant| {
            let left = t.saturating_duration_since(Instant::now());
            // Round up so that the deadline has passed on wake-up.
            i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        };
        let timeout_ms = match (deadline, revoked) {
            (None, _) => -1,
            (Some(_), Some(_)) => REPORT_INTERVAL_MS,
            (Some(d), None) => until(d),
        };
        let timeout_ms = match fence_at.map(until) {
            Some(f) if timeout_ms < 0 || f < timeout_ms => f,
            _ => timeout_ms,
        };
        let n = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-iommu: epoll_wait: {e}");
                return;
            }
        };
        let mut serve = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_DRAIN => {
                    let _ = drain_fd.read();
                    serve = true;
                }
                TOKEN_REQ_KICK => {
                    crate::trace::record(crate::trace::Event::IommuKick, 0);
                    kicks.window.kicked(Instant::now());
                    if let Some(k) = &kicks.requests {
                        let _ = k.read();
                    }
                    serve = true;
                }
                TOKEN_FAULT | TOKEN_EVT_KICK => {
                    let _ = fault_fd.read();
                    if let Some(k) = &kicks.events {
                        let _ = k.read();
                    }
                    lock(&inner).run_events(&mem);
                }
                _ => return,
            }
        }
        if serve {
            serve_requests(
                &inner,
                &mem,
                &mut kicks.window,
                &mut idle,
                kicks.preemption.as_mut(),
            );
        }
        let mut g = lock(&inner);
        let now = Instant::now();
        match (g.dev.parked_drain(), revoked) {
            (Some(d), None) if g.dev.revoke_deadline().is_some_and(|t| now >= t) => {
                let hooks = g.dev.revoke_overdue(now);
                log::warn!(
                    "virtio-iommu: invalidation waited {} ms for DMA; asked {hooks} of {} holders to revoke",
                    now.duration_since(d.started()).as_millis(),
                    d.blockers()
                );
                revoked = Some((Arc::as_ptr(&d), now));
            }
            (Some(d), Some((_, at))) if now.duration_since(at) >= REPORT_AFTER => {
                log::warn!(
                    "virtio-iommu: invalidation still waiting after {} ms for {} holders",
                    now.duration_since(d.started()).as_millis(),
                    d.blockers()
                );
                revoked = Some((Arc::as_ptr(&d), now));
            }
            _ => {}
        }
        if let Some(fencer) = &fencer {
            if g.dev.fence_deadline().is_some_and(|t| now >= t) {
                let fence = g.dev.fences_due(now);
                // Fencing holds the vCPUs, which may wait for this lock.
                drop(g);
                if let Some(fence) = fence {
                    run_fence(fencer, fence);
                }
            }
        }
    }
}

/// Takes the fence's pages from the guest and lets the invalidations it
/// holds reply; on failure they go on waiting for the DMA.
fn run_fence(fencer: &PageFencer, fence: virtio_iommu::Fence) {
    match fencer.fence(fence.ranges()) {
        Ok(f) => {
            fence.complete();
            log::warn!(
                "virtio-iommu: DMA the host cannot cancel still held an invalidation: \
                 fenced {} pages (vCPUs stopped in {} us, held {} us)",
                f.pages,
                f.stop.as_micros(),
                f.held.as_micros()
            );
        }
        Err(e) => {
            log::error!(
                "virtio-iommu: fence of {} pages failed ({e}); the invalidation waits for the \
                 DMA, and a fence is tried again later",
                fence.pages()
            );
            drop(fence);
        }
    }
}

/// The device thread's kick eventfds (polling mode) and polling window.
struct Kicks {
    requests: Option<EventFd>,
    events: Option<EventFd>,
    window: PollWindow,
    /// Poll a quiet queue at idle priority.
    idle_poll: bool,
    /// Inline first: stop polling when the poller keeps losing its CPU.
    preemption: Option<PreemptionDetector>,
}

/// How long the device thread keeps polling the request ring after its
/// last activity, adapted to the guest the way KVM adapts halt polling.
///
/// A strict-mode guest's MAP, block I/O and UNMAP come in bursts whose gaps
/// are the I/O time: a window shorter than the gap lets the thread fall
/// asleep just before the next burst, which then costs a VM exit and a
/// thread wake-up per burst (on the nested bed, also a wake-up on the
/// vCPU's own CPU that slows the guest for the rest of the burst). So:
/// when a kick arrives after the thread gave up but within `max` of the
/// last activity, a longer window would have caught it, and the window
/// grows to cover that gap; when the queue stays quiet for longer than
/// `max`, polling was wasted, and the window halves back towards `min`.
#[derive(Debug, Clone)]
pub struct PollWindow {
    min: Duration,
    max: Duration,
    current: Duration,
    /// When the thread last stopped polling, with the window it used.
    slept: Option<(Instant, Duration)>,
}

impl PollWindow {
    /// Shortest window the adaptation goes down to.
    pub const MIN: Duration = Duration::from_micros(50);

    /// A window that adapts between `min(MIN, max)` and `max`, starting at
    /// the bottom. A zero `max` means no polling.
    pub fn new(max: Duration) -> Self {
        let min = Self::MIN.min(max);
        PollWindow {
            min,
            max,
            current: min,
            slept: None,
        }
    }

    /// Whether the device polls at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// The window to poll for now.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The poller stops polling at `now` (the ring was quiet for the
    /// current window).
    pub fn slept(&mut self, now: Instant) {
        self.slept = Some((now, self.current));
    }

    /// The guest kicked at `now`; adapts the window to the quiet time
    /// since the last activity.
    pub fn kicked(&mut self, now: Instant) {
        let Some((at, window)) = self.slept.take() else {
            return;
        };
        let quiet = window + now.saturating_duration_since(at);
        self.current = if quiet <= self.max {
            // Cover this gap with a quarter to spare, and at least double.
            (quiet + quiet / 4).max(self.current * 2).min(self.max)
        } else {
            (self.current / 2).max(self.min)
        };
    }
}

/// Serves the request queue. With a polling window, keeps serving with
/// the driver's kicks turned off until the queue has been idle for the
/// window (a parked request counts as activity only within the window:
/// after it the drain eventfd takes over).
///
/// With idle-priority polling on, once the queue has been quiet for
/// [`PollWindow::MIN`] the rest of the window is polled at idle
/// scheduling priority ([`IdlePoller`]): a strict-mode guest's long gap is
/// the block I/O it just started, and the threads doing that I/O and
/// taking its interrupt should not wait behind a thread that is only
/// spinning in case a request comes.
fn serve_requests(
    inner: &Mutex<Inner>,
    mem: &GuestMemoryMmap,
    window: &mut PollWindow,
    idle: &mut IdlePoller,
    mut preemption: Option<&mut PreemptionDetector>,
) {
    let start = Instant::now();
    if !window.enabled()
        || preemption
            .as_ref()
            .is_some_and(|p| !p.polling_allowed(start))
    {
        lock(inner).run_requests(mem);
        return;
    }
    if let Some(p) = preemption.as_mut() {
        p.start(start);
    }
    lock(inner).request_kicks(mem, false);
    let mut last_activity = start;
    loop {
        let served = lock(inner).run_requests(mem);
        let now = Instant::now();
        let backed_off = preemption
            .as_mut()
            .and_then(|p| p.looked(now).then(|| p.backoffs()));
        if let Some(n) = backed_off {
            // The poller keeps losing its CPU: kicks back on, and the
            // vCPUs serve inline until the backoff ends.
            report_backoff(n);
            let missed = lock(inner).request_kicks(mem, true);
            if missed {
                lock(inner).run_requests(mem);
            }
            window.slept(now);
            idle.leave_idle();
            return;
        }
        if served {
            trace_served(inner);
            idle.served();
            last_activity = now;
        } else {
            let quiet = now.duration_since(last_activity);
            if quiet >= window.current() {
                // Kicks back on, then one more look: a request made available
                // before the driver saw the flag was not kicked.
                if !lock(inner).request_kicks(mem, true) {
                    crate::trace::record(crate::trace::Event::IommuSleep, 0);
                    window.slept(now);
                    // Sleep and wake at normal priority: the wake-up after a
                    // kick is the one the guest is spinning for.
                    idle.leave_idle();
                    return;
                }
                lock(inner).request_kicks(mem, false);
                last_activity = now;
            } else if quiet >= PollWindow::MIN {
                idle.enter_idle();
            }
        }
        idle.beat();
        std::hint::spin_loop();
    }
}

/// Says that polling backed off, at the 1st, 2nd, 4th, ... time (a busy
/// host can make it happen often).
fn report_backoff(n: u64) {
    if n.is_power_of_two() {
        log::info!(
            "virtio-iommu: the poller lost its CPU for more than half of {} ms of polling \
             ({n} backoffs so far): requests are served inline on the vCPUs for a while",
            super::poll_health::EVAL_PERIOD.as_millis()
        );
    }
}

/// Records how many MAPs and UNMAPs have completed so far.
fn trace_served(inner: &Mutex<Inner>) {
    use virtio_iommu::Status;
    if !crate::trace::enabled() {
        return;
    }
    const MAP: u8 = 3;
    const UNMAP: u8 = 4;
    let m = lock(inner).dev.metrics();
    crate::trace::record(
        crate::trace::Event::IommuServed,
        (m.requests(MAP, Status::Ok) << 32) | (m.requests(UNMAP, Status::Ok) & 0xffff_ffff),
    );
}

/// While a revoked drain is still pending, wake up this often...
const REPORT_INTERVAL_MS: i32 = 500;
/// ...and say so at most this often.
const REPORT_AFTER: Duration = Duration::from_secs(2);

impl VirtioDevice for Iommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        lock(&self.inner).dev.queue_max_sizes().to_vec()
    }

    fn device_features(&self) -> u64 {
        lock(&self.inner).dev.device_features()
    }

    fn ack_features(&mut self, features: u64) {
        lock(&self.inner).dev.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.inner).dev.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.inner).dev.write_config(offset, data);
    }

    fn notify_mode(&self) -> NotifyMode {
        if self.poll.is_zero() || self.inline_first {
            NotifyMode::Inline
        } else {
            NotifyMode::EventFd
        }
    }

    fn activate(
        &mut self,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_thread();
        let inline_first = self.inline_first && !self.poll.is_zero();
        let mut kicks = Kicks {
            requests: None,
            events: None,
            window: PollWindow::new(self.poll),
            idle_poll: self.idle_poll,
            preemption: inline_first.then(|| PreemptionDetector::new(self.health.clone())),
        };
        self.poll_wake = None;
        if self.notify_mode() == NotifyMode::Inline {
            // The vCPU's kick, passed on to the event thread after the
            // vCPU has served (`queue_notify`).
            let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| ActivateError(e.to_string()))?;
            kicks.requests = Some(wake.try_clone().map_err(|e| ActivateError(e.to_string()))?);
            self.poll_wake = Some(wake);
        }
        {
            let mut g = lock(&self.inner);
            for q in queues {
                match q.index {
                    REQUEST_QUEUE => {
                        g.requests = Some(q.queue);
                        if q.notify.is_some() {
                            kicks.requests = q.notify;
                        }
                    }
                    EVENT_QUEUE => {
                        g.events = Some(q.queue);
                        kicks.events = q.notify;
                    }
                    i => return Err(ActivateError(format!("no queue {i}"))),
                }
            }
            if g.requests.is_none() {
                return Err(ActivateError("request queue not enabled".into()));
            }
            g.interrupt = Some(interrupt);
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| ActivateError(e.to_string()))?;
        let stop2 = stop.try_clone().map_err(|e| ActivateError(e.to_string()))?;
        let inner = self.inner.clone();
        let mem = self.mem.clone();
        let fencer = self.fencer.clone();
        let t = std::thread::Builder::new()
            .name("virtio-iommu".into())
            .spawn(move || {
                event_loop(inner, mem, stop2, kicks, fencer);
                crate::trace::thread_exit();
            })
            .map_err(|e| ActivateError(e.to_string()))?;
        self.stop = Some(stop);
        self.thread = Some(t);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        let mut g = lock(&self.inner);
        match queue {
            REQUEST_QUEUE => {
                g.run_requests(&self.mem);
                // A parked invalidation: the guest spins for its reply, so
                // spin a little here too before leaving it to the event
                // thread.
                if g.dev.parked_drain().is_some() && g.dev.poll_parked(INLINE_DRAIN_BUDGET) {
                    g.run_requests(&self.mem);
                }
                let parked = g.dev.parked_drain().is_some();
                drop(g);
                // The event thread takes a request left parked (it arms
                // the revocation after the grace period, also when nothing
                // polls) and, inline first, the rest of the burst, unless
                // the poller has been losing its CPU.
                let polling = !self.poll.is_zero() && self.health.polling_allowed(Instant::now());
                if let Some(w) = &self.poll_wake {
                    if parked || polling {
                        let _ = w.write(1);
                    }
                }
            }
            EVENT_QUEUE => g.run_events(&self.mem),
            _ => {}
        }
    }

    fn reset(&mut self) -> bool {
        // The event thread ends within one poll or epoll round; the crate's
        // reset never waits for pins (reset_done polls their drain).
        self.stop_thread();
        let mut g = lock(&self.inner);
        let done = g.dev.reset();
        g.requests = None;
        g.events = None;
        g.interrupt = None;
        done
    }

    fn reset_done(&mut self) -> bool {
        !lock(&self.inner).dev.reset_pending()
    }
}

impl Drop for Iommu {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use virtio_iommu::protocol::req_type;
    use virtio_iommu::testing::{attach_body, map_body, place_request, unmap_body, TestDriver};
    use vm_memory::{Bytes, GuestAddress, Permissions};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    struct NoInterrupt;

    impl VirtioInterrupt for NoInterrupt {
        fn signal_queue(&self, _: u16) {}
        fn signal_config(&self) {}
        fn needs_reset(&self) {}
    }

    /// Makes a request available and notifies the request queue, as the
    /// vCPU does; returns the status byte if a reply was published.
    fn request(
        iommu: &mut Iommu,
        driver: &mut TestDriver,
        mem: &GuestMemoryMmap,
        type_: u8,
        body: &[u8],
    ) -> Option<u8> {
        let (req, tail) = (GuestAddress(0x10_0000), GuestAddress(0x10_1000));
        driver
            .add(mem, &place_request(mem, req, tail, type_, body))
            .unwrap();
        iommu.queue_notify(REQUEST_QUEUE);
        driver.pop_used(mem)?;
        Some(mem.read_obj(tail).unwrap())
    }

    /// With every request inline (`poll_us=0`: no poller), an UNMAP that
    /// parks on a vCPU is still revoked by the event thread after the
    /// grace period (the vCPU never waits for it). Without the vCPU's
    /// wake-up the thread slept with no deadline and never revoked it.
    #[test]
    fn a_request_parked_inline_is_revoked_after_the_grace_without_a_poller() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let config = IommuConfig {
            revoke_grace: 20 * MS,
            ..IommuConfig::default()
        };
        let mut iommu = Iommu::with_config(mem.clone(), config, Duration::ZERO).unwrap();
        assert_eq!(iommu.notify_mode(), NotifyMode::Inline);
        let ep = iommu.add_endpoint(8).unwrap();
        let features = iommu.device_features();
        iommu.ack_features(features);
        let mut driver = TestDriver::new(&mem, GuestAddress(0), 256);
        let queue = ActiveQueue {
            index: REQUEST_QUEUE,
            queue: driver.queue(),
            notify: None,
        };
        iommu.activate(vec![queue], Arc::new(NoInterrupt)).unwrap();
        let attach = attach_body(1, 8, 0);
        assert_eq!(
            request(&mut iommu, &mut driver, &mem, req_type::ATTACH, &attach),
            Some(0)
        );
        let map = map_body(1, 0x1000, 0x1fff, 0x40_0000, 3);
        assert_eq!(
            request(&mut iommu, &mut driver, &mem, req_type::MAP, &map),
            Some(0)
        );
        let revoked = Arc::new(AtomicBool::new(false));
        let hook = {
            let revoked = revoked.clone();
            Arc::new(move || revoked.store(true, Ordering::SeqCst))
        };
        let pin = ep
            .pin_revocable(0x1000, 0x100, Permissions::Write, hook)
            .unwrap();
        let unmap = unmap_body(1, 0x1000, 0x1fff);
        assert_eq!(
            request(&mut iommu, &mut driver, &mem, req_type::UNMAP, &unmap),
            None
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !revoked.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the parked UNMAP was never revoked"
            );
            std::thread::sleep(MS);
        }
        drop(pin);
        iommu.reset();
    }

    #[test]
    fn window_grows_to_cover_a_gap_it_missed() {
        let mut w = PollWindow::new(10 * MS);
        assert_eq!(w.current(), PollWindow::MIN);
        let t0 = Instant::now();
        // Quiet for the window, asleep for 2.95 ms more: a 3 ms gap.
        w.slept(t0);
        w.kicked(t0 + 3 * MS - PollWindow::MIN);
        assert_eq!(w.current(), 3 * MS + 3 * MS / 4, "gap plus a quarter");
        // A gap the window covered is not seen here (no sleep, no kick).
        // Missing again by a little still at least doubles.
        let t1 = t0 + 100 * MS;
        w.slept(t1);
        w.kicked(t1 + MS / 10);
        assert_eq!(w.current(), 2 * (3 * MS + 3 * MS / 4));
        // Never beyond the bound: a 9 ms gap (7.5 ms polled, 1.5 asleep).
        let t2 = t1 + 100 * MS;
        w.slept(t2);
        w.kicked(t2 + 3 * MS / 2);
        assert_eq!(w.current(), 10 * MS);
    }

    #[test]
    fn window_shrinks_after_quiet_longer_than_the_bound() {
        let mut w = PollWindow::new(10 * MS);
        let t0 = Instant::now();
        w.slept(t0);
        w.kicked(t0 + 5 * MS);
        let grown = w.current();
        assert!(grown > 5 * MS);
        let t1 = t0 + 100 * MS;
        w.slept(t1);
        w.kicked(t1 + 50 * MS);
        assert_eq!(w.current(), grown / 2);
        for i in 2..20 {
            let t = t0 + i * 100 * MS;
            w.slept(t);
            w.kicked(t + 50 * MS);
        }
        assert_eq!(
            w.current(),
            PollWindow::MIN,
            "down to the minimum, not below"
        );
    }

    #[test]
    fn kick_without_sleep_changes_nothing_and_zero_disables() {
        let mut w = PollWindow::new(10 * MS);
        w.kicked(Instant::now());
        assert_eq!(w.current(), PollWindow::MIN);
        let off = PollWindow::new(Duration::ZERO);
        assert!(!off.enabled());
        assert!(w.enabled());
        // A bound below the minimum is the window.
        let small = PollWindow::new(Duration::from_micros(20));
        assert_eq!(small.current(), Duration::from_micros(20));
    }
}
