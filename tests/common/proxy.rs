//! A TCP proxy in front of PostgreSQL that a test can unplug: `cut` drops every connection
//! through it and refuses new ones (as a network partition or a database crash would), and
//! `restore` lets connections through again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accepting: tokio::task::JoinHandle<()>,
}

struct State {
    open: AtomicBool,
    /// Cancelled by `cut`: ends every connection made before it.
    links: Mutex<CancellationToken>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            open: AtomicBool::new(true),
            links: Mutex::new(CancellationToken::new()),
        });
        let shared = state.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !shared.open.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let cut = shared.links.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            state,
            accepting,
        }
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.state.open.store(false, Ordering::Release);
        let mut links = self.state.links.lock().unwrap();
        links.cancel();
        *links = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.state.open.store(true, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.state.links.lock().unwrap().cancel();
    }
}
