//! Configuration: `raw` (as written), `load` (file + environment), `validate` (raw → `Snapshot`,
//! every problem with its field path) and `snapshot` (the immutable, typed tables the request
//! path reads through one `ArcSwap` load).

pub mod load;
pub mod raw;
pub mod snapshot;
pub mod validate;

use std::fmt;

pub use load::{EnvSource, format_of, load_file, load_str};
pub use raw::RawConfig;
pub use snapshot::{
    AdminToken, ConfigMeta, LogFormat, LoggingSettings, OnStoreError, RateLimitSettings, RedisSettings, ServerSettings,
    Snapshot, StoreSettings,
};
pub use validate::{validate, validate_after};

/// One thing wrong with a configuration, located by its field path (`routes[2].backends[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Why a configuration could not become a `Snapshot`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    /// (The I/O error is part of the message, not a `source`, so that it is printed once.)
    Read { path: String, cause: std::io::Error },
    /// Every problem found, in file order; never empty.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The located problems (one for a read error, with an empty path).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Invalid(problems) => problems.clone(),
            Self::Read { .. } => vec![Problem::new("", self.to_string())],
        }
    }
}

impl From<Problem> for ConfigError {
    fn from(problem: Problem) -> Self {
        Self::Invalid(vec![problem])
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")
}
