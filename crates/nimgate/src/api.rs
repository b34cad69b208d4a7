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
    /// OpenAI's Responses API.
    Responses,
    /// NIM's reranking API.
    Ranking,
    Models,
}

/// How an endpoint's streams end when they are complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Chat and completions: a last `data: [DONE]`.
    Done,
    /// The Responses API: a terminal typed event (`response.completed`, `response.incomplete`
    /// or `response.failed`), and no `[DONE]`.
    TerminalEvent,
}

impl Endpoint {
    /// Every endpoint, in the order of `index`.
    pub const ALL: [Endpoint; 6] =
        [Self::ChatCompletions, Self::Completions, Self::Embeddings, Self::Responses, Self::Ranking, Self::Models];

    pub const fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Ranking => "/v1/ranking",
            Self::Models => "/v1/models",
        }
    }

    /// How its streams end.
    pub fn stream_end(self) -> StreamEnd {
        match self {
            Self::Responses => StreamEnd::TerminalEvent,
            _ => StreamEnd::Done,
        }
    }

    /// Whether a stream's usage must be asked for with `stream_options` (chat and completions;
    /// a Responses stream always carries it in its terminal event and refuses the option).
    pub fn usage_needs_stream_options(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }

    /// A dense index, for per-endpoint tables built once per backend.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether its answers generate tokens (embeddings and rankings only read them).
    pub fn completes(self) -> bool {
        !matches!(self, Self::Embeddings | Self::Ranking)
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
const SERVED: [(&str, Resource); 10] = [
    (Endpoint::ChatCompletions.path(), Resource::Inference(Endpoint::ChatCompletions)),
    (Endpoint::Completions.path(), Resource::Inference(Endpoint::Completions)),
    (Endpoint::Embeddings.path(), Resource::Inference(Endpoint::Embeddings)),
    (Endpoint::Responses.path(), Resource::Inference(Endpoint::Responses)),
    (Endpoint::Ranking.path(), Resource::Inference(Endpoint::Ranking)),
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
        assert_eq!(resource("/v1/responses").map(|r| r.0), Some(Resource::Inference(Endpoint::Responses)));
        assert_eq!(resource("/v1/ranking").map(|r| r.0), Some(Resource::Inference(Endpoint::Ranking)));
        assert!(!Endpoint::Ranking.completes() && Endpoint::Responses.completes());
    }

    #[test]
    fn health_paths_keep_the_path_they_were_asked_on() {
        assert_eq!(resource("/v1/health/ready"), Some((Resource::Ready, "/v1/health/ready")));
        assert_eq!(resource("/health/ready"), Some((Resource::Ready, "/health/ready")));
        assert_eq!(Resource::Live.method(), Method::GET);
        assert_eq!(Resource::Inference(Endpoint::Completions).allow(), "POST");
    }
}
