//! The network a process listens and connects on: the operating system's TCP ([`Network::Os`],
//! what every binary uses), or a simulated one ([`SimNetwork`]) on which a deterministic
//! simulation runs a whole cluster in one process, on tokio's paused clock.
//!
//! The simulated network joins hosts (one IP address each) by in-memory byte pipes. Between any
//! two hosts it can cut the link (a partition: open connections stop delivering bytes and new
//! ones time out, as when packets are dropped) or slow it (each read waits the link's delay).
//! A host that crashes drops its ends, and its peers read end-of-stream, as after a reset.
//! Everything waits on tokio's clock, so a paused runtime runs it in simulated time.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;

/// Bytes a simulated connection buffers in each direction before a writer waits.
const PIPE_BYTES: usize = 1024 * 1024;
/// How long a connection attempt across a cut link waits before it fails.
pub const SIM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a read on a cut link looks again whether the link healed.
const CUT_RECHECK: Duration = Duration::from_millis(20);

/// Where a process's connections go.
#[derive(Clone, Debug, Default)]
pub enum Network {
    /// The operating system's TCP.
    #[default]
    Os,
    /// One host of a simulated network.
    Sim(SimHost),
}

impl Network {
    /// Listens on `address` (port 0: any free port).
    pub async fn bind(&self, address: SocketAddr) -> io::Result<Listener> {
        match self {
            Network::Os => Ok(Listener::Tcp(TcpListener::bind(address).await?)),
            Network::Sim(host) => host.bind(address),
        }
    }

    /// Opens a connection to `address` (`host:port`; a simulated network takes IP addresses
    /// only).
    pub async fn connect(&self, address: &str) -> io::Result<Conn> {
        match self {
            Network::Os => Ok(Conn::Tcp(TcpStream::connect(address).await?)),
            Network::Sim(host) => {
                let address = address.parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("`{address}` is not an IP address and port"),
                    )
                })?;
                host.connect(address).await.map(Conn::Sim)
            }
        }
    }
}

impl PartialEq for Network {
    fn eq(&self, other: &Network) -> bool {
        match (self, other) {
            (Network::Os, Network::Os) => true,
            (Network::Sim(a), Network::Sim(b)) => {
                a.ip == b.ip && Arc::ptr_eq(&a.network.state, &b.network.state)
            }
            _ => false,
        }
    }
}

/// A listening socket, real or simulated.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Sim(SimListener),
}

impl Listener {
    /// The next connection and its peer's address.
    pub async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| (Conn::Tcp(s), peer)),
            Listener::Sim(l) => l.accept().await,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Sim(l) => Ok(l.address),
        }
    }
}

/// A connection, real or simulated.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Sim(SimStream),
}

impl Conn {
    /// Disables Nagle's algorithm on TCP (nothing to do on a simulated link).
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nodelay(nodelay),
            Conn::Sim(_) => Ok(()),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Sim(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Sim(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Sim(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Sim(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Sim(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Sim(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A simulated network: hosts, their listeners, and the state of the link between each pair.
#[derive(Clone, Debug, Default)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    listeners: HashMap<SocketAddr, mpsc::UnboundedSender<(SimStream, SocketAddr)>>,
    links: HashMap<(IpAddr, IpAddr), Arc<Link>>,
    next_port: u16,
}

/// The link between two hosts (both directions).
#[derive(Debug, Default)]
struct Link {
    cut: AtomicBool,
    delay_us: AtomicU64,
}

impl Link {
    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

impl SimState {
    fn link(&mut self, a: IpAddr, b: IpAddr) -> Arc<Link> {
        let key = if a <= b { (a, b) } else { (b, a) };
        self.links.entry(key).or_default().clone()
    }

    fn port(&mut self) -> u16 {
        self.next_port = self.next_port.wrapping_add(1).max(40_000);
        self.next_port
    }
}

impl SimNetwork {
    /// An empty network.
    pub fn new() -> SimNetwork {
        SimNetwork::default()
    }

    /// The network as host `ip` sees it.
    pub fn host(&self, ip: IpAddr) -> Network {
        Network::Sim(SimHost {
            network: self.clone(),
            ip,
        })
    }

    /// Cuts the link between `a` and `b`: their open connections stop delivering bytes and new
    /// ones fail after [`SIM_CONNECT_TIMEOUT`], until [`heal`](Self::heal).
    pub fn partition(&self, a: IpAddr, b: IpAddr) {
        self.lock().link(a, b).cut.store(true, Ordering::Relaxed);
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: IpAddr, b: IpAddr) {
        self.lock().link(a, b).cut.store(false, Ordering::Relaxed);
    }

    /// Restores every link and removes every delay.
    pub fn heal_all(&self) {
        for link in self.lock().links.values() {
            link.cut.store(false, Ordering::Relaxed);
            link.delay_us.store(0, Ordering::Relaxed);
        }
    }

    /// Makes each read across the link between `a` and `b` wait `delay`.
    pub fn slow(&self, a: IpAddr, b: IpAddr, delay: Duration) {
        self.lock()
            .link(a, b)
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic elsewhere cannot leave the maps half-changed: each change is one insert.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One host's view of a [`SimNetwork`].
#[derive(Clone, Debug)]
pub struct SimHost {
    network: SimNetwork,
    ip: IpAddr,
}

impl SimHost {
    fn bind(&self, address: SocketAddr) -> io::Result<Listener> {
        if address.ip() != self.ip && !address.ip().is_unspecified() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("host {} cannot listen on {address}", self.ip),
            ));
        }
        let mut state = self.network.lock();
        let port = match address.port() {
            0 => state.port(),
            p => p,
        };
        let address = SocketAddr::new(self.ip, port);
        if state
            .listeners
            .get(&address)
            .is_some_and(|tx| !tx.is_closed())
        {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{address} is in use"),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        state.listeners.insert(address, tx);
        Ok(Listener::Sim(SimListener {
            address,
            accepted: tokio::sync::Mutex::new(rx),
        }))
    }

    async fn connect(&self, address: SocketAddr) -> io::Result<SimStream> {
        let link = self.network.lock().link(self.ip, address.ip());
        let deadline = tokio::time::Instant::now() + SIM_CONNECT_TIMEOUT;
        while link.cut.load(Ordering::Relaxed) {
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {address}: no route (partitioned)"),
                ));
            }
            tokio::time::sleep(CUT_RECHECK).await;
        }
        let delay = link.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.network.lock();
        let Some(listener) = state.listeners.get(&address).cloned() else {
            return Err(refused(address));
        };
        let peer = SocketAddr::new(self.ip, state.port());
        drop(state);
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        listener
            .send((SimStream::new(theirs, link.clone()), peer))
            .map_err(|_| refused(address))?;
        Ok(SimStream::new(ours, link))
    }
}

fn refused(address: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("nothing listens on {address}"),
    )
}

/// A simulated listening socket; dropping it frees its address.
#[derive(Debug)]
pub struct SimListener {
    address: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::UnboundedReceiver<(SimStream, SocketAddr)>>,
}

impl SimListener {
    async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        match self.accepted.lock().await.recv().await {
            Some((stream, peer)) => Ok((Conn::Sim(stream), peer)),
            None => Err(io::Error::other("the simulated network is gone")),
        }
    }
}

/// One end of a simulated connection.
#[derive(Debug)]
pub struct SimStream {
    pipe: DuplexStream,
    link: Arc<Link>,
    /// A wait in progress before the next read (a cut link, or the link's delay).
    wait: Option<Pin<Box<Sleep>>>,
    /// The link's delay has been waited for the next read.
    delayed: bool,
}

impl SimStream {
    fn new(pipe: DuplexStream, link: Arc<Link>) -> SimStream {
        SimStream {
            pipe,
            link,
            wait: None,
            delayed: false,
        }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(wait) = this.wait.as_mut() {
                std::task::ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            if this.link.cut.load(Ordering::Relaxed) {
                this.wait = Some(Box::pin(tokio::time::sleep(CUT_RECHECK)));
                continue;
            }
            let delay = this.link.delay();
            if !delay.is_zero() && !this.delayed {
                this.delayed = true;
                this.wait = Some(Box::pin(tokio::time::sleep(delay)));
                continue;
            }
            let before = buf.filled().len();
            let read = Pin::new(&mut this.pipe).poll_read(cx, buf);
            if read.is_ready() && buf.filled().len() > before {
                this.delayed = false;
            }
            return read;
        }
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().pipe).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().pipe).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().pipe).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_connect_and_a_cut_link_holds_bytes_until_it_heals() {
        let net = SimNetwork::new();
        let server = net.host(ip(1));
        let client = net.host(ip(2));
        let listener = server.bind(SocketAddr::new(ip(1), 7000)).await.unwrap();
        assert_eq!(listener.local_addr().unwrap(), SocketAddr::new(ip(1), 7000));
        let mut ours = client
            .connect(&listener.local_addr().unwrap().to_string())
            .await
            .unwrap();
        let (mut theirs, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), ip(2));
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        net.partition(ip(1), ip(2));
        ours.write_all(b"pong").await.unwrap();
        let held = tokio::time::timeout(Duration::from_secs(5), theirs.read_exact(&mut got)).await;
        assert!(held.is_err(), "bytes crossed a cut link");
        let refused = client
            .connect(&listener.local_addr().unwrap().to_string())
            .await;
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::TimedOut);

        net.heal(ip(1), ip(2));
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(ours);
        assert_eq!(
            theirs.read(&mut got).await.unwrap(),
            0,
            "a dropped end reads as closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_link_delays_reads_and_a_missing_listener_refuses() {
        let net = SimNetwork::new();
        let listener = net
            .host(ip(1))
            .bind(SocketAddr::new(ip(1), 0))
            .await
            .unwrap();
        let address = listener.local_addr().unwrap();
        assert!(address.port() != 0);
        net.slow(ip(1), ip(2), Duration::from_millis(40));
        let started = tokio::time::Instant::now();
        let mut ours = net.host(ip(2)).connect(&address.to_string()).await.unwrap();
        let (mut theirs, _) = listener.accept().await.unwrap();
        ours.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        theirs.read_exact(&mut got).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(80));

        assert!(
            net.host(ip(2)).bind(address).await.is_err(),
            "another host's address"
        );
        assert!(
            net.host(ip(1)).bind(address).await.is_err(),
            "address in use"
        );
        drop(listener);
        let gone = net.host(ip(2)).connect(&address.to_string()).await;
        assert_eq!(gone.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            net.host(ip(1)).bind(address).await.is_ok(),
            "a freed address is reused"
        );
    }
}
