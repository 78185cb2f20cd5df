//! The proxy's metrics, registered under the `datamesh_` prefix by the agent's registry.
//! Handles are resolved once per endpoint or connection ([`ProxyMetrics::group`],
//! [`ProxyMetrics::session`]), never per command.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
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
pub struct ReasonLabels {
    pub endpoint: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// How a drain closed a client connection: `boundary` (at a command boundary) or `deadline`
/// (at `drain_timeout_ms`, away from one).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    pub how: String,
}

/// A refused command: its endpoint, pod and ACL name (`flushall`, `config|set`, `unknown`:
/// bounded by the command table).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub endpoint: String,
    pub pod: String,
    pub command: String,
}

/// A key rule's action: its endpoint, the rule's id (`auto` for every automatic rule: bounded
/// by the rules written, never by keys) and the pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyRuleLabels {
    pub endpoint: String,
    pub rule: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodEndpointLabels {
    pub endpoint: String,
    pub pod: String,
}

/// A histogram of outage and recovery times, buckets 10 ms to about 40 s. Unlike a bare
/// `Histogram` it has a `Default`, so the metric structs derive theirs.
#[derive(Debug, Clone)]
pub struct Durations(Histogram);

impl Default for Durations {
    fn default() -> Self {
        Self(Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 13),
        ))
    }
}

impl Durations {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
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
    /// Commands through the hold queue by result (held, sent, expired, full, client_gone).
    pub hold: Family<KindLabels, Counter>,
    pub hold_depth: Family<EndpointLabels, Gauge>,
    pub hold_bytes: Family<EndpointLabels, Gauge>,
    /// Commands resent after their connection failed or a reply proved they did not run, by
    /// class (never_written, read_only, not_run).
    pub replays: Family<KindLabels, Counter>,
    /// Writes whose connection died after they were written: answered "may have been
    /// executed".
    pub unknown_outcomes: Family<PodEndpointLabels, Counter>,
    /// Switches to another node (Sentinel master, standalone standby).
    pub switches: Family<EndpointLabels, Counter>,
    /// How long nodes were unusable (down or loading) before they were back.
    pub outages: Family<EndpointLabels, Durations>,
    /// How long the hold queue was non-empty, from its first held command until it was empty
    /// again (the time clients waited for the endpoint to recover).
    pub recoveries: Family<EndpointLabels, Durations>,
    /// Subscriptions restored on another connection after theirs failed.
    pub resubscribes: Family<EndpointLabels, Counter>,
    /// Milliseconds subscriptions were without a connection (messages published then are
    /// lost: pub/sub is at most once).
    pub resubscribe_gap_ms: Family<EndpointLabels, Counter>,
    /// The memory budget (with its gauges and the clients closed by a limit). It lives here
    /// because every part that counts against it or waits on it (sessions, the backend
    /// readers) already holds these handles; [`crate::shared::Shared`] sets its limit.
    pub budget: Arc<crate::budget::Budget>,
    /// Client connections refused at accept, by reason (uncaptured, max_clients,
    /// pod_max_connections, fd_exhausted).
    pub refused: Family<ReasonLabels, Counter>,
    /// Commands refused by the command policy (users' and pods' `acl`).
    pub policy_denied: Family<PolicyLabels, Counter>,
    /// Failed AUTH (and HELLO AUTH) attempts.
    pub auth_failures: Family<PodEndpointLabels, Counter>,
    /// Writes refused for a value over `proxy.max_value_bytes`.
    pub big_value_refused: Family<PolicyLabels, Counter>,
    /// Pods' commands refused by `bigkeys.refuse` (they gave a big reply lately).
    pub big_reply_refused: Family<PolicyLabels, Counter>,
    /// Replies over `bigkeys.reply_bytes` or `bigkeys.reply_elements`.
    pub big_replies: Family<PodEndpointLabels, Counter>,
    /// Commands a key rule's throttle delayed or refused.
    pub key_throttled: Family<KeyRuleLabels, Counter>,
    /// Commands a key rule denied.
    pub key_denied: Family<KeyRuleLabels, Counter>,
    /// The node-local cache ([`crate::localcache`]).
    pub local_cache_hits: Family<EndpointLabels, Counter>,
    pub local_cache_misses: Family<EndpointLabels, Counter>,
    pub local_cache_invalidations: Family<EndpointLabels, Counter>,
    pub local_cache_flushes: Family<EndpointLabels, Counter>,
    pub local_cache_bytes: Family<EndpointLabels, Gauge>,
    pub local_cache_keys: Family<EndpointLabels, Gauge>,
    /// Key-attack detection ([`crate::attacks`]).
    pub attacks: Arc<crate::attacks::AttackMetrics>,
    /// Client connections a drain closed, by how (`boundary`, `deadline`).
    pub drain_closed: Family<HowLabels, Counter>,
}

impl ProxyMetrics {
    pub fn with_pods(pods: Arc<PodMetrics>) -> Self {
        Self {
            pods,
            ..Default::default()
        }
    }

    /// The unknown-outcome counter of one client's endpoint and pod (resolved once per
    /// connection).
    pub fn unknown_outcomes(&self, endpoint: &str, pod: &str) -> Counter {
        let c = self.unknown_outcomes.get_or_create(&PodEndpointLabels {
            endpoint: endpoint.to_string(),
            pod: pod.to_string(),
        });
        (*c).clone()
    }

    pub fn register(&self, registry: &mut Registry) {
        self.attacks.register(registry);
        registry.register(
            "proxy_local_cache_hits",
            "GETs answered from the node-local cache (local_cache)",
            self.local_cache_hits.clone(),
        );
        registry.register(
            "proxy_local_cache_misses",
            "GETs of hot read-mostly keys not in the node-local cache (forwarded; a fill is requested)",
            self.local_cache_misses.clone(),
        );
        registry.register(
            "proxy_local_cache_invalidations",
            "Cached keys dropped by a Redis invalidation or a write through the proxy",
            self.local_cache_invalidations.clone(),
        );
        registry.register(
            "proxy_local_cache_flushes",
            "Whole node-local cache flushes (tracking connection lost, node changed, turned off, FLUSHALL pushed, and EXEC or keyless writes that dropped entries)",
            self.local_cache_flushes.clone(),
        );
        registry.register(
            "proxy_local_cache_bytes",
            "Bytes held by the node-local cache (keys, values and a fixed overhead per entry)",
            self.local_cache_bytes.clone(),
        );
        registry.register(
            "proxy_local_cache_keys",
            "Keys held by the node-local cache",
            self.local_cache_keys.clone(),
        );
        registry.register(
            "proxy_big_value_refused",
            "Writes refused for a value over proxy.max_value_bytes, by endpoint, pod and command",
            self.big_value_refused.clone(),
        );
        registry.register(
            "proxy_big_reply_refused",
            "Pods' commands refused by bigkeys.refuse (the same command gave a big reply within bigkeys.refuse_s), by endpoint, pod and command",
            self.big_reply_refused.clone(),
        );
        registry.register(
            "proxy_big_replies",
            "Replies over bigkeys.reply_bytes or bigkeys.reply_elements, by endpoint and pod (keys at /bigkeys)",
            self.big_replies.clone(),
        );
        registry.register(
            "proxy_key_throttled",
            "Commands delayed or refused by a key rule's throttle, by endpoint, rule id (auto: the automatic ones) and pod",
            self.key_throttled.clone(),
        );
        registry.register(
            "proxy_key_denied",
            "Commands refused by a key rule's deny, by endpoint, rule id and pod",
            self.key_denied.clone(),
        );
        registry.register(
            "proxy_policy_denied",
            "Commands refused by the command policy (users[].acl, pods[].acl, proxy.default_acl), by endpoint, pod and command",
            self.policy_denied.clone(),
        );
        registry.register(
            "proxy_auth_failures",
            "Failed AUTH and HELLO AUTH attempts by endpoint and pod",
            self.auth_failures.clone(),
        );
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
            "proxy_buffered_bytes",
            "Bytes buffered for clients (commands being read or on their way, replies and messages not written yet), as counted against the memory budget",
            self.budget.metrics.buffered.clone(),
        );
        registry.register(
            "proxy_memory_budget_bytes",
            "The memory budget for buffered client bytes (0 = none)",
            self.budget.metrics.limit.clone(),
        );
        registry.register(
            "proxy_clients_closed",
            "Clients closed by a limit, by CLIENT KILL or by a drain (reason = output_hard_limit | output_soft_limit | memory_budget | idle_timeout | partial_command_timeout | query_buffer_limit | killed | drain | drain_deadline)",
            self.budget.metrics.closed.clone(),
        );
        registry.register(
            "proxy_drain_closed",
            "Client connections closed by a drain (agent stop, worker retirement): how = boundary (at a command boundary: replies written, nothing unanswered, not in MULTI, a subscription or a blocking command) | deadline (at drain_timeout_ms, away from a boundary)",
            self.drain_closed.clone(),
        );
        registry.register(
            "proxy_refused_connections",
            "Client connections refused at accept, before anything was read (reason = uncaptured: not from a pod, not node-local, not in uncaptured_allow | max_clients | pod_max_connections | fd_exhausted)",
            self.refused.clone(),
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
        registry.register(
            "proxy_hold",
            "Commands through the failover hold queue by kind (held, sent, expired, full, client_gone)",
            self.hold.clone(),
        );
        registry.register(
            "proxy_hold_depth",
            "Commands waiting in the hold queue now",
            self.hold_depth.clone(),
        );
        registry.register(
            "proxy_hold_bytes",
            "Bytes of the commands waiting in the hold queue now",
            self.hold_bytes.clone(),
        );
        registry.register(
            "proxy_replays",
            "Commands resent after a failure by class (never_written, read_only, not_run)",
            self.replays.clone(),
        );
        registry.register(
            "proxy_unknown_outcomes",
            "Written commands whose connection died before the reply, answered 'may have been executed'",
            self.unknown_outcomes.clone(),
        );
        registry.register(
            "proxy_switches",
            "Switches to another node (Sentinel master, standalone standby)",
            self.switches.clone(),
        );
        registry.register(
            "proxy_node_outage_seconds",
            "How long backend nodes were unusable (down or loading) before they were back",
            self.outages.clone(),
        );
        registry.register(
            "proxy_recovery_seconds",
            "How long an endpoint's hold queue was not empty: from the first held command until every held command was sent or answered",
            self.recoveries.clone(),
        );
        registry.register(
            "proxy_resubscribes",
            "Client subscriptions restored on a new backend connection after theirs failed",
            self.resubscribes.clone(),
        );
        registry.register(
            "proxy_resubscribe_gap_milliseconds",
            "Time subscriptions were without a backend connection before they were restored (messages published then are lost)",
            self.resubscribe_gap_ms.clone(),
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
        let hold = |result: &str| counter(&self.hold, result);
        let replays = |class: &str| counter(&self.replays, class);
        let held = hold("held");
        let hold_sent = hold("sent");
        let hold_expired = hold("expired");
        let hold_full = hold("full");
        let hold_gone = hold("client_gone");
        let replay_never_written = replays("never_written");
        let replay_read_only = replays("read_only");
        let replay_not_run = replays("not_run");
        let hold_depth = (*self.hold_depth.get_or_create(&el)).clone();
        let hold_bytes = (*self.hold_bytes.get_or_create(&el)).clone();
        let switches = (*self.switches.get_or_create(&el)).clone();
        let outages = (*self.outages.get_or_create(&el)).clone();
        let recoveries = (*self.recoveries.get_or_create(&el)).clone();
        let resubscribes = (*self.resubscribes.get_or_create(&el)).clone();
        let resubscribe_gap_ms = (*self.resubscribe_gap_ms.get_or_create(&el)).clone();
        GroupMetrics {
            held,
            hold_sent,
            hold_expired,
            hold_full,
            hold_gone,
            replay_never_written,
            replay_read_only,
            replay_not_run,
            hold_depth,
            hold_bytes,
            switches,
            outages,
            recoveries,
            resubscribes,
            resubscribe_gap_ms,
            shared_conns,
            dedicated_conns,
            connects_ok,
            connects_failed,
            inflight,
            pool_waits,
            resent,
            budget: self.budget.clone(),
        }
    }
}

/// Metrics handles of one backend group (resolved once, not per command).
#[derive(Clone, Default)]
pub struct GroupMetrics {
    pub held: Counter,
    pub hold_sent: Counter,
    pub hold_expired: Counter,
    pub hold_full: Counter,
    pub hold_gone: Counter,
    pub replay_never_written: Counter,
    pub replay_read_only: Counter,
    pub replay_not_run: Counter,
    pub hold_depth: Gauge,
    pub hold_bytes: Gauge,
    pub switches: Counter,
    pub outages: Durations,
    pub recoveries: Durations,
    pub resubscribes: Counter,
    pub resubscribe_gap_ms: Counter,
    pub shared_conns: Gauge,
    pub dedicated_conns: Gauge,
    pub connects_ok: Counter,
    pub connects_failed: Counter,
    pub inflight: Gauge,
    pub pool_waits: Counter,
    /// Commands the router resent after a reply that proved they did not run (MOVED, ASK,
    /// TRYAGAIN, READONLY, LOADING, MASTERDOWN, CLUSTERDOWN).
    pub resent: Counter,
    /// The memory budget: a backend reader stops reading while it is exhausted.
    pub budget: Arc<crate::budget::Budget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // The duration histograms encode as Prometheus histograms (the newtype only adds Default).
    #[test]
    fn duration_histograms_encode_as_histograms() {
        let m = ProxyMetrics::default();
        let mut registry = Registry::with_prefix("datamesh");
        m.register(&mut registry);
        m.group("cache").outages.observe(0.25);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(
            out.contains("# TYPE datamesh_proxy_node_outage_seconds histogram"),
            "{out}"
        );
        assert!(
            out.contains(
                r#"datamesh_proxy_node_outage_seconds_bucket{le="0.32",endpoint="cache"} 1"#
            ),
            "{out}"
        );
    }
}
