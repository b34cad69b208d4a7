//! Model string → `Route`. An exact name beats any glob; among globs the longest literal
//! prefix wins, and config order breaks ties. Built once per snapshot, so a lookup is one hash
//! probe plus, on a miss, a scan of the globs already sorted by rank.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::glob::ModelPattern;
use crate::pool::Pool;

/// One `routes[]` entry: which models it serves, the pool that serves them, and the model
/// name the backends know them by.
#[derive(Debug)]
pub struct Route {
    pub pattern: ModelPattern,
    pub pool: Pool,
    pub upstream_model: Option<UpstreamModel>,
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
    exact: HashMap<Box<str>, usize>,
    /// Indices of glob routes, best rank first.
    globs: Vec<usize>,
}

impl RouteTable {
    /// Indexes `routes` (validated: no duplicate patterns).
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut exact = HashMap::with_capacity(routes.len());
        let mut globs = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            match &route.pattern {
                ModelPattern::Exact(name) => {
                    exact.entry(name.as_str().into()).or_insert(i);
                }
                ModelPattern::Glob { .. } | ModelPattern::Any => globs.push(i),
            }
        }
        // Stable sort: equal prefixes keep config order.
        globs.sort_by_key(|&i| std::cmp::Reverse(routes[i].pattern.literal_prefix()));
        Self { routes, exact, globs }
    }

    /// The route serving `model`, if any.
    pub fn find(&self, model: &str) -> Option<&Arc<Route>> {
        if let Some(&i) = self.exact.get(model) {
            return Some(&self.routes[i]);
        }
        self.globs.iter().map(|&i| &self.routes[i]).find(|route| route.pattern.matches(model))
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
                        pool: Pool::default(),
                        upstream_model: None,
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

    #[test]
    fn nothing_matches_without_a_catch_all() {
        let t = table(&["meta/*", "a/b"]);
        assert_eq!(winner(&t, "qwen/qwen2"), None);
        assert_eq!(winner(&t, ""), None);
    }
}
