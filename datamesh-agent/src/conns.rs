//! Who is on the other end of each proxy connection, as the agent knows it: the proxy's
//! [`Attribution`] implemented with the eBPF capture's records (`dm_conns`, keyed by the
//! connection's 4-tuple as the pod sees it: pod netns cookie and original destination) and pod
//! discovery (the pod's name). It keeps the last [`CONN_LOG_LEN`] connections for
//! `/connections` and the per-pod open-connection state in `dm_pod_state`.
//!
//! It also enforces identity: a connection with a `dm_conns` record (captured, or a pod's
//! direct dial of the listener) is served as its pod; one without is served only when the
//! [`crate::identity`] policy admits it (node-local, `uncaptured_allow`, `uncaptured: allow`),
//! else it is refused, counted in `datamesh_proxy_refused_connections_total` and logged (by the proxy's listener) at
//! most once per second.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use datamesh_common::{FlowKey, FASTPATH_REDIRECT, FASTPATH_TCP, FASTPATH_UNDECIDED};
use datamesh_proxy::attribution::{Attribution, ConnEvent, Identity};
use serde::Serialize;
use tracing::debug;

use crate::config::fold_v4_mapped;
use crate::dataplane::{flow_key, words_addr, Maps};
use crate::identity::{admit, Admission, LocalAddrs, UncapturedPolicy, REFUSED_UNCAPTURED};
use crate::pods::Pods;

/// How many accepted connections `/connections` remembers.
pub const CONN_LOG_LEN: usize = 1024;

/// One accepted connection as `/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub peer: String,
    pub local: String,
    pub endpoint: String,
    /// Steered here by the capture (the pod dialled the endpoint address).
    pub captured: bool,
    /// A pod dialled the proxy listener directly (recorded by the data plane, attributed).
    pub direct: bool,
    /// Why it was served: `captured`, `direct`, `node-local`, `uncaptured_allow`,
    /// `uncaptured: allow`; or `refused`.
    pub admitted: &'static str,
    /// The reason the connection was refused (it was closed after one error line).
    pub refused: Option<String>,
    pub orig_dst: Option<String>,
    pub netns_cookie: Option<u64>,
    pub pod: Option<String>,
    pub fastpath: &'static str,
    pub closed: bool,
    #[serde(skip)]
    key: FlowKey,
}

fn fastpath_name(state: u32) -> &'static str {
    match state {
        FASTPATH_UNDECIDED => "undecided",
        FASTPATH_REDIRECT => "redirect",
        FASTPATH_TCP => "tcp",
        _ => "undecided",
    }
}

/// The last [`CONN_LOG_LEN`] accepted connections.
#[derive(Default)]
pub struct ConnLog {
    records: Mutex<VecDeque<ConnRecord>>,
    next_id: AtomicU64,
}

impl ConnLog {
    fn push(&self, mut rec: ConnRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        rec.id = id;
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= CONN_LOG_LEN {
            r.pop_front();
        }
        r.push_back(rec);
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ConnRecord)) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // Ids are increasing, so the record is found by its distance from the newest.
        if let Some(rec) = r.iter_mut().rev().find(|rec| rec.id == id) {
            f(rec);
        }
    }

    /// A copy of the log, with the fast-path state of open captured connections refreshed.
    pub fn snapshot(&self, maps: &Maps) -> Vec<ConnRecord> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for rec in r
            .iter_mut()
            .filter(|rec| (rec.captured || rec.direct) && !rec.closed)
        {
            if let Some(info) = maps.conn_info(&rec.key) {
                rec.fastpath = fastpath_name(info.fastpath);
            }
        }
        r.iter().cloned().collect()
    }
}

/// The proxy's attribution from the capture's records (see the module docs).
pub struct CaptureAttribution {
    pub maps: Arc<Maps>,
    pub pods: Arc<Pods>,
    pub log: Arc<ConnLog>,
    /// What happens to uncaptured connections (replaced on reload).
    pub policy: RwLock<Arc<UncapturedPolicy>>,
    pub local: LocalAddrs,
}

impl CaptureAttribution {
    pub fn set_policy(&self, p: UncapturedPolicy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
    }
}

impl Attribution for CaptureAttribution {
    fn identify(&self, endpoint: &str, peer: SocketAddr, local: SocketAddr) -> Identity {
        let (peer, local) = (fold_v4_mapped(peer), fold_v4_mapped(local));
        let key = flow_key(peer, local);
        let info = self.maps.conn_info(&key);
        let cookie = info.map(|i| i.netns_cookie);
        let pod_name = cookie.and_then(|c| self.pods.name_of(c));
        let orig_dst = info.and_then(|i| {
            words_addr(i.orig.family as u32, i.orig.addr).map(|ip| SocketAddr::new(ip, i.orig.port))
        });
        // A pod's direct dial of the listener was recorded with the listener as destination.
        let direct = orig_dst.is_some_and(|o| fold_v4_mapped(o) == local);
        let captured = info.is_some() && !direct;
        let admission = if info.is_some() {
            None
        } else {
            let policy = self
                .policy
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Some(admit(&policy, &self.local, peer.ip()))
        };
        let admitted = match admission {
            None if direct => "direct",
            None => "captured",
            Some(a) => a.as_str(),
        };
        let refuse =
            (admission == Some(Admission::Refused)).then(|| REFUSED_UNCAPTURED.to_string());
        let token = self.log.push(ConnRecord {
            id: 0,
            peer: peer.to_string(),
            local: local.to_string(),
            endpoint: endpoint.to_string(),
            captured,
            direct,
            admitted,
            refused: refuse.clone(),
            orig_dst: orig_dst.map(|a| a.to_string()),
            netns_cookie: cookie,
            pod: pod_name.clone(),
            fastpath: info.map(|i| fastpath_name(i.fastpath)).unwrap_or("none"),
            closed: false,
            key,
        });
        if let Some(c) = cookie {
            self.pods.conn_opened(c);
        }
        Identity {
            captured,
            direct,
            pod: cookie.unwrap_or(0),
            pod_name,
            orig_dst,
            token,
            refuse,
        }
    }

    fn event(&self, who: &Identity, event: ConnEvent) {
        match event {
            ConnEvent::ProtocolError => {
                if who.pod != 0 {
                    self.pods.error(who.pod);
                }
            }
            ConnEvent::Closing { peer, local } => {
                if who.captured || who.direct {
                    let key = flow_key(fold_v4_mapped(peer), fold_v4_mapped(local));
                    if let Err(e) = self.maps.conn_to_tcp(&key) {
                        debug!(error = %e, %peer, "could not move a draining connection off the fast path");
                    }
                }
            }
            ConnEvent::Closed => {
                let maps = &self.maps;
                self.log.update(who.token, |r| {
                    r.closed = true;
                    // The fast-path state as the connection ended.
                    if r.captured || r.direct {
                        if let Some(info) = maps.conn_info(&r.key) {
                            r.fastpath = fastpath_name(info.fastpath);
                        }
                    }
                });
                if who.pod != 0 {
                    self.pods.conn_closed(who.pod);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> ConnRecord {
        ConnRecord {
            id: 0,
            peer: format!("198.18.3.10:{n}"),
            local: "198.18.3.1:1".into(),
            endpoint: "cache".into(),
            captured: false,
            direct: false,
            admitted: "node-local",
            refused: None,
            orig_dst: None,
            netns_cookie: None,
            pod: None,
            fastpath: "none",
            closed: false,
            key: FlowKey::default(),
        }
    }

    #[test]
    fn conn_log_keeps_the_last_1024() {
        let log = ConnLog::default();
        for n in 0..(CONN_LOG_LEN as u64 + 10) {
            log.push(rec(n));
        }
        let r = log.records.lock().expect("lock");
        assert_eq!(r.len(), CONN_LOG_LEN);
        assert_eq!(r.front().map(|x| x.id), Some(11));
        assert_eq!(r.back().map(|x| x.id), Some(CONN_LOG_LEN as u64 + 10));
    }

    #[test]
    fn conn_record_json_shape() {
        let mut r = rec(40000);
        r.id = 1;
        let v = serde_json::to_value(&r).expect("json");
        for k in [
            "id",
            "peer",
            "local",
            "endpoint",
            "captured",
            "direct",
            "admitted",
            "refused",
            "orig_dst",
            "netns_cookie",
            "pod",
            "fastpath",
            "closed",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(v.get("key").is_none());
        assert_eq!(v["pod"], serde_json::Value::Null);
    }
}
