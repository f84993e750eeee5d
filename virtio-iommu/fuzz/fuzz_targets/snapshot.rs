//! The restore path (`VirtioIommu::restore`, which treats a state as
//! untrusted input) with arbitrary states: built field by field from the
//! input (mostly well-formed, so that validation is passed often, with
//! every kind of defect mixed in), or parsed from the input as JSON (the
//! serde format a VMM stores).
//!
//! - A refused state leaves the device exactly as fresh as it was.
//! - An accepted state is what the device then snapshots (up to the order
//!   of lists, the device's own configuration, and endpoints the state did
//!   not list, which stay unattached); that snapshot restores again onto a
//!   reset device and round-trips through JSON; a second restore is
//!   refused while domains exist.
//! - The restored device translates every restored mapping for every
//!   endpoint attached to its domain, with the mapping's permissions, and
//!   identity for bypass; then it serves arbitrary requests and translations
//!   without panicking, and a final request gets a reply.
//!
//! Two device configurations are fuzzed (the input's first byte picks one
//! and the mode); each has its own world, reset between inputs (see
//! `common`).

#![no_main]

mod common;

use std::cell::RefCell;

use common::{Input, Req, World};
use libfuzzer_sys::fuzz_target;
use virtio_iommu::state::{DomainState, EndpointState, IommuState, STATE_VERSION};
use virtio_iommu::{
    IommuConfig, Limits, MapFlags, Mapping, ReservedKind, ReservedRegion, Status, TranslateError,
};
use vm_memory::Permissions;

const NUM_EPS: u32 = 4;
const EP_REGION: ReservedRegion = ReservedRegion {
    start: 0x4000_0000,
    end: 0x4000_ffff,
    kind: ReservedKind::Reserved,
};
const CONFIGS: usize = 2;

fn config(variant: usize) -> IommuConfig {
    let limits = Limits {
        max_domains: 6,
        max_mappings_per_domain: 12,
        max_mappings_total: 24,
        max_pins_per_endpoint: 8,
        max_pending_faults: 8,
        ..Default::default()
    };
    match variant {
        0 => IommuConfig {
            limits,
            ..Default::default()
        },
        _ => IommuConfig {
            limits,
            address_width_bits: 48,
            page_size_mask: 0x1_0000 | 0x20_0000,
            domain_start: 10,
            domain_end: 20,
            bypass: true,
            offer_mmio: false,
            reserved_regions: vec![
                ReservedRegion::x86_msi(),
                ReservedRegion {
                    start: 0x1_0000_0000,
                    end: 0x1_ffff_ffff,
                    kind: ReservedKind::Reserved,
                },
            ],
            ..Default::default()
        },
    }
}

fn regions(id: u32) -> Vec<ReservedRegion> {
    if id == NUM_EPS - 1 {
        vec![EP_REGION]
    } else {
        Vec::new()
    }
}

struct Fuzz {
    w: World,
    /// What the device snapshots when fresh.
    fresh: IommuState,
    slot: u64,
}

/// Builds a state from the input: mostly well-formed, with defects.
struct Gen<'a, 'b> {
    input: &'a mut Input<'b>,
    config: &'a IommuConfig,
    offered: u64,
}

impl Gen<'_, '_> {
    /// Usually false: an occasional defect.
    fn rare(&mut self) -> Option<bool> {
        Some(self.input.u8()? >= 0xf0)
    }

    fn domain_id(&mut self) -> Option<u32> {
        let b = self.input.u8()?;
        Some(if b < 0xf8 {
            self.config.domain_start + u32::from(b % 8)
        } else {
            self.input.u32()?
        })
    }

    fn endpoint_id(&mut self) -> Option<u32> {
        let b = self.input.u8()?;
        Some(if b < 0xf8 {
            u32::from(b) % (NUM_EPS + 1)
        } else {
            self.input.u32()?
        })
    }

    fn flags(&mut self) -> Option<MapFlags> {
        let b = self.input.u8()?;
        let bits = match b {
            0..=239 => [1, 2, 3, 3, 7, 5, 0][usize::from(b) % 7],
            _ => self.input.u32()?,
        };
        // Unknown bits only come through deserialisation, as from a file.
        Some(MapFlags::from_bits(bits).unwrap_or_else(|| {
            serde_json::from_str(&bits.to_string()).expect("a u32 deserialises")
        }))
    }

    fn mappings(&mut self, n: usize) -> Option<Vec<Mapping>> {
        let g = self.config.granule();
        let mut cursor = match self.input.u8()? % 4 {
            0 => 0,
            1 => u64::from(self.input.u16()?) * g,
            // Towards the end of the input range.
            2 => self
                .config
                .input_end()
                .wrapping_sub((u64::from(self.input.u8()?) + 1) * g)
                .wrapping_add(1),
            _ => self.input.u64()?,
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let gap = u64::from(self.input.u8()? % 4) * g;
            let size = (u64::from(self.input.u8()? % 8) + 1) * g;
            let iova = cursor.wrapping_add(gap);
            let mut m = Mapping {
                iova,
                iova_end: iova.wrapping_add(size - 1),
                gpa: match self.input.u8()? % 3 {
                    0 => u64::from(self.input.u16()?) * g,
                    1 => 0u64.wrapping_sub(size),
                    _ => self.input.u64()?,
                },
                flags: self.flags()?,
            };
            if self.rare()? {
                match self.input.u8()? % 6 {
                    0 => m.iova = m.iova.wrapping_add(1),
                    1 => m.iova_end = m.iova.wrapping_sub(1),
                    2 => m.iova_end = u64::MAX,
                    3 => m.gpa = m.gpa.wrapping_add(self.input.u64()?),
                    4 => m.iova = m.iova.wrapping_sub(g), // overlap the previous one
                    _ => m.iova_end = self.input.u64()?,
                }
            }
            cursor = m.iova_end.wrapping_add(1);
            out.push(m);
        }
        // Any order: the device keeps them in IOVA order.
        if !out.is_empty() && self.input.u8()? % 4 == 0 {
            let k = usize::from(self.input.u8()?) % out.len();
            out.rotate_left(k);
        }
        Some(out)
    }

    fn state(&mut self) -> Option<IommuState> {
        let mut config = self.config.clone();
        if self.rare()? {
            match self.input.u8()? % 8 {
                0 => config.page_size_mask = self.input.u64()?,
                1 => config.address_width_bits = self.input.u8()?,
                2 => config.domain_end = self.input.u32()?,
                3 => config.probe_size = self.input.u32()?,
                4 => config.reserved_regions.push(EP_REGION),
                5 => config.reserved_regions.clear(),
                // Not part of what must match.
                6 => config.limits.max_domains = usize::from(self.input.u8()?),
                _ => config.bypass = !config.bypass,
            }
        }
        let version = if self.rare()? {
            self.input.u32()?
        } else {
            STATE_VERSION
        };
        let acked_features = match self.input.u8()? % 8 {
            0 => self.input.u64()? & self.offered,
            1 => self.input.u64()?,
            _ => self.offered,
        };
        let bypass = self.input.bool()?;
        let mut domains = Vec::new();
        for _ in 0..self.input.u8()? % 8 {
            let id = self.domain_id()?;
            let bypass = self.input.u8()? % 4 == 0;
            let n = if bypass && !self.rare()? {
                0
            } else {
                usize::from(self.input.u8()? % 15)
            };
            domains.push(DomainState {
                id,
                bypass,
                mappings: self.mappings(n)?,
            });
        }
        let mut endpoints = Vec::new();
        for _ in 0..self.input.u8()? % 7 {
            let id = self.endpoint_id()?;
            let b = self.input.u8()?;
            let domain = match b % 4 {
                0 => None,
                // Mostly a listed domain.
                _ if !domains.is_empty() && b < 0xf0 => {
                    Some(domains[usize::from(b) % domains.len()].id)
                }
                _ => Some(self.domain_id()?),
            };
            endpoints.push(EndpointState { id, domain });
        }
        Some(IommuState {
            version,
            acked_features,
            config,
            bypass,
            endpoints,
            domains,
        })
    }
}

/// What the device must snapshot after restoring `s`.
fn expected(s: &IommuState, config: &IommuConfig) -> IommuState {
    let endpoints = (0..NUM_EPS)
        .map(|id| EndpointState {
            id,
            domain: s
                .endpoints
                .iter()
                .find(|e| e.id == id)
                .and_then(|e| e.domain),
        })
        .collect();
    let mut domains = s.domains.clone();
    domains.sort_by_key(|d| d.id);
    for d in &mut domains {
        d.mappings.sort_by_key(|m| m.iova);
    }
    IommuState {
        version: STATE_VERSION,
        acked_features: s.acked_features,
        config: config.clone(),
        bypass: s.bypass,
        endpoints,
        domains,
    }
}

impl Fuzz {
    fn new(variant: usize) -> Self {
        let eps: Vec<_> = (0..NUM_EPS).map(|i| (i, regions(i))).collect();
        let w = World::new(config(variant), &eps);
        let fresh = w.dev.snapshot().unwrap();
        Fuzz { w, fresh, slot: 0 }
    }

    /// Sends a request and runs the queue; returns its status (every
    /// request here replies at once: no pin is ever held).
    fn request(&mut self, req: Req) -> u8 {
        let slot = self.slot;
        self.slot += 1;
        self.w.post(slot, req.bytes()).expect("queue has room");
        self.w.process();
        let (_, len) = self.w.pop_req().expect("a reply");
        assert_eq!(len, 4);
        assert!(self.w.pop_req().is_none());
        self.w.status(slot)
    }

    /// The restored device translates what the state says.
    fn check_translations(&self, s: &IommuState) {
        for e in &s.endpoints {
            let ep = &self.w.eps[e.id as usize];
            let Some(d) = e.domain else {
                let want = if s.bypass {
                    Ok(0x1234)
                } else {
                    Err(TranslateError::NotAttached)
                };
                let got = ep.translate(0x1234, 4, Permissions::ReadWrite);
                assert_eq!(got.map(|r| r.as_slice()[0].gpa), want, "endpoint {}", e.id);
                continue;
            };
            let d = s.domains.iter().find(|x| x.id == d).expect("validated");
            if d.bypass {
                assert!(ep.is_bypassed(), "endpoint {} in a bypass domain", e.id);
                continue;
            }
            for m in &d.mappings {
                for (iova, access) in [
                    (m.iova, Permissions::Read),
                    (m.iova_end, Permissions::Write),
                    (m.iova + (m.iova_end - m.iova) / 2, Permissions::ReadWrite),
                ] {
                    let want = if m.flags.allows(access) {
                        Ok(m.gpa + (iova - m.iova))
                    } else {
                        Err(TranslateError::Permission(iova))
                    };
                    let got = ep.translate(iova, 1, access);
                    assert_eq!(
                        got.map(|r| r.as_slice()[0].gpa),
                        want,
                        "endpoint {} {iova:#x} {access:?} in {m:?}",
                        e.id
                    );
                }
            }
        }
    }

    /// A few arbitrary requests and translations on the restored device.
    fn serve(&mut self, input: &mut Input, s: &IommuState) -> Option<()> {
        let g = self.w.dev.config().granule();
        let pick = |b: u8| -> u32 {
            if s.domains.is_empty() || b & 0x80 != 0 {
                u32::from(b % 32)
            } else {
                s.domains[usize::from(b) % s.domains.len()].id
            }
        };
        for _ in 0..8 {
            let op = input.u8()?;
            let domain = pick(input.u8()?);
            let ep = u32::from(input.u8()?) % (NUM_EPS + 1);
            let at = u64::from(input.u16()?) * g;
            let req = match op % 5 {
                0 => Req::attach(domain, ep, u32::from(input.u8()? % 2)),
                1 => Req::detach(domain, ep),
                2 => Req::map(domain, at, at + g - 1, at, 3),
                3 => Req::unmap(domain, at, at.wrapping_add(g * 4 - 1)),
                _ => {
                    let ep = &self.w.eps[ep as usize % self.w.eps.len()];
                    let len = u64::from(input.u16()?);
                    let _ = ep.translate(at, len, Permissions::Read);
                    let _ = vm_memory::Iommu::translate(
                        ep,
                        vm_memory::GuestAddress(at),
                        len as usize,
                        Permissions::Write,
                    );
                    continue;
                }
            };
            self.request(req);
        }
        Some(())
    }

    fn check(&mut self, mode: u8, input: &mut Input) {
        let config = self.w.dev.config().clone();
        let state = if mode < 0xe0 {
            let offered = self.w.dev.device_features();
            let mut g = Gen {
                input,
                config: &config,
                offered,
            };
            g.state()
        } else {
            // The serde format a VMM stores, from the input's bytes.
            let json = std::mem::take(&mut input.0);
            serde_json::from_slice(json).ok()
        };
        if let Some(state) = state {
            self.restore(&state, input);
        }
        self.w.reset();
        self.slot = 0;
    }

    fn restore(&mut self, state: &IommuState, input: &mut Input) {
        let config = self.w.dev.config().clone();
        if let Err(e) = self.w.dev.restore(state) {
            // Validated before anything changed.
            assert_eq!(
                self.w.dev.snapshot().unwrap(),
                self.fresh,
                "a refused restore ({e}) changed the device"
            );
            return;
        }
        let got = self.w.dev.snapshot().expect("nothing drains");
        let want = expected(state, &config);
        assert_eq!(got, want, "restored state");
        assert_eq!(self.w.dev.acked_features(), state.acked_features);
        self.check_translations(&got);
        // Restoring over restored domains is refused; with none it is a
        // restore onto a fresh device again.
        match self.w.dev.restore(state) {
            Err(e) => assert!(!got.domains.is_empty(), "second restore refused: {e}"),
            Ok(()) => assert!(got.domains.is_empty(), "restored twice"),
        }
        // The snapshot restores onto a reset device and round-trips
        // through JSON.
        let json = serde_json::to_vec(&got).unwrap();
        let back: IommuState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, got, "JSON round trip");
        assert!(self.w.dev.system_reset());
        self.w.dev.restore(&back).expect("a snapshot restores");
        assert_eq!(self.w.dev.snapshot().unwrap(), got, "snapshot round trip");
        // The restored device serves requests.
        let _ = self.serve(input, &got);
        let st = self.request(Req::attach(config.domain_start, 0, 0));
        assert!(
            Status::ALL.iter().any(|s| *s as u8 == st),
            "status {st:#x} of the final request"
        );
    }
}

thread_local! {
    static FUZZ: RefCell<[Option<Fuzz>; CONFIGS]> = const { RefCell::new([None, None]) };
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(b) = input.u8() else {
        return;
    };
    let v = usize::from(b & 1);
    FUZZ.with_borrow_mut(|f| {
        f[v].get_or_insert_with(|| Fuzz::new(v))
            .check(b, &mut input)
    });
});
