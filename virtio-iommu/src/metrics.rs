//! Counters a VMM can expose: requests by type and status, faults, drains
//! and their wait times, revocations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::protocol::Status;

/// Request type names, indexed by the request type byte (0: unknown type).
pub const REQUEST_NAMES: [&str; 6] = ["unknown", "attach", "detach", "map", "unmap", "probe"];

const BUCKETS: usize = 40;

/// A latency histogram with power-of-two microsecond buckets and exact
/// minimum, maximum and sum.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1000;
        let b = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.count.load(Ordering::Relaxed);
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        // The median is reported as the upper bound of its bucket.
        let mut median_us = 0;
        let mut seen = 0;
        for (i, &n) in buckets.iter().enumerate() {
            seen += n;
            if count > 0 && seen * 2 >= count {
                median_us = if i == 0 { 0 } else { 1u64 << i };
                break;
            }
        }
        HistogramSnapshot {
            count,
            min_us: if count == 0 {
                0
            } else {
                self.min_ns.load(Ordering::Relaxed) / 1000
            },
            median_us_upper: median_us,
            max_us: self.max_ns.load(Ordering::Relaxed) / 1000,
            mean_us: self
                .sum_ns
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0)
                / 1000,
        }
    }
}

/// Reported view of a [`Histogram`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HistogramSnapshot {
    /// Samples.
    pub count: u64,
    /// Smallest sample, microseconds.
    pub min_us: u64,
    /// Upper bound of the bucket holding the median, microseconds.
    pub median_us_upper: u64,
    /// Largest sample, microseconds.
    pub max_us: u64,
    /// Mean, microseconds.
    pub mean_us: u64,
}

/// Device counters. All updates are relaxed atomics: cheap, never blocking.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; 9]; 6],
    /// Chains returned with used length 0 (unparsable, unknown type).
    pub malformed: AtomicU64,
    /// Fault records queued for the event queue.
    pub faults_reported: AtomicU64,
    /// Fault records dropped because the queue was full.
    pub faults_dropped: AtomicU64,
    /// Fault records written into event buffers.
    pub faults_delivered: AtomicU64,
    /// Invalidations that had to wait for in-flight DMA.
    pub drains: AtomicU64,
    /// How long those waits took.
    pub drain_wait: Histogram,
    /// Revoke hooks called.
    pub revocations: AtomicU64,
    /// Leased queue areas closed by an invalidation.
    pub areas_revoked: AtomicU64,
    /// External mapper (VFIO) failures.
    pub mapper_errors: AtomicU64,
    /// Fences completed (pages of uncancellable DMA taken from the guest).
    pub fences: AtomicU64,
    /// Guest pages those fences took.
    pub pages_fenced: AtomicU64,
    /// Fences the VMM could not complete (their invalidations went on
    /// waiting for the DMA).
    pub fence_failures: AtomicU64,
    /// How long completed fences took, from hand-over to completion.
    pub fence_time: Histogram,
}

impl Metrics {
    /// Counts one request of raw type `type_` that completed with `status`.
    pub fn count_request(&self, type_: u8, status: Status) {
        let t = if (1..=5).contains(&type_) {
            usize::from(type_)
        } else {
            0
        };
        self.requests[t][status as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of raw type `type_` that completed with `status`.
    pub fn requests(&self, type_: u8, status: Status) -> u64 {
        let t = if (1..=5).contains(&type_) {
            usize::from(type_)
        } else {
            0
        };
        self.requests[t][status as usize].load(Ordering::Relaxed)
    }

    /// A serialisable copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut requests = Vec::new();
        for (t, row) in self.requests.iter().enumerate() {
            for s in Status::ALL {
                let n = row[s as usize].load(Ordering::Relaxed);
                if n > 0 {
                    requests.push(RequestCount {
                        request: REQUEST_NAMES[t],
                        status: s.name(),
                        count: n,
                    });
                }
            }
        }
        MetricsSnapshot {
            requests,
            malformed: self.malformed.load(Ordering::Relaxed),
            faults_reported: self.faults_reported.load(Ordering::Relaxed),
            faults_dropped: self.faults_dropped.load(Ordering::Relaxed),
            faults_delivered: self.faults_delivered.load(Ordering::Relaxed),
            drains: self.drains.load(Ordering::Relaxed),
            drain_wait: self.drain_wait.snapshot(),
            revocations: self.revocations.load(Ordering::Relaxed),
            areas_revoked: self.areas_revoked.load(Ordering::Relaxed),
            mapper_errors: self.mapper_errors.load(Ordering::Relaxed),
            fences: self.fences.load(Ordering::Relaxed),
            pages_fenced: self.pages_fenced.load(Ordering::Relaxed),
            fence_failures: self.fence_failures.load(Ordering::Relaxed),
            fence_time: self.fence_time.snapshot(),
        }
    }
}

/// One (request type, status) counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    /// Request type name.
    pub request: &'static str,
    /// Status name.
    pub status: &'static str,
    /// Number of requests.
    pub count: u64,
}

/// A copy of all counters, for printing or export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// Non-zero request counters.
    pub requests: Vec<RequestCount>,
    /// Chains returned with used length 0.
    pub malformed: u64,
    /// Faults queued.
    pub faults_reported: u64,
    /// Faults dropped.
    pub faults_dropped: u64,
    /// Faults written to the event queue.
    pub faults_delivered: u64,
    /// Invalidations that waited for DMA.
    pub drains: u64,
    /// Drain wait times.
    pub drain_wait: HistogramSnapshot,
    /// Revoke hooks called.
    pub revocations: u64,
    /// Leased queue areas closed by an invalidation.
    pub areas_revoked: u64,
    /// External mapper failures.
    pub mapper_errors: u64,
    /// Fences completed.
    pub fences: u64,
    /// Guest pages fenced.
    pub pages_fenced: u64,
    /// Fences not completed.
    pub fence_failures: u64,
    /// Fence times.
    pub fence_time: HistogramSnapshot,
}

impl std::fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "virtio-iommu metrics:")?;
        for r in &self.requests {
            writeln!(f, "  requests {} {}: {}", r.request, r.status, r.count)?;
        }
        writeln!(f, "  malformed chains: {}", self.malformed)?;
        writeln!(
            f,
            "  faults reported/delivered/dropped: {}/{}/{}",
            self.faults_reported, self.faults_delivered, self.faults_dropped
        )?;
        writeln!(
            f,
            "  drains: {} wait_us min/median<=/max/mean: {}/{}/{}/{}",
            self.drains,
            self.drain_wait.min_us,
            self.drain_wait.median_us_upper,
            self.drain_wait.max_us,
            self.drain_wait.mean_us
        )?;
        writeln!(f, "  revocations: {}", self.revocations)?;
        writeln!(f, "  queue areas revoked: {}", self.areas_revoked)?;
        writeln!(f, "  mapper errors: {}", self.mapper_errors)?;
        write!(
            f,
            "  fences: {} pages: {} failed: {} time_us min/median<=/max: {}/{}/{}",
            self.fences,
            self.pages_fenced,
            self.fence_failures,
            self.fence_time.min_us,
            self.fence_time.median_us_upper,
            self.fence_time.max_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_tracks_min_median_max() {
        let h = Histogram::default();
        for us in [1, 2, 3, 100, 5000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.min_us, 1);
        assert_eq!(s.max_us, 5000);
        assert!(s.median_us_upper >= 3 && s.median_us_upper <= 4, "{s:?}");
    }

    #[test]
    fn request_counters_by_type_and_status() {
        let m = Metrics::default();
        m.count_request(3, Status::Ok);
        m.count_request(3, Status::Ok);
        m.count_request(200, Status::Unsupp);
        assert_eq!(m.requests(3, Status::Ok), 2);
        assert_eq!(m.requests(0, Status::Unsupp), 1);
        let s = m.snapshot();
        assert_eq!(s.requests.len(), 2);
        assert!(s.to_string().contains("requests map S_OK: 2"));
    }
}
