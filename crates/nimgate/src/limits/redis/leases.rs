//! Concurrency leases: a request of a key with `max_concurrency` holds a member of the key's
//! lease set in Redis, scored by its expiry. The replica renews the leases of its running
//! requests every third of the lease's life, and removes each when its request ends; a
//! replica that dies renews nothing, so its slots come back within one lease's life.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use redis::Script;

use super::{RedisStore, Shared};

/// Sets the expiry of the given members of a lease set, if they are still there (a lease
/// released meanwhile is not brought back). On Redis's clock, as the admission.
const RENEW: &str = r"
local time = redis.call('TIME')
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 1
";

/// The leases this replica holds, by number.
#[derive(Debug, Default)]
pub(super) struct Leases {
    held: DashMap<u64, (Arc<str>, String)>,
    /// Released here, their removal sent but perhaps not yet arrived, by lease set: the next
    /// admission of the key removes them first, so that a client's next request never finds
    /// its previous one's slot still taken.
    releasing: DashMap<Arc<str>, Vec<String>>,
}

/// The most released leases remembered per key; beyond, the oldest are left to their removal
/// (or their expiry).
const MAX_RELEASING: usize = 256;

impl Leases {
    pub(super) fn hold(&self, shared: &Arc<Shared>, n: u64, set: &Arc<str>, member: String) -> Lease {
        self.held.insert(n, (Arc::clone(set), member));
        Lease { store: Arc::downgrade(shared), n }
    }

    /// The leases of `set` released here lately, for an admission to remove first.
    pub(super) fn releasing(&self, set: &Arc<str>) -> Vec<String> {
        self.releasing.get(set).map(|members| members.clone()).unwrap_or_default()
    }

    fn released(&self, set: &Arc<str>, member: &str) {
        let mut members = self.releasing.entry(Arc::clone(set)).or_default();
        if members.len() >= MAX_RELEASING {
            members.remove(0);
        }
        members.push(member.to_owned());
    }

    fn removed(&self, set: &Arc<str>, member: &str) {
        if let Some(mut members) = self.releasing.get_mut(set) {
            members.retain(|m| m != member);
        }
        self.releasing.remove_if(set, |_, members| members.is_empty());
    }
}

/// One held slot; dropping it removes it from Redis (without waiting for the answer).
#[derive(Debug)]
pub struct Lease {
    store: Weak<Shared>,
    n: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(shared) = self.store.upgrade() else { return };
        let Some((_, (set, member))) = shared.leases.held.remove(&self.n) else { return };
        shared.leases.released(&set, &member);
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let store = RedisStore(shared);
        handle.spawn(async move {
            let Ok(mut connection) = store.connection() else { return };
            let mut release = redis::cmd("ZREM");
            release.arg(&*set).arg(&member);
            match store.within_timeout(release.query_async::<i64>(&mut connection)).await {
                Ok(_) => store.0.leases.removed(&set, &member),
                // Lost: the next admission of the key removes it, or it expires by itself.
                Err(e) => store.0.complaints.complain(&store.0.settings.shown, "releasing a concurrency slot", &e),
            }
        });
    }
}

/// Renews the leases of `store` while it exists.
pub(super) fn renew_while_alive(store: Weak<Shared>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        let script = Script::new(RENEW);
        loop {
            let every = match store.upgrade() {
                Some(shared) => shared.settings.lease_ttl / 3,
                None => return,
            };
            tokio::time::sleep(every).await;
            let Some(shared) = store.upgrade() else { return };
            let mut by_set: HashMap<Arc<str>, Vec<String>> = HashMap::new();
            for entry in shared.leases.held.iter() {
                let (set, member) = entry.value();
                by_set.entry(Arc::clone(set)).or_default().push(member.clone());
            }
            let live = RedisStore(shared);
            for (set, members) in by_set {
                let Ok(mut connection) = live.connection() else { break };
                let mut invocation = script.key(&*set);
                invocation.arg(live.0.settings.lease_ttl.as_millis() as u64).arg(&members);
                if let Err(e) = live.within_timeout(invocation.invoke_async::<i64>(&mut connection)).await {
                    live.0.complaints.complain(&live.0.settings.shown, "renewing concurrency slots", &e);
                }
            }
        }
    });
}
