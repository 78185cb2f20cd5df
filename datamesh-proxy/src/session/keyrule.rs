//! The key rules' check of the front command ([`crate::keyrules`]): after the pod's rate
//! limit, before the command policy. A session holds its endpoint's rules (taken again when
//! the rule set's generation moves); with none, the dispatch path tests one `is_empty`.

use std::time::Duration;

use super::dispatch::Admit;
use super::{Input, Session, StallDone};
use crate::accounting::Throttle;
use crate::acl_log::Reason;
use crate::commands;
use crate::keyrules::{self, Counted, Verdict};
use crate::metrics::KeyRuleLabels;
use crate::resp::Reply;

impl Session {
    /// Takes the endpoint's rules again if the rule set changed (one atomic load).
    pub(super) fn refresh_key_rules(&mut self) {
        let g = self.shared.keyrules.generation();
        if g != self.key_rules_gen {
            self.key_rules = self.shared.keyrules.for_endpoint(&self.ep.name);
            self.key_rules_gen = g;
        }
    }

    /// The key rules' verdict on the front command (only called with rules present).
    pub(super) fn key_rules_admit(&mut self) -> Admit {
        let Some(Input::Command(cmd)) = self.inbox.front() else {
            return Admit::Go;
        };
        // AUTH, HELLO, QUIT, RESET: a client can always authenticate or leave.
        let Some(spec) = commands::lookup(cmd.name()).filter(|s| !s.has(commands::NO_AUTH)) else {
            self.key_admitted = true;
            return Admit::Go;
        };
        let max_delay = self.settings.throttle_max_delay;
        let limits = &self.shared.pod_limits;
        let now_ns = limits.now_ns();
        // Like the pod's limit: counted from arrival, not charged for an earlier wait.
        let at = limits
            .ns_at(self.arrival)
            .max(now_ns.saturating_sub(max_delay.as_nanos() as u64));
        let display = self.settings.hotkeys.key_display;
        let (rule, key, reply, counted) =
            match keyrules::check(&self.key_rules, spec, cmd, &self.pod, at, max_delay) {
                Verdict::Pass | Verdict::Throttle(_, _, Throttle::Allow) => {
                    self.key_admitted = true;
                    return Admit::Go;
                }
                Verdict::Deny(r, k) => {
                    let key = k.and_then(|i| cmd.args.get(i)).map(|k| display.show(k));
                    let reply = Reply::error(&format!(
                        "NOPERM this command or key is denied for pod {} by key rule {}",
                        self.pod.name(),
                        r.spec.id
                    ));
                    (r.clone(), key, reply, Counted::Denied)
                }
                Verdict::Throttle(r, k, t) => {
                    let what = match k.and_then(|i| cmd.args.get(i)) {
                        Some(k) => format!("key {}", display.show(k)),
                        None => format!("command {}", spec.name.to_ascii_lowercase()),
                    };
                    match t {
                        Throttle::Delay(d) => {
                            let pod = self.pod.name();
                            r.count(&pod, Counted::Delayed);
                            self.key_throttled_metric(r.metric_id(), pod);
                            let wait = Duration::from_nanos(
                                (at + d.as_nanos() as u64).saturating_sub(now_ns),
                            );
                            let until = tokio::time::Instant::now() + wait;
                            self.stall = Some(Box::pin(async move {
                                tokio::time::sleep_until(until).await;
                                StallDone::KeyThrottled
                            }));
                            return Admit::Wait;
                        }
                        _ => {
                            let reply = Reply::error(&format!(
                                "ERR throttled: {what} is over its rate limit (rule {})",
                                r.spec.id
                            ));
                            (r.clone(), None, reply, Counted::Refused)
                        }
                    }
                }
            };
        let pod = self.pod.name();
        rule.count(&pod, counted);
        if let Counted::Denied = counted {
            self.shared
                .metrics
                .key_denied
                .get_or_create(&KeyRuleLabels {
                    endpoint: self.ep.name.clone(),
                    rule: rule.metric_id().to_string(),
                    pod,
                })
                .inc();
            let user = self.state.user.clone().unwrap_or_else(|| "default".into());
            match key {
                Some(k) => self.log_denial(Reason::Key, &k, &user),
                None => {
                    let name = spec.name.to_ascii_lowercase();
                    self.log_denial(Reason::Command, &name, &user)
                }
            }
        } else {
            self.key_throttled_metric(rule.metric_id(), pod);
        }
        // Like a policy refusal: inside MULTI it aborts the transaction, while subscribed it
        // is written at once.
        self.deny(reply);
        self.front_admitted = false;
        self.pod.commands(1);
        self.commands_total.inc();
        Admit::Refused
    }

    fn key_throttled_metric(&self, rule: &str, pod: String) {
        self.shared
            .metrics
            .key_throttled
            .get_or_create(&KeyRuleLabels {
                endpoint: self.ep.name.clone(),
                rule: rule.to_string(),
                pod,
            })
            .inc();
    }
}
