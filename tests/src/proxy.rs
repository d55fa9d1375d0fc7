//! A TCP proxy in front of one server: the link through it can be cut (every connection
//! breaks, new ones are refused) and healed, as a network partition would.

use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to one address, listening on 127.0.0.1 at a port the OS picks.
pub struct Proxy {
    /// Where clients connect.
    pub addr: String,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

struct Inner {
    target: String,
    down: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, JoinHandle<()>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Proxy {
    /// Starts a proxy to `target` on the current tokio runtime.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let inner = Arc::new(Inner {
            target,
            down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::default(),
        });
        let accept_inner = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if accept_inner.down.load(Relaxed) {
                    continue; // dropped: refused
                }
                let id = accept_inner.next_id.fetch_add(1, Relaxed);
                let inner = accept_inner.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&inner.target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                    }
                    inner.conns.lock().expect("proxy connections").remove(&id);
                });
                accept_inner.conns.lock().expect("proxy connections").insert(id, task);
            }
        });
        Proxy { addr, inner, accept }
    }

    /// Closes every connection (both ends see them break).
    pub fn cut(&self) {
        for (_, t) in std::mem::take(&mut *self.inner.conns.lock().expect("proxy connections")) {
            t.abort();
        }
    }

    /// Refuses (true) or accepts (false) new connections.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Relaxed);
    }

    /// Cuts the link: every connection breaks and new ones are refused until [`Proxy::heal`].
    pub fn partition(&self) {
        self.set_down(true);
        self.cut();
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.set_down(false);
    }

    /// Breaks one connection at random, if any.
    pub fn cut_one(&self) {
        let mut conns = self.inner.conns.lock().expect("proxy connections");
        if conns.is_empty() {
            return;
        }
        let i = rand::thread_rng().gen_range(0..conns.len());
        let id = *conns.keys().nth(i).expect("in range");
        if let Some(t) = conns.remove(&id) {
            t.abort();
        }
    }
}
