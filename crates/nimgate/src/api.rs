//! The paths nimgate serves, in one table, parsed once per request: the OpenAI-compatible
//! endpoints routed by model (and the upstream path of each), the model list and the health
//! checks. A fixed, small set: unknown paths are answered by the gateway, never forwarded
//! blindly.

use http::Method;

/// An inference or listing endpoint forwarded to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
}

impl Endpoint {
    /// Every endpoint, in the order of `index`.
    pub const ALL: [Endpoint; 4] = [Self::ChatCompletions, Self::Completions, Self::Embeddings, Self::Models];

    pub const fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Models => "/v1/models",
        }
    }

    /// A dense index, for per-endpoint tables built once per backend.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether its answers generate tokens (embeddings only read them).
    pub fn completes(self) -> bool {
        self != Self::Embeddings
    }
}

/// What a served path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Liveness: the process answers.
    Live,
    /// Readiness: not draining.
    Ready,
    /// `GET /v1/models`: the models the calling key may use.
    Models,
    /// A model-routed POST.
    Inference(Endpoint),
}

impl Resource {
    /// The one method it answers.
    pub fn method(self) -> Method {
        match self {
            Self::Inference(_) => Method::POST,
            Self::Live | Self::Ready | Self::Models => Method::GET,
        }
    }

    /// The method, as an `Allow` header names it.
    pub fn allow(self) -> &'static str {
        match self {
            Self::Inference(_) => "POST",
            Self::Live | Self::Ready | Self::Models => "GET",
        }
    }
}

/// Every path nimgate serves. NIM's own health paths are served too, so that probes written
/// for a NIM work against the gateway unchanged.
const SERVED: [(&str, Resource); 8] = [
    (Endpoint::ChatCompletions.path(), Resource::Inference(Endpoint::ChatCompletions)),
    (Endpoint::Completions.path(), Resource::Inference(Endpoint::Completions)),
    (Endpoint::Embeddings.path(), Resource::Inference(Endpoint::Embeddings)),
    (Endpoint::Models.path(), Resource::Models),
    ("/health/live", Resource::Live),
    ("/health/ready", Resource::Ready),
    ("/v1/health/live", Resource::Live),
    ("/v1/health/ready", Resource::Ready),
];

/// The resource at `path`, and the path as logged (static, so logging copies nothing); `None`
/// for a path nimgate does not serve.
pub fn resource(path: &str) -> Option<(Resource, &'static str)> {
    SERVED.iter().find(|(served, _)| *served == path).map(|&(served, resource)| (resource, served))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_position_in_all() {
        for (i, endpoint) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(endpoint.index(), i);
        }
    }

    #[test]
    fn only_inference_paths_are_routed_by_model() {
        assert_eq!(resource("/v1/embeddings"), Some((Resource::Inference(Endpoint::Embeddings), "/v1/embeddings")));
        assert_eq!(resource("/v1/models").map(|r| r.0), Some(Resource::Models));
        assert_eq!(resource("/v1/chat/completions/"), None);
    }

    #[test]
    fn health_paths_keep_the_path_they_were_asked_on() {
        assert_eq!(resource("/v1/health/ready"), Some((Resource::Ready, "/v1/health/ready")));
        assert_eq!(resource("/health/ready"), Some((Resource::Ready, "/health/ready")));
        assert_eq!(Resource::Live.method(), Method::GET);
        assert_eq!(Resource::Inference(Endpoint::Completions).allow(), "POST");
    }
}
