//! Forwarding cover connections to a real web site, byte for byte.

use crate::forward::copy::{CopyParams, Relay};
use crate::stream::BoxIo;
use crate::upstream::Resolver;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// A plain-HTTP web server the cover connections go to.
pub struct Origin {
    /// `host:port` as configured (IPv6 in brackets), resolved like a pool server.
    target: String,
    resolver: Arc<Resolver>,
    params: Arc<CopyParams>,
    connect_timeout: Duration,
}

impl Origin {
    /// `target` is `"host:port"` (checked by the config's validation).
    pub fn new(
        target: &str,
        resolver: Arc<Resolver>,
        params: Arc<CopyParams>,
        connect_timeout: Duration,
    ) -> Origin {
        Origin {
            target: target.to_string(),
            resolver,
            params,
            connect_timeout,
        }
    }

    /// Connects to the site, sends it `read`, then relays both ways until either side
    /// closes. If the site is down the connection is closed, as a proxy with a dead
    /// backend would.
    pub async fn forward(&self, client: BoxIo, read: Vec<u8>, cut: CancellationToken) {
        let mut site = match self
            .resolver
            .connect(&self.target, self.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(site = %self.target, error = %e,
                    "cover site unreachable; closing the connection");
                return;
            }
        };
        let _ = site.set_nodelay(true);
        if !read.is_empty() && site.write_all(&read).await.is_err() {
            return;
        }
        let _ = Relay::new(client, site, self.params.clone(), cut).await;
    }
}
