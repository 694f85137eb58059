//! Built-in presets: configuration files embedded from `deploy/presets/`.

use crate::config::{ConfigError, RelayConfig};

/// Names of the built-in presets.
pub const NAMES: [&str; 3] = ["postern", "whatsapp", "signal"];

/// The TOML text of a preset.
pub fn source(name: &str) -> Option<&'static str> {
    match name {
        "postern" => Some(include_str!("../../../deploy/presets/postern.toml")),
        "whatsapp" => Some(include_str!("../../../deploy/presets/whatsapp.toml")),
        "signal" => Some(include_str!("../../../deploy/presets/signal.toml")),
        _ => None,
    }
}

/// Errors selecting a preset.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    /// No preset by that name.
    #[error("unknown preset {0:?} (available: postern, whatsapp, signal)")]
    Unknown(String),
    /// The embedded file is invalid (a build defect).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Loads and validates a built-in preset.
pub fn preset(name: &str) -> Result<RelayConfig, PresetError> {
    let text = source(name).ok_or_else(|| PresetError::Unknown(name.to_string()))?;
    let cfg = RelayConfig::from_toml_str(text)?;
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_presets_load() {
        for n in super::NAMES {
            super::preset(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        assert!(super::preset("nope").is_err());
    }
}
