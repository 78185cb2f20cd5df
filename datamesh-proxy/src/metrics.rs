//! The proxy's metrics, registered under the `datamesh_` prefix by the agent's registry.
//! Handles are resolved once per endpoint or connection ([`ProxyMetrics::group`],
//! [`ProxyMetrics::session`]), never per command.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::accounting::PodMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub endpoint: String,
    pub captured: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub endpoint: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The proxy's metrics (registered under the `datamesh_` prefix by the admin registry).
#[derive(Default)]
pub struct ProxyMetrics {
    pub connections: Family<ConnLabels, Counter>,
    pub open: Family<EndpointLabels, Gauge>,
    pub backend_errors: Family<EndpointLabels, Counter>,
    pub commands: Family<EndpointLabels, Counter>,
    pub errors: Family<KindLabels, Counter>,
    pub backend_connections: Family<KindLabels, Gauge>,
    pub backend_connects: Family<KindLabels, Counter>,
    pub inflight: Family<EndpointLabels, Gauge>,
    pub pool_waits: Family<EndpointLabels, Counter>,
    pub resent: Family<EndpointLabels, Counter>,
    pub throttled: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub pods: Arc<PodMetrics>,
}

impl ProxyMetrics {
    pub fn with_pods(pods: Arc<PodMetrics>) -> Self {
        Self {
            pods,
            ..Default::default()
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_connections",
            "Accepted proxy connections",
            self.connections.clone(),
        );
        registry.register(
            "proxy_open_connections",
            "Open proxy connections",
            self.open.clone(),
        );
        registry.register(
            "proxy_backend_errors",
            "Backend connect or forwarding failures",
            self.backend_errors.clone(),
        );
        registry.register(
            "proxy_commands",
            "Commands received from clients",
            self.commands.clone(),
        );
        registry.register(
            "proxy_errors",
            "Errors by kind (protocol, auth, backend kinds)",
            self.errors.clone(),
        );
        registry.register(
            "proxy_backend_connections",
            "Open backend connections (kind = shared | dedicated)",
            self.backend_connections.clone(),
        );
        registry.register(
            "proxy_backend_connects",
            "Backend connection attempts (kind = ok | failed)",
            self.backend_connects.clone(),
        );
        registry.register(
            "proxy_inflight",
            "Commands queued or written to backends without a reply yet",
            self.inflight.clone(),
        );
        registry.register(
            "proxy_pool_waits",
            "Waits for a dedicated connection because max_dedicated were in use",
            self.pool_waits.clone(),
        );
        registry.register(
            "proxy_resent",
            "Commands resent by the router after a reply proving they did not run (MOVED, ASK, TRYAGAIN, READONLY, LOADING, MASTERDOWN, CLUSTERDOWN)",
            self.resent.clone(),
        );
        registry.register(
            "proxy_throttled",
            "Commands delayed or refused by a pod's command-rate limit",
            self.throttled.clone(),
        );
        registry.register(
            "proxy_config_reloads",
            "Config reloads (result = ok | invalid)",
            self.config_reloads.clone(),
        );
        registry.register(
            "proxy_pod_commands",
            "Commands per pod (node = clients that were not captured)",
            self.pods.commands.clone(),
        );
        registry.register(
            "proxy_pod_throttled",
            "Throttled commands per pod",
            self.pods.throttled.clone(),
        );
    }

    pub fn count_error(&self, endpoint: &str, kind: &str) {
        self.errors
            .get_or_create(&KindLabels {
                endpoint: endpoint.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The metric handles of one backend group (resolved once).
    pub fn group(&self, endpoint: &str) -> GroupMetrics {
        let kl = |kind: &str| KindLabels {
            endpoint: endpoint.to_string(),
            kind: kind.to_string(),
        };
        let el = EndpointLabels {
            endpoint: endpoint.to_string(),
        };
        // One statement per handle: a Family's read guard lives to the end of its statement,
        // and a second get_or_create in the same statement would wait for it forever.
        let gauge = |f: &Family<KindLabels, Gauge>, kind: &str| -> Gauge {
            let g = f.get_or_create(&kl(kind));
            (*g).clone()
        };
        let counter = |f: &Family<KindLabels, Counter>, kind: &str| -> Counter {
            let c = f.get_or_create(&kl(kind));
            (*c).clone()
        };
        let shared_conns = gauge(&self.backend_connections, "shared");
        let dedicated_conns = gauge(&self.backend_connections, "dedicated");
        let connects_ok = counter(&self.backend_connects, "ok");
        let connects_failed = counter(&self.backend_connects, "failed");
        let inflight = (*self.inflight.get_or_create(&el)).clone();
        let pool_waits = (*self.pool_waits.get_or_create(&el)).clone();
        let resent = (*self.resent.get_or_create(&el)).clone();
        GroupMetrics {
            shared_conns,
            dedicated_conns,
            connects_ok,
            connects_failed,
            inflight,
            pool_waits,
            resent,
        }
    }
}

/// Metrics handles of one backend group (resolved once, not per command).
#[derive(Clone, Default)]
pub struct GroupMetrics {
    pub shared_conns: Gauge,
    pub dedicated_conns: Gauge,
    pub connects_ok: Counter,
    pub connects_failed: Counter,
    pub inflight: Gauge,
    pub pool_waits: Counter,
    /// Commands the router resent after a reply that proved they did not run (MOVED, ASK,
    /// TRYAGAIN, READONLY, LOADING, MASTERDOWN, CLUSTERDOWN).
    pub resent: Counter,
}
