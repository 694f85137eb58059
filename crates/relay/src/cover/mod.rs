//! The cover site: what a relay with a secret shows everyone who does not prove that they
//! hold its link — browsers, search engines' crawlers, scanners and censors' probes.
//!
//! The [gate](crate::accept::gate) hands over a connection together with every byte it has
//! read from it, so the site sees exactly what a web server in the relay's place would
//! have seen, and answers the same way:
//!
//! * [`site`] — a small web server (hyper): a neutral built-in page, or the static files of
//!   a directory (`[cover] dir`);
//! * [`origin`] — forwarding, byte for byte, to a real web site (`[cover] upstream`): the
//!   relay then answers exactly as that site does, errors and timeouts included.
//!
//! Cover connections are counted on the stats page as the listener `cover-site`.

pub mod origin;
pub mod site;

use crate::config::{CoverSettings, Limits};
use crate::forward::copy::CopyParams;
use crate::stats::ListenerStats;
use crate::stream::BoxIo;
use crate::upstream::Resolver;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The cover site of one relay.
pub struct Cover {
    what: What,
    stats: Arc<ListenerStats>,
}

enum What {
    Site(Arc<site::Site>),
    Origin(origin::Origin),
}

impl Cover {
    /// The cover site `settings` describe (validated by the config).
    pub fn new(settings: &CoverSettings, limits: &Limits, resolver: Arc<Resolver>) -> Arc<Cover> {
        let stats = ListenerStats::new(
            "cover-site",
            "cover",
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        );
        let what = match &settings.upstream {
            Some(target) => What::Origin(origin::Origin::new(
                target,
                resolver,
                // The site is the operator's own: what visitors send goes to it unchanged.
                CopyParams::new(limits, false, stats.clone()),
                limits.connect_timeout,
            )),
            None => What::Site(Arc::new(site::Site::new(
                settings.dir.clone(),
                settings.header_timeout,
            ))),
        };
        Arc::new(Cover { what, stats })
    }

    /// Counters of the connections the cover site served.
    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    /// Serves one connection, replaying `read` (the bytes the gate read) first.
    pub async fn serve(&self, io: BoxIo, read: Vec<u8>, cut: CancellationToken) {
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        match &self.what {
            What::Site(site) => site.clone().serve(io, read, cut).await,
            What::Origin(origin) => origin.forward(io, read, cut).await,
        }
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}
