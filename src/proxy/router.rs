//! Routes: a gRPC path (a full method, or a `/pkg.Service/` prefix) to a
//! service and a policy. A path no route matches goes to the service named
//! after its gRPC service (`pkg.Service`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::balance::{Balancer, HiddenHeaders, RouteOptions};
use crate::config::RouteConfig;

use super::services::{ServiceRuntime, ServiceRuntimes};

pub struct Route {
    pub matched: Arc<str>,
    /// The name of the route's policy (its balancer's), for the access log.
    pub policy: Arc<str>,
    pub service: Arc<ServiceRuntime>,
    pub balancer: Arc<dyn Balancer>,
    pub retries: u32,
    pub idempotent: bool,
    pub options: Arc<RouteOptions>,
    pub hidden_headers: Arc<HiddenHeaders>,
    /// The longest a call without `grpc-timeout` may last.
    pub max_duration: Option<std::time::Duration>,
    /// Overrides the gateway's stream idle timeout.
    pub stream_idle_timeout: Option<std::time::Duration>,
}

pub struct Router {
    exact: HashMap<String, Arc<Route>>,
    /// Longest prefix first.
    prefixes: Vec<Arc<Route>>,
}

impl Router {
    pub fn new(
        routes: &[RouteConfig],
        services: &ServiceRuntimes,
        balancer: impl Fn(&RouteConfig) -> Arc<dyn Balancer>,
    ) -> Router {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        for r in routes {
            let balancer = balancer(r);
            let route = Arc::new(Route {
                matched: r.path.as_str().into(),
                policy: balancer.name().into(),
                service: services.create(&r.service),
                balancer,
                retries: r.retries,
                idempotent: r.idempotent,
                options: Arc::new(r.options.clone()),
                hidden_headers: Arc::new(HiddenHeaders::for_route(
                    &r.hide_headers,
                    &r.expose_headers,
                )),
                max_duration: r.max_duration,
                stream_idle_timeout: r.stream_idle_timeout,
            });
            if r.path.ends_with('/') {
                prefixes.push(route);
            } else {
                exact.insert(r.path.clone(), route);
            }
        }
        prefixes.sort_by_key(|r| std::cmp::Reverse(r.matched.len()));
        Router { exact, prefixes }
    }

    pub fn route(&self, path: &str) -> Option<&Arc<Route>> {
        self.exact
            .get(path)
            .or_else(|| self.prefixes.iter().find(|r| path.starts_with(&*r.matched)))
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact.values().chain(self.prefixes.iter())
    }
}

/// Splits `/pkg.Service/Method` into its service and method.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(split_path("/a.B/C"), Some(("a.B", "C")));
        for bad in ["", "/", "/a.B", "/a.B/", "//C", "a.B/C", "/a/b/c"] {
            assert_eq!(split_path(bad), None, "{bad}");
        }
    }
}
