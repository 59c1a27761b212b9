//! Accepting mTLS connections: each handshake runs on its own task, bounded in time
//! ([`HANDSHAKE_TIMEOUT`]) and in number, overall ([`MAX_HANDSHAKES`]) and per source address
//! ([`MAX_HANDSHAKES_PER_PEER`]): no one caller can hold all the handshake slots and keep others
//! (or the node's own administration) out. A connection over a limit is closed at once. Who the
//! caller is is known only after the handshake, so the per-caller limit is per address (per /64
//! for IPv6).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::server::TlsStream;

use super::tls::ReloadingConfig;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address at most.
pub const MAX_HANDSHAKES_PER_PEER: usize = 16;

/// The range a handshake is counted against: the address itself for IPv4, its /64 for IPv6 (one
/// host usually holds a whole /64).
fn range_of(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// Handshakes in progress per address range; the entry goes when its count reaches zero.
#[derive(Default)]
struct InProgress(Mutex<HashMap<IpAddr, usize>>);

impl InProgress {
    /// Takes a slot for `peer`, if both limits allow.
    fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = m.values().sum();
        let mine = m.entry(peer).or_default();
        if total >= MAX_HANDSHAKES || *mine >= MAX_HANDSHAKES_PER_PEER {
            if *mine == 0 {
                m.remove(&peer);
            }
            return None;
        }
        *mine += 1;
        Some(Slot {
            of: Arc::clone(self),
            peer,
        })
    }
}

/// A handshake slot, given back on drop.
struct Slot {
    of: Arc<InProgress>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .of
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// Accepts connections on `listener` for ever, handing each completed handshake to `tx`.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    tx: mpsc::Sender<std::io::Result<TlsStream<tokio::net::TcpStream>>>,
) {
    let in_progress = Arc::new(InProgress::default());
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small request/response messages go out at once (no Nagle wait for an ACK), as
        // gRPC servers do.
        if let Err(e) = sock.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on a connection from {peer}: {e}");
        }
        let Some(slot) = in_progress.take(range_of(peer.ip())) else {
            tracing::warn!("too many TLS handshakes in progress (from {peer} or overall); closed");
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await;
            drop(slot);
            match result {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => tracing::info!("TLS handshake from {peer} refused: {e}"),
                Err(_) => tracing::info!("TLS handshake from {peer} timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_count_per_64() {
        let a: IpAddr = "fd00:1:2:3::1".parse().expect("addr");
        let b: IpAddr = "fd00:1:2:3:ffff::9".parse().expect("addr");
        assert_eq!(range_of(a), range_of(b));
        let v4: IpAddr = "::ffff:10.0.0.1".parse().expect("addr");
        assert_eq!(range_of(v4), "10.0.0.1".parse::<IpAddr>().expect("addr"));
    }

    #[test]
    fn slots_are_limited_per_peer_and_given_back() {
        let p = Arc::new(InProgress::default());
        let a: IpAddr = "10.0.0.1".parse().expect("addr");
        let b: IpAddr = "10.0.0.2".parse().expect("addr");
        let held: Vec<Slot> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| p.take(a).expect("a slot"))
            .collect();
        assert!(p.take(a).is_none(), "one address holds no more");
        let other = p.take(b).expect("another address is not held back");
        drop(held);
        drop(other);
        assert!(p.take(a).is_some());
        assert!(
            p.0.lock().expect("lock").values().all(|n| *n <= 1),
            "counts go back down"
        );
    }
}
