//! Built-in presets: configuration files embedded from `deploy/presets/`.

use crate::config::{ConfigError, RelayConfig};

/// Names of the built-in presets.
pub const NAMES: [&str; 3] = ["postern", "whatsapp", "signal"];

/// The TOML text of a preset.
pub fn source(name: &str) -> Option<&'static str> {
    match name {
        "postern" => Some(include_str!("../../../../deploy/presets/postern.toml")),
        "whatsapp" => Some(include_str!("../../../../deploy/presets/whatsapp.toml")),
        "signal" => Some(include_str!("../../../../deploy/presets/signal.toml")),
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

/// The `postern` preset in front of `upstreams` (`"host:port"`), with the plain listeners on
/// `plain`, the TLS listeners on `tls` and the stats listener on `stats` (`None`: no stats).
/// Convenient for embedding a relay, e.g. `postern dev` on loopback ephemeral ports:
///
/// ```
/// let cfg = postern_relay::config::presets::postern_on(
///     &["127.0.0.1:5222".to_string()],
///     &["127.0.0.1:0".parse().unwrap()],
///     &["127.0.0.1:0".parse().unwrap()],
///     Some("127.0.0.1:0".parse().unwrap()),
/// )
/// .unwrap();
/// assert_eq!(cfg.listeners.iter().filter(|l| l.enabled).count(), 2);
/// ```
pub fn postern_on(
    upstreams: &[String],
    plain: &[std::net::SocketAddr],
    tls: &[std::net::SocketAddr],
    stats: Option<std::net::SocketAddr>,
) -> Result<RelayConfig, ConfigError> {
    let mut cfg = preset("postern").map_err(|e| match e {
        PresetError::Config(c) => c,
        PresetError::Unknown(n) => ConfigError::Invalid(n),
    })?;
    cfg.set_upstreams(upstreams);
    let template = |tls_wanted: bool| {
        cfg.listeners
            .iter()
            .find(|l| l.tls == tls_wanted && !l.accept_proxy)
            .cloned()
    };
    let (plain_t, tls_t) = (template(false), template(true));
    cfg.listeners.retain(|l| l.accept_proxy);
    for (kind, template, addrs) in [("plain", plain_t, plain), ("tls", tls_t, tls)] {
        let Some(t) = template else { continue };
        for (i, a) in addrs.iter().enumerate() {
            let mut l = t.clone();
            l.name = if i == 0 {
                kind.to_string()
            } else {
                format!("{kind}-{}", i + 1)
            };
            l.listen = *a;
            cfg.listeners.push(l);
        }
    }
    cfg.stats = stats.map(crate::config::StatsSettings::on);
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
