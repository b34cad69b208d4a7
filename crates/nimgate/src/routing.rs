//! Model string → `Route`. An exact name beats any glob; among globs the longest literal
//! prefix wins, and config order breaks ties. Built once per snapshot: a lookup is one hash
//! probe for exact names, then one probe per distinct glob-prefix length, testing only the
//! globs whose literal prefix begins the model, so 10,000 routes cost what 10 do.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use foldhash::fast::RandomState;

use crate::glob::ModelPattern;
use crate::upstream::Pool;

/// One `routes[]` entry: which models it serves, the pool that serves them, and the model
/// name the backends know them by.
#[derive(Debug)]
pub struct Route {
    pub pattern: ModelPattern,
    pub pool: Pool,
    pub upstream_model: Option<UpstreamModel>,
    /// `pass_priority: true`: requests carry their key's `priority` to the engine (vLLM's
    /// priority scheduling), replacing any the client set.
    pub pass_priority: bool,
}

/// A route's `upstream_model` alias, with its JSON string form encoded once so that the
/// rewrite on the request path is a byte splice.
#[derive(Debug, Clone)]
pub struct UpstreamModel {
    pub name: String,
    pub json: Bytes,
}

impl UpstreamModel {
    pub fn new(name: &str) -> Self {
        // A `String` always serialises; the fallback can only be reached by a serde_json bug.
        let json = serde_json::to_vec(name).unwrap_or_else(|_| format!("\"{name}\"").into_bytes());
        Self { name: name.to_owned(), json: Bytes::from(json) }
    }
}

impl Route {
    /// The model name to show for this route in `/v1/models`, if it names exactly one.
    pub fn exact_model(&self) -> Option<&str> {
        match &self.pattern {
            ModelPattern::Exact(name) => Some(name),
            ModelPattern::Glob { .. } | ModelPattern::Any => None,
        }
    }
}

/// Every route of a snapshot, indexed for lookup.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    // foldhash rather than SipHash: the table holds the config's patterns only, so a client's
    // model string can look up but never fill a bucket.
    exact: HashMap<Box<str>, usize, RandomState>,
    /// Glob routes by their literal prefix, each list in config order. Only globs whose prefix
    /// begins the model can match it, so a lookup tests a handful of globs, not all of them.
    globs_by_prefix: HashMap<Box<str>, Vec<usize>, RandomState>,
    /// The distinct literal-prefix lengths of the globs, longest first.
    prefix_lengths: Vec<usize>,
}

impl RouteTable {
    /// Indexes `routes` (validated: no duplicate patterns).
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut exact = HashMap::with_capacity_and_hasher(routes.len(), RandomState::default());
        let mut globs_by_prefix: HashMap<Box<str>, Vec<usize>, RandomState> = HashMap::default();
        for (i, route) in routes.iter().enumerate() {
            match &route.pattern {
                ModelPattern::Exact(name) => {
                    exact.entry(name.as_str().into()).or_insert(i);
                }
                pattern @ (ModelPattern::Glob { .. } | ModelPattern::Any) => {
                    let prefix = &pattern.as_str()[..pattern.literal_prefix()];
                    globs_by_prefix.entry(prefix.into()).or_default().push(i);
                }
            }
        }
        let mut prefix_lengths: Vec<usize> = globs_by_prefix.keys().map(|p| p.len()).collect();
        prefix_lengths.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lengths.dedup();
        Self { routes, exact, globs_by_prefix, prefix_lengths }
    }

    /// The route serving `model`: its exact route, else the glob with the longest literal
    /// prefix that matches it (config order among globs with the same prefix).
    pub fn find(&self, model: &str) -> Option<&Arc<Route>> {
        if let Some(&i) = self.exact.get(model) {
            return Some(&self.routes[i]);
        }
        for &len in &self.prefix_lengths {
            let Some(prefix) = model.get(..len) else { continue };
            let Some(candidates) = self.globs_by_prefix.get(prefix) else { continue };
            if let Some(&i) = candidates.iter().find(|&&i| self.routes[i].pattern.matches(model)) {
                return Some(&self.routes[i]);
            }
        }
        None
    }

    /// Routes in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> RouteTable {
        RouteTable::new(
            patterns
                .iter()
                .map(|p| {
                    Arc::new(Route {
                        pattern: ModelPattern::parse(p).unwrap(),
                        pool: Pool::new(
                            Vec::new(),
                            Vec::new(),
                            &crate::upstream::Balancing::default(),
                            Default::default(),
                        ),
                        upstream_model: None,
                        pass_priority: false,
                    })
                })
                .collect(),
        )
    }

    fn winner(table: &RouteTable, model: &str) -> Option<String> {
        table.find(model).map(|r| r.pattern.as_str().to_owned())
    }

    #[test]
    fn exact_beats_any_glob_wherever_it_is_declared() {
        let t = table(&["*", "meta/*", "meta/llama-3.1-8b-instruct"]);
        assert_eq!(winner(&t, "meta/llama-3.1-8b-instruct").as_deref(), Some("meta/llama-3.1-8b-instruct"));
    }

    #[test]
    fn longest_literal_prefix_wins_among_globs() {
        let t = table(&["*", "meta/*", "meta/llama-3.1-*"]);
        assert_eq!(winner(&t, "meta/llama-3.1-70b").as_deref(), Some("meta/llama-3.1-*"));
        assert_eq!(winner(&t, "meta/codellama").as_deref(), Some("meta/*"));
        assert_eq!(winner(&t, "mistralai/mixtral").as_deref(), Some("*"));
    }

    #[test]
    fn config_order_breaks_ties_between_equal_prefixes() {
        let t = table(&["nvidia/*-instruct", "nvidia/*"]);
        assert_eq!(winner(&t, "nvidia/x-instruct").as_deref(), Some("nvidia/*-instruct"));
        let t = table(&["nvidia/*", "nvidia/*-instruct"]);
        assert_eq!(winner(&t, "nvidia/x-instruct").as_deref(), Some("nvidia/*"));
    }

    /// The obvious rule, checked against the index on random tables.
    fn reference<'a>(patterns: &'a [String], model: &str) -> Option<&'a str> {
        if let Some(p) = patterns.iter().find(|p| p.as_str() == model && !p.contains(['*', '?'])) {
            return Some(p);
        }
        let mut best: Option<(usize, &str)> = None;
        for p in patterns.iter().filter(|p| p.contains(['*', '?'])) {
            let compiled = ModelPattern::parse(p).unwrap();
            if compiled.matches(model) && best.is_none_or(|(len, _)| compiled.literal_prefix() > len) {
                best = Some((compiled.literal_prefix(), p));
            }
        }
        best.map(|(_, p)| p)
    }

    proptest::proptest! {
        #[test]
        fn the_index_picks_what_the_rule_says(
            patterns in proptest::collection::hash_set("[ab/]{0,3}[*?]?[ab/*]{0,2}", 1..12),
            model in "[ab/]{0,6}",
        ) {
            let patterns: Vec<String> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let t = table(&refs);
            let found = winner(&t, &model);
            proptest::prop_assert_eq!(found.as_deref(), reference(&patterns, &model));
        }
    }

    #[test]
    fn nothing_matches_without_a_catch_all() {
        let t = table(&["meta/*", "a/b"]);
        assert_eq!(winner(&t, "qwen/qwen2"), None);
        assert_eq!(winner(&t, ""), None);
    }
}
