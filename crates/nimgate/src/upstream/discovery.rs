//! Backend groups found by DNS (`discovery: { dns: true, interval }`): one member per address
//! the group's host resolves to (a Kubernetes headless Service answers one per ready pod),
//! resolved again every interval. Each member is a `Backend` of its own (connections, health,
//! ejection, in-flight count, NIM load), named `group/address`; pools list a group's members
//! where the route names the group.
//!
//! - A new address joins at once, or after its first passed health check when the group has
//!   one.
//! - An address that is gone takes no new request; requests it has finish (they hold it).
//! - A failed resolution keeps the members known last, and says so in a log line (when it
//!   starts failing and when it recovers) and `discovery_errors_total`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use prometheus::IntCounterVec;

use super::backend::{Backend, BackendName};
use super::probe;
use super::registry::{self, BackendSettings};

/// `discovery:`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Discovery {
    pub interval: Duration,
    /// A nameserver to ask instead of the system's (`/etc/resolv.conf`).
    pub nameserver: Option<SocketAddr>,
}

/// A backend group: its settings, shared by every member, and the members found last.
pub struct Group {
    pub name: BackendName,
    /// Its configuration's digest: a reload that leaves it unchanged keeps this group.
    pub fingerprint: [u8; 32],
    pub discovery: Discovery,
    /// The members' settings, with the group's URL (a host name).
    template: BackendSettings,
    host: String,
    port: u16,
    members: ArcSwap<Vec<Arc<Backend>>>,
    /// Moves on whenever `members` changes, so that pools know to list them again.
    version: AtomicU64,
    started: AtomicBool,
    /// Why the last resolution failed, while it does.
    failing: Mutex<Option<String>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("name", &self.name).field("members", &self.members.load().len()).finish()
    }
}

impl Group {
    /// A group of `template`'s settings. Taking over from `previous` (the group of the same
    /// name in force), it starts with the same addresses, rebuilt with the new settings and
    /// keeping their live parts where those allow: a reload does not empty a group.
    pub fn new(
        template: BackendSettings,
        discovery: Discovery,
        fingerprint: [u8; 32],
        previous: Option<&Group>,
    ) -> Result<Self, registry::BuildError> {
        let host = template.base.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
        let port =
            template.base.port_u16().unwrap_or(if template.base.scheme_str() == Some("https") { 443 } else { 80 });
        let group = Self {
            name: template.name.clone(),
            fingerprint,
            discovery,
            template,
            host,
            port,
            members: ArcSwap::from_pointee(Vec::new()),
            version: AtomicU64::new(0),
            started: AtomicBool::new(false),
            failing: Mutex::new(None),
        };
        if let Some(previous) = previous {
            let members = previous.members_full();
            let addresses: BTreeSet<SocketAddr> = members.iter().filter_map(|m| address_of(m)).collect();
            group.update(&addresses, &members)?;
        }
        Ok(group)
    }

    /// The members now.
    pub fn members(&self) -> arc_swap::Guard<Arc<Vec<Arc<Backend>>>> {
        self.members.load()
    }

    fn members_full(&self) -> Arc<Vec<Arc<Backend>>> {
        self.members.load_full()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Why resolution fails, while it does.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The host name resolved.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Makes the members those at `addresses`, taking the live parts of members `in_force`
    /// at the same address where their settings allow (see `registry`); a new address joins
    /// (after its first passed health check, when the group has one). Probes start when on a
    /// runtime.
    fn update(
        &self,
        addresses: &BTreeSet<SocketAddr>,
        in_force: &[Arc<Backend>],
    ) -> Result<bool, registry::BuildError> {
        let known: BTreeSet<SocketAddr> = in_force.iter().filter_map(|m| address_of(m)).collect();
        let current: BTreeSet<SocketAddr> = self.members.load().iter().filter_map(|m| address_of(m)).collect();
        if &current == addresses && !self.members.load().is_empty() {
            return Ok(false);
        }
        let mut members = Vec::with_capacity(addresses.len());
        for address in addresses {
            let member = registry::build(self.member_settings(*address), in_force)?;
            if known.contains(address) {
                probe::start(std::slice::from_ref(&member));
            } else {
                probe::start_member(&member);
            }
            members.push(member);
        }
        self.members.store(Arc::new(members));
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    fn member_settings(&self, address: SocketAddr) -> BackendSettings {
        let mut settings = self.template.clone();
        let scheme = self.template.base.scheme_str().unwrap_or("http");
        let path = self.template.base.path().trim_end_matches('/');
        settings.name = BackendName::new(&format!("{}/{address}", self.name));
        settings.url = format!("{scheme}://{address}{path}");
        settings.base = settings.url.parse().unwrap_or_else(|_| self.template.base.clone());
        settings
    }
}

/// A member's address, from its name (`group/address`).
fn address_of(member: &Backend) -> Option<SocketAddr> {
    member.name.as_str().rsplit_once('/')?.1.parse().ok()
}

/// What makes a group the same group: its members' settings and its discovery.
pub fn fingerprint(settings: &BackendSettings, discovery: &Discovery) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(registry::settings_fingerprint(settings));
    hash.update(format!("{discovery:?}"));
    hash.finalize().into()
}

/// Starts the resolution of `groups` not yet started, each in a task that ends when its group
/// is no longer in use. `errors` is `discovery_errors_total`.
pub fn start(groups: &[Arc<Group>], errors: &IntCounterVec) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    for group in groups {
        if group.started.swap(true, Ordering::AcqRel) {
            continue;
        }
        let resolver = match resolver(group.discovery.nameserver) {
            Ok(resolver) => resolver,
            Err(e) => {
                tracing::error!(backend = %group.name, error = %e, "DNS discovery cannot start: no resolver");
                continue;
            }
        };
        runtime.spawn(resolve_loop(Arc::downgrade(group), resolver, errors.clone()));
    }
}

async fn resolve_loop(group: Weak<Group>, resolver: TokioResolver, errors: IntCounterVec) {
    loop {
        let Some(live) = group.upgrade() else { return };
        let interval = live.discovery.interval;
        let looked_up =
            tokio::time::timeout(interval.max(Duration::from_secs(1)), resolver.lookup_ip(live.host.as_str()));
        let outcome = match looked_up.await {
            Ok(Ok(answer)) => {
                let addresses: BTreeSet<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, live.port)).collect();
                if addresses.is_empty() {
                    Err("the answer has no address".to_owned())
                } else {
                    live.update(&addresses, &live.members_full()).map_err(|e| format!("{e:?}"))
                }
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {interval:?}")),
        };
        report(&live, outcome, &errors);
        drop(live);
        tokio::time::sleep(interval).await;
    }
}

/// Logs a change of members, the start of failures and their end; counts failures.
fn report(group: &Group, outcome: Result<bool, String>, errors: &IntCounterVec) {
    let mut failing = group.failing.lock().unwrap_or_else(PoisonError::into_inner);
    match outcome {
        Ok(changed) => {
            if failing.take().is_some() {
                tracing::info!(backend = %group.name, host = %group.host, "DNS discovery resolves again");
            }
            if changed {
                let members: Vec<String> = group.members().iter().map(|m| m.name.to_string()).collect();
                tracing::info!(backend = %group.name, members = %members.join(", "), "backend group members changed");
            }
        }
        Err(cause) => {
            errors.with_label_values(&[group.name.as_str()]).inc();
            if failing.is_none() {
                tracing::warn!(
                    backend = %group.name, host = %group.host, %cause, members = group.members().len(),
                    "DNS discovery failed: keeping the members found last"
                );
            }
            *failing = Some(cause);
        }
    }
}

/// A resolver asking `nameserver`, or the system's nameservers. It caches nothing: every
/// interval asks again, since pods come and go faster than records' TTLs say.
fn resolver(nameserver: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match nameserver {
        Some(address) => {
            let mut server = NameServerConfig::udp_and_tcp(address.ip());
            for connection in &mut server.connections {
                connection.port = address.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio().map_err(|e| format!("reading /etc/resolv.conf: {e}"))?,
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Backend;
    use crate::upstream::pool::{Balancing, Pool, PoolEntry};

    fn group(url: &str) -> Group {
        let template = BackendSettings::for_tests("pods", url);
        let discovery = Discovery { interval: Duration::from_secs(10), nameserver: None };
        Group::new(template, discovery, [0; 32], None).unwrap()
    }

    fn at(addresses: &[&str]) -> BTreeSet<SocketAddr> {
        addresses.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn names(members: &[Arc<Backend>]) -> Vec<&str> {
        members.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn members_are_one_backend_per_address_under_the_groups_path() {
        let group = group("http://nim.ns.svc:8000/base/");
        assert_eq!(group.host(), "nim.ns.svc");
        assert!(group.update(&at(&["10.0.0.2:8000", "10.0.0.1:8000"]), &[]).unwrap());
        let members = group.members();
        assert_eq!(names(&members), ["pods/10.0.0.1:8000", "pods/10.0.0.2:8000"]);
        assert_eq!(members[0].url, "http://10.0.0.1:8000/base");
        assert_eq!(
            members[0].uri(crate::api::Endpoint::ChatCompletions).to_string(),
            "http://10.0.0.1:8000/base/v1/chat/completions"
        );
        assert!(!group.update(&at(&["10.0.0.1:8000", "10.0.0.2:8000"]), &group.members_full()).unwrap(), "no change");
    }

    #[test]
    fn members_that_stay_keep_their_state_and_pools_list_the_new_ones() {
        let group = Arc::new(group("http://nim:8000"));
        group.update(&at(&["10.0.0.1:8000", "10.0.0.2:8000"]), &[]).unwrap();
        let pool =
            Pool::new(vec![PoolEntry::Group(Arc::clone(&group))], vec![], &Balancing::default(), Default::default());
        assert_eq!(names(&pool.members().primary), ["pods/10.0.0.1:8000", "pods/10.0.0.2:8000"]);
        let staying = Arc::clone(&group.members()[1]);
        staying.state.try_take_slot(None);

        group.update(&at(&["10.0.0.2:8000", "10.0.0.3:8000"]), &group.members_full()).unwrap();
        let listed = pool.members();
        assert_eq!(names(&listed.primary), ["pods/10.0.0.2:8000", "pods/10.0.0.3:8000"]);
        assert!(Arc::ptr_eq(&listed.primary[0], &staying), "the same backend, its in-flight count with it");
        assert_eq!(listed.primary[0].state.inflight(), 1);
    }

    #[test]
    fn a_reload_seeds_the_new_group_with_the_old_ones_addresses() {
        let old = group("http://nim:8000");
        old.update(&at(&["10.0.0.1:8000"]), &[]).unwrap();
        old.members()[0].state.try_take_slot(None);
        let mut template = old.template.clone();
        template.weight = 5;
        let new = Group::new(template, old.discovery.clone(), [1; 32], Some(&old)).unwrap();
        let members = new.members();
        assert_eq!(names(&members), ["pods/10.0.0.1:8000"]);
        assert_eq!(members[0].weight, 5);
        assert_eq!(members[0].state.inflight(), 1, "retuned, the member keeps its live parts");
    }
}
