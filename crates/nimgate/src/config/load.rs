//! Reading the configuration: a file (YAML by default; TOML or JSON by extension) merged with
//! `NIMGATE__SECTION__FIELD` environment overrides, deserialized into `RawConfig` with the field
//! path of any type error. Nothing is validated here beyond the shape: that is `validate`'s job.

use std::collections::HashMap;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};

use super::raw::RawConfig;
use super::{ConfigError, Problem};

/// Where the environment overrides come from. Tests pass an explicit map so that they never
/// touch the process environment (and can run in parallel).
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// The process environment (`NIMGATE__SERVER__LISTEN=...`).
    #[default]
    Process,
    /// An explicit map of variable names to values, as if they were the environment.
    Map(HashMap<String, String>),
}

impl EnvSource {
    /// The value of variable `name`, if set (and valid Unicode).
    pub fn var(&self, name: &str) -> Option<String> {
        match self {
            Self::Process => std::env::var(name).ok(),
            Self::Map(map) => map.get(name).cloned(),
        }
    }
}

/// Reads `path` and applies the environment overrides.
pub fn load_file(path: &Path, env: &EnvSource) -> Result<RawConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.display().to_string(), cause })?;
    load_str(&text, format_of(path), env)
}

/// Parses configuration text in the given format and applies the environment overrides.
pub fn load_str(text: &str, format: FileFormat, env: &EnvSource) -> Result<RawConfig, ConfigError> {
    let mut overrides = Environment::with_prefix("NIMGATE").separator("__").try_parsing(true);
    if let EnvSource::Map(map) = env {
        overrides = overrides.source(Some(map.clone()));
    }
    let merged = Config::builder()
        .add_source(File::from_str(text, format))
        .add_source(overrides)
        .build()
        .map_err(|e| ConfigError::from(Problem::new("", format!("cannot parse: {e}"))))?;
    serde_path_to_error::deserialize::<_, RawConfig>(merged).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::from(Problem::new(path, without_key_suffix(e.into_inner().to_string())))
    })
}

/// The config crate appends ` for key `...`` to messages, in its own path notation; the
/// problem already carries the path, so the suffix only adds noise.
fn without_key_suffix(mut message: String) -> String {
    if let Some(at) = message.rfind(" for key `") {
        message.truncate(at);
    }
    message
}

/// The file format implied by a path's extension; YAML unless it says TOML or JSON.
pub fn format_of(path: &Path) -> FileFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => FileFormat::Toml,
        Some("json") => FileFormat::Json,
        _ => FileFormat::Yaml,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvSource {
        EnvSource::Map(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn yaml_is_read_and_env_overrides_win() {
        let raw = load_str(
            "server:\n  listen: 127.0.0.1:1\n  max_body_bytes: 10\n",
            FileFormat::Yaml,
            &env(&[
                ("NIMGATE__SERVER__LISTEN", "0.0.0.0:8080"),
                ("NIMGATE__SERVER__MAX_BODY_BYTES", "2048"),
                ("NIMGATE__SERVER__ALLOW_ANONYMOUS", "true"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(raw.server.listen.as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(raw.server.max_body_bytes, Some(2048));
        assert_eq!(raw.server.allow_anonymous, Some(true));
    }

    #[test]
    fn type_errors_carry_the_field_path() {
        let err =
            load_str("backends:\n  - name: a\n    url: http://x\n    weight: heavy\n", FileFormat::Yaml, &env(&[]))
                .unwrap_err();
        let text = err.to_string();
        assert_eq!(text, "backends[0].weight: invalid type: string \"heavy\", expected an integer");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let err = load_str("server:\n  listn: x\n", FileFormat::Yaml, &env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("server") && text.contains("listn"), "{text}");
    }

    #[test]
    fn toml_and_json_are_accepted() {
        let t = load_str("[server]\nlisten = \"127.0.0.1:9\"\n", FileFormat::Toml, &env(&[])).unwrap();
        assert_eq!(t.server.listen.as_deref(), Some("127.0.0.1:9"));
        let j = load_str(r#"{"server":{"listen":"127.0.0.1:9"}}"#, FileFormat::Json, &env(&[])).unwrap();
        assert_eq!(j.server.listen.as_deref(), Some("127.0.0.1:9"));
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        assert!(load_str("server: [", FileFormat::Yaml, &env(&[])).is_err());
    }
}
