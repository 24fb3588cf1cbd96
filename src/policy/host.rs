//! The host side of `wit/policy.wit`: what a policy learns through host
//! calls, answered from the call's members without copying them.

use std::sync::Arc;

use http::HeaderMap;
use wasmtime::StoreLimits;

use crate::balance::{HiddenHeaders, RouteOptions};
use crate::members::{Member, Members};
use crate::upstream::CheckedHealth;

wasmtime::component::bindgen!({
    path: "wit",
    world: "balancer",
});

pub use self::weir::policy::backends::{HealthState, Load};

/// The call a pick is about. Filled before `pick`, cleared after; its
/// buffers are reused from call to call.
#[derive(Default)]
pub struct CallView {
    pub members: Option<Arc<Members>>,
    /// Candidates, as positions in `members` (ascending); empty when `all`.
    pub candidates: Vec<u32>,
    /// Every member is a candidate (the usual case): candidate i is member
    /// i, and nothing was copied.
    pub all: bool,
    pub service: Arc<str>,
    pub method: String,
    /// Only set for policies that import the `call` interface.
    pub headers: Option<Arc<HeaderMap>>,
    /// The route's options; only set for policies that import `call`.
    pub options: Option<Arc<RouteOptions>>,
    /// Headers `call.header` does not answer for.
    pub hidden_headers: Option<Arc<HiddenHeaders>>,
}

/// A policy instance's store data.
pub struct HostState {
    pub limits: StoreLimits,
    pub call: CallView,
    pub policy: Arc<str>,
    pub zone: Option<Arc<str>>,
    /// What the policy's WASI imports keep (output lines, timers).
    pub wasi: super::wasi::WasiState,
}

impl HostState {
    fn member(&self, index: u32) -> Option<&Member> {
        let members = self.call.members.as_ref()?;
        members.list.get(self.call.position(index)?).map(|m| &**m)
    }
}

impl CallView {
    pub fn count(&self) -> u32 {
        match (&self.members, self.all) {
            (Some(m), true) => m.len() as u32,
            _ => self.candidates.len() as u32,
        }
    }

    /// The member position of candidate `index`.
    fn position(&self, index: u32) -> Option<usize> {
        if self.all {
            return Some(index as usize);
        }
        self.candidates.get(index as usize).map(|&p| p as usize)
    }
}

impl self::weir::policy::backends::Host for HostState {
    fn count(&mut self) -> u32 {
        self.call.count()
    }

    fn address(&mut self, index: u32) -> String {
        self.member(index)
            .map(|m| m.endpoint.addr.to_string())
            .unwrap_or_default()
    }

    fn weight(&mut self, index: u32) -> u32 {
        self.member(index).map_or(0, |m| m.endpoint.weight)
    }

    fn weights(&mut self) -> Vec<u32> {
        (0..self.call.count()).map(|i| self.weight(i)).collect()
    }

    fn metadata(&mut self, index: u32, key: String) -> Option<String> {
        self.member(index)?.endpoint.metadata.get(&key).cloned()
    }

    fn health(&mut self, index: u32) -> HealthState {
        match self.member(index).map(|m| m.backend.health()) {
            Some(CheckedHealth::Serving) => HealthState::Serving,
            Some(CheckedHealth::NotServing) => HealthState::NotServing,
            _ => HealthState::Unknown,
        }
    }

    fn lease_ttl_ms(&mut self, index: u32) -> Option<i64> {
        self.member(index)?.endpoint.lease.as_ref()?.remaining_ms()
    }

    fn active_requests(&mut self, index: u32) -> u32 {
        self.member(index).map_or(0, |m| m.backend.load.active())
    }

    fn latency_ewma_us(&mut self, index: u32) -> u32 {
        self.member(index)
            .map_or(0, |m| m.backend.load.latency_ewma_us())
    }

    fn load_of(&mut self, index: u32) -> Load {
        self.member(index).map_or(
            Load {
                active_requests: 0,
                latency_ewma_us: 0,
                weight: 0,
            },
            |m| Load {
                active_requests: m.backend.load.active(),
                latency_ewma_us: m.backend.load.latency_ewma_us(),
                weight: m.endpoint.weight,
            },
        )
    }

    fn generation(&mut self) -> u64 {
        self.call.members.as_ref().map_or(0, |m| m.generation())
    }

    fn total(&mut self) -> u32 {
        self.call.members.as_ref().map_or(0, |m| m.len() as u32)
    }

    fn total_address(&mut self, index: u32) -> String {
        let Some(members) = self.call.members.as_ref() else {
            return String::new();
        };
        members
            .list
            .get(index as usize)
            .map(|m| m.endpoint.addr.to_string())
            .unwrap_or_default()
    }

    fn candidate_of(&mut self, total_index: u32) -> Option<u32> {
        if self.call.all {
            return (total_index < self.call.count()).then_some(total_index);
        }
        // Candidates are positions in the set, in ascending order.
        self.call
            .candidates
            .binary_search(&total_index)
            .ok()
            .map(|i| i as u32)
    }

    fn set_index(&mut self, index: u32) -> u32 {
        if index >= self.call.count() {
            return u32::MAX;
        }
        self.call.position(index).map_or(u32::MAX, |p| p as u32)
    }

    fn set_indices(&mut self) -> Vec<u32> {
        if self.call.all {
            return (0..self.call.count()).collect();
        }
        self.call.candidates.clone()
    }
}

impl self::weir::policy::call::Host for HostState {
    fn service(&mut self) -> String {
        self.call.service.to_string()
    }

    fn method(&mut self) -> String {
        self.call.method.clone()
    }

    fn header(&mut self, name: String) -> Option<String> {
        let name = name.to_ascii_lowercase();
        if self.call.hidden_headers.as_ref()?.hides(&name) {
            return None; // credentials, or hidden by the route
        }
        let value = self.call.headers.as_ref()?.get(name)?;
        value.to_str().ok().map(str::to_owned)
    }

    fn route_option(&mut self, key: String) -> Option<String> {
        self.call.options.as_ref()?.get(&key).cloned()
    }
}

impl self::weir::policy::env::Host for HostState {
    fn random(&mut self) -> u64 {
        rand::random()
    }

    fn now_ms(&mut self) -> u64 {
        super::wasi::monotonic_ns() / 1_000_000
    }

    fn log(&mut self, level: u8, message: String) {
        let message: String = message.chars().take(1024).collect();
        match level {
            0 => tracing::error!(policy = %self.policy, "{message}"),
            1 => tracing::warn!(policy = %self.policy, "{message}"),
            2 => tracing::info!(policy = %self.policy, "{message}"),
            _ => tracing::debug!(policy = %self.policy, "{message}"),
        }
    }

    fn zone(&mut self) -> Option<String> {
        self.zone.as_deref().map(str::to_owned)
    }
}

/// Links the host side of every `weir:policy` version weir serves: 0.2 (the
/// current `wit/`) and 0.1.0 (frozen), so a component built against either
/// links.
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    Balancer::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v0_1::Balancer::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
}

/// `weir:policy@0.1.0`: the same interfaces as 0.2 under the old package
/// version. Each call is answered by the 0.2 host; only the generated
/// record and enum types differ.
mod v0_1 {
    use super::weir::policy as now;
    use super::HostState;

    wasmtime::component::bindgen!({
        path: "src/policy/wit-0.1.0",
        world: "balancer",
    });

    use self::weir::policy::backends::{HealthState, Load};

    impl self::weir::policy::backends::Host for HostState {
        fn count(&mut self) -> u32 {
            now::backends::Host::count(self)
        }
        fn address(&mut self, index: u32) -> String {
            now::backends::Host::address(self, index)
        }
        fn weight(&mut self, index: u32) -> u32 {
            now::backends::Host::weight(self, index)
        }
        fn weights(&mut self) -> Vec<u32> {
            now::backends::Host::weights(self)
        }
        fn metadata(&mut self, index: u32, key: String) -> Option<String> {
            now::backends::Host::metadata(self, index, key)
        }
        fn health(&mut self, index: u32) -> HealthState {
            match now::backends::Host::health(self, index) {
                now::backends::HealthState::Serving => HealthState::Serving,
                now::backends::HealthState::NotServing => HealthState::NotServing,
                now::backends::HealthState::Unknown => HealthState::Unknown,
            }
        }
        fn lease_ttl_ms(&mut self, index: u32) -> Option<i64> {
            now::backends::Host::lease_ttl_ms(self, index)
        }
        fn active_requests(&mut self, index: u32) -> u32 {
            now::backends::Host::active_requests(self, index)
        }
        fn latency_ewma_us(&mut self, index: u32) -> u32 {
            now::backends::Host::latency_ewma_us(self, index)
        }
        fn load_of(&mut self, index: u32) -> Load {
            let load = now::backends::Host::load_of(self, index);
            Load {
                active_requests: load.active_requests,
                latency_ewma_us: load.latency_ewma_us,
                weight: load.weight,
            }
        }
        fn generation(&mut self) -> u64 {
            now::backends::Host::generation(self)
        }
        fn total(&mut self) -> u32 {
            now::backends::Host::total(self)
        }
        fn total_address(&mut self, index: u32) -> String {
            now::backends::Host::total_address(self, index)
        }
        fn candidate_of(&mut self, total_index: u32) -> Option<u32> {
            now::backends::Host::candidate_of(self, total_index)
        }
        fn set_index(&mut self, index: u32) -> u32 {
            now::backends::Host::set_index(self, index)
        }
        fn set_indices(&mut self) -> Vec<u32> {
            now::backends::Host::set_indices(self)
        }
    }

    impl self::weir::policy::call::Host for HostState {
        fn service(&mut self) -> String {
            now::call::Host::service(self)
        }
        fn method(&mut self) -> String {
            now::call::Host::method(self)
        }
        fn header(&mut self, name: String) -> Option<String> {
            now::call::Host::header(self, name)
        }
        fn route_option(&mut self, key: String) -> Option<String> {
            now::call::Host::route_option(self, key)
        }
    }

    impl self::weir::policy::env::Host for HostState {
        fn random(&mut self) -> u64 {
            now::env::Host::random(self)
        }
        fn now_ms(&mut self) -> u64 {
            now::env::Host::now_ms(self)
        }
        fn log(&mut self, level: u8, message: String) {
            now::env::Host::log(self, level, message)
        }
        fn zone(&mut self) -> Option<String> {
            now::env::Host::zone(self)
        }
    }
}
