//! mDNS (DNS-SD over multicast, `mdns-sd`): workers and coordinators announce themselves
//! as `_strata._udp.local.` with TXT records, and browse for each other. The records are
//! standard, so `avahi-browse -r _strata._udp` and `dns-sd -B _strata._udp` list them; the
//! responder shares port 5353 with a system responder (avahi-daemon, mDNSResponder).
//!
//! What travels here is public (ids, ports, sizes, fingerprints): trust comes only from
//! the join token and the certificates, never from an mDNS answer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// The DNS-SD service type of every Strata node.
pub const SERVICE_TYPE: &str = "_strata._udp.local.";
/// Browse results waiting to be handled.
const SEEN_QUEUE: usize = 64;

fn mdns_err(e: mdns_sd::Error) -> Error {
    Error::Mdns(e.to_string())
}

/// A live announcement; withdrawn (goodbye packets) when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// Announces `instance` on `port` with `txt`, on every interface (or only `ip`).
pub fn announce(
    instance: &str,
    port: u16,
    txt: HashMap<String, String>,
    ip: Option<IpAddr>,
) -> Result<Announcement> {
    let daemon = ServiceDaemon::new().map_err(mdns_err)?;
    let host = format!("{instance}.local.");
    let info = match ip {
        Some(ip) => ServiceInfo::new(SERVICE_TYPE, instance, &host, ip, port, txt),
        None => ServiceInfo::new(SERVICE_TYPE, instance, &host, "", port, txt)
            .map(|i| i.enable_addr_auto()),
    }
    .map_err(mdns_err)?;
    let fullname = info.get_fullname().to_string();
    daemon.register(info).map_err(mdns_err)?;
    debug!(%fullname, "announced over mDNS");
    Ok(Announcement { daemon, fullname })
}

/// A node seen over mDNS.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Instance name.
    pub instance: String,
    /// Its TXT record.
    pub txt: HashMap<String, String>,
    /// Its IPv4 addresses.
    pub addresses: Vec<Ipv4Addr>,
    /// The SRV port.
    pub port: u16,
}

impl Seen {
    /// A TXT value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.txt.get(key).map(String::as_str)
    }
}

/// Browses for Strata nodes until cancelled; each resolved node arrives on the channel.
pub fn browse(cancel: CancellationToken) -> Result<mpsc::Receiver<Seen>> {
    let daemon = ServiceDaemon::new().map_err(mdns_err)?;
    let events = daemon.browse(SERVICE_TYPE).map_err(mdns_err)?;
    let (tx, rx) = mpsc::channel(SEEN_QUEUE);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                e = events.recv_async() => match e { Ok(e) => e, Err(_) => break },
            };
            if let ServiceEvent::ServiceResolved(info) = event {
                let txt = info
                    .get_properties()
                    .iter()
                    .map(|p| (p.key().to_string(), p.val_str().to_string()))
                    .collect();
                let mut addresses: Vec<Ipv4Addr> = info.get_addresses_v4().into_iter().collect();
                addresses.sort();
                let instance = info
                    .get_fullname()
                    .trim_end_matches(SERVICE_TYPE)
                    .trim_end_matches('.')
                    .to_string();
                let seen = Seen {
                    instance,
                    txt,
                    addresses,
                    port: info.get_port(),
                };
                if tx.send(seen).await.is_err() {
                    break;
                }
            }
        }
        if let Err(e) = daemon.shutdown() {
            warn!(cause = %e, "mDNS browser did not shut down cleanly");
        }
    });
    Ok(rx)
}
