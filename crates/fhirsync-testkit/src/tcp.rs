//! A TCP proxy on 127.0.0.1 that a test can take down (new connections are
//! refused by closing them at once, open ones are cut) or stall (bytes stop
//! flowing both ways, connections stay open) and bring back up.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Connections are cut and refused.
    Down,
    /// Connections hang: nothing is forwarded until the link is up again.
    Stalled,
}

pub struct TcpProxy {
    /// `127.0.0.1:PORT` of the proxy.
    pub addr: String,
    link: watch::Sender<Link>,
    target: Arc<Mutex<String>>,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let (link, rx) = watch::channel(Link::Up);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = Arc::new(Mutex::new(target.to_owned()));
        let t2 = target.clone();
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *rx.borrow() == Link::Down {
                    drop(inbound);
                    continue;
                }
                let t = t2.lock().map(|t| t.clone()).unwrap_or_default();
                let rx = rx.clone();
                let h = tokio::spawn(async move {
                    if let Ok(out) = TcpStream::connect(&t).await {
                        pipe(inbound, out, rx).await;
                    }
                });
                if let Ok(mut v) = c2.lock() {
                    v.retain(|h| !h.is_finished());
                    v.push(h);
                }
            }
        });
        TcpProxy {
            addr,
            link,
            target,
            accept,
            conns,
        }
    }

    /// A URL through the proxy for a URL of the target (`http://127.0.0.1:P/fhir`).
    pub fn url_for(&self, target_url: &str) -> String {
        let rest = target_url
            .strip_prefix("http://")
            .and_then(|r| r.find('/').map(|i| &r[i..]))
            .unwrap_or("");
        format!("http://{}{rest}", self.addr)
    }

    /// Sends new connections to another `host:port` (a server moved).
    pub fn retarget(&self, target: &str) {
        if let Ok(mut t) = self.target.lock() {
            *t = target.to_owned();
        }
        self.set(Link::Down);
        self.set(Link::Up);
    }

    pub fn set(&self, l: Link) {
        self.link.send_replace(l);
        if l == Link::Down {
            if let Ok(mut v) = self.conns.lock() {
                for h in v.drain(..) {
                    h.abort();
                }
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut v) = self.conns.lock() {
            for h in v.drain(..) {
                h.abort();
            }
        }
    }
}

/// Copies both ways while the link is up; waits while it is stalled.
async fn pipe(a: TcpStream, b: TcpStream, rx: watch::Receiver<Link>) {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let one = copy(ar, bw, rx.clone());
    let two = copy(br, aw, rx);
    tokio::select! {
        _ = one => {},
        _ = two => {},
    }
}

async fn copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let l = *rx.borrow_and_update();
            match l {
                Link::Up => break,
                Link::Down => return,
                Link::Stalled => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
