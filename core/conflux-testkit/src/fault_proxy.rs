//! A TCP proxy that tests put between Conflux and a real service (Redis,
//! PostgreSQL, NATS, Kafka) to take the service away and bring it back
//! without stopping the shared server: cut every connection and refuse new
//! ones, stall (hold connections open, pass nothing), or add delay.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    None,
    /// Close every connection and refuse new ones (accept, then close at once).
    Cut,
    /// Keep connections open but pass no byte either way.
    Stall,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Pass requests to the service but drop its replies: the write landed,
    /// the client never hears so (and retries it).
    LoseReplies,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (fault, watching) = watch::channel(Fault::None);
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watching.borrow() == Fault::Cut {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, upstream.clone(), watching.clone()));
            }
        });
        Ok(FaultProxy { addr, fault, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:port` of the proxy, for URLs.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Cuts every connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.set(Fault::Cut);
    }

    pub fn stall(&self) {
        self.set(Fault::Stall);
    }

    pub fn delay(&self, delay: Duration) {
        self.set(Fault::Delay(delay));
    }

    /// Lets requests through and drops the replies until [`FaultProxy::restore`].
    pub fn lose_replies(&self) {
        self.set(Fault::LoseReplies);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.set(Fault::None);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections see the cut and close.
        self.fault.send_replace(Fault::Cut);
    }
}

async fn forward(client: TcpStream, upstream: String, fault: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(&upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending (or a cut) ends both.
    tokio::select! {
        _ = pump(client_read, server_write, fault.clone(), Direction::Request) => {}
        _ = pump(server_read, client_write, fault, Direction::Reply) => {}
    }
}

#[derive(PartialEq)]
enum Direction {
    Request,
    Reply,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Cut {
                    return;
                }
                continue;
            }
        };
        // Hold the chunk while stalled; drop the connection on a cut.
        let mut pass = true;
        loop {
            let current = *fault.borrow_and_update();
            match current {
                Fault::LoseReplies => {
                    pass = direction == Direction::Request;
                    break;
                }
                Fault::Cut => return,
                Fault::Stall => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Fault::None => break,
            }
        }
        if pass && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server standing in for a real service.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut got = vec![0u8; text.len()];
        stream.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn forwards_cuts_refuses_and_restores() {
        let proxy = FaultProxy::start(&echo().await.to_string()).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"hello").await.unwrap(), b"hello");

        proxy.cut();
        // The open connection is closed...
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("closed promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // ...and a new one is refused.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf)).await.expect("closed promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, b"back").await.unwrap(), b"back");
    }

    #[tokio::test]
    async fn stall_holds_bytes_until_restored() {
        let proxy = FaultProxy::start(&echo().await.to_string()).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.stall();
        stream.write_all(b"held").await.unwrap();
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut got)).await;
        assert!(early.is_err(), "nothing passes while stalled");
        proxy.restore();
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"held");
    }

    #[tokio::test]
    async fn lose_replies_passes_requests_and_drops_answers() {
        // A service that answers each chunk and tells the test what it got.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                got_tx.send(buf[..n].to_vec()).unwrap();
                if s.write_all(b"ok").await.is_err() {
                    return;
                }
            }
        });
        let proxy = FaultProxy::start(&upstream.to_string()).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.lose_replies();
        stream.write_all(b"write").await.unwrap();
        let landed = tokio::time::timeout(Duration::from_secs(5), got_rx.recv()).await.unwrap().unwrap();
        assert_eq!(landed, b"write", "the request reached the service");
        let mut answer = [0u8; 2];
        let heard = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut answer)).await;
        assert!(heard.is_err(), "the answer was dropped");
        proxy.restore();
        stream.write_all(b"again").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await.unwrap().unwrap();
        assert_eq!(&answer, b"ok");
    }
}
