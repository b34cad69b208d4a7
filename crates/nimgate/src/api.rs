//! The OpenAI-compatible paths nimgate routes by model, and the upstream path of each.
//! A fixed, small set: unknown paths are answered by the gateway, never forwarded blindly.

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

    /// The model-routed POST endpoint at `path`, if any.
    pub fn inference(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }
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
        assert_eq!(Endpoint::inference("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::inference("/v1/models"), None);
        assert_eq!(Endpoint::inference("/v1/chat/completions/"), None);
    }
}
