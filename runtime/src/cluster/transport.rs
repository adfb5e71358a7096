//! How bytes travel between the head and its nodes: TCP, optionally inside TLS, always read
//! through a checking reader.
//!
//! ractor_cluster frames each message as an 8-byte big-endian length and a protobuf payload, and
//! allocates the length it reads before it reads the payload: 8 bytes of anything else (a TLS
//! ClientHello on a plain listener, a port scanner) make it ask for exabytes and abort the
//! process. So tandem hands ractor_cluster only streams that it accepted or opened itself
//! (`NodeServerMessage::ConnectionOpenedExternal`), each read through [`Frames`], which ends the
//! stream (an EOF, logged) at a first byte that cannot start a cluster session or a frame longer
//! than [`MAX_FRAME`], and turns read errors into an EOF (ractor_cluster retries a failed read
//! forever).
//!
//! **The head** ([`serve`]) admits each connection in a task of its own, so one that sends
//! nothing holds up no other, and gives it [`HANDSHAKE`] to be admitted. It looks at the first
//! byte before anything else reads it:
//!
//! - `0x16`, a TLS ClientHello: a TLS head does the handshake (a failure is logged as
//!   `node connection refused: TLS handshake failed: ...`); a plain head refuses it
//!   (`node connection refused: it opened a TLS session, but this head has no TLS ...`).
//! - `0x00`, a cluster frame in clear: a plain head takes it; a TLS head refuses it
//!   (`node connection refused: plain TCP, but this head requires TLS ...`) and answers a TLS
//!   alert.
//! - anything else is refused (`node connection refused: not a tandem node ...`).
//!
//! A refused connection is closed after the head has read what the peer sent (a close with
//! unread data would be a reset, which can discard the alert before the peer reads it).
//! ractor_cluster's own listener, which it always opens, is left on a loopback port that no one
//! is told about and given [`refuse_all_tls`], so no connection to it becomes a node session
//! (see `start_server`).
//!
//! **The worker** ([`connect`]) opens the connection, does the TLS handshake when it has
//! [`ClientTls`] (an untrusted certificate or a head that closes the handshake is an error that
//! says so), and hands the stream to its own node server. A plain worker that meets a TLS head
//! reads the head's TLS alert as the first byte of the session: [`Frames`] records
//! [`Fault::SpeaksTls`], so the worker can say the head requires TLS instead of blaming the
//! cookie.
//!
//! TLS is rustls 0.23 (the tokio-rustls that ractor_cluster depends on) with the aws-lc-rs
//! crypto provider, passed to each config explicitly, so nothing depends on a process-wide
//! default provider. The head presents `cluster.tls_cert` (a PEM chain) with `cluster.tls_key`;
//! the worker trusts the certificates in its `--tls-ca` file (the head's own self-signed
//! certificate, or the CA that issued it) and checks them against `--tls-server-name`, by default
//! the host of `--join`. Only the head is authenticated by TLS; a node still proves itself with
//! the cookie, now inside the encrypted session.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::{aws_lc_rs, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::RuntimeError;

/// The longest frame either side reads: far above any cluster message (weight chunks are at most
/// 16 MiB), far below what the bytes of another protocol decode to.
pub const MAX_FRAME: u64 = 1 << 30;

/// How long a new connection has to be admitted (its first byte, and the TLS handshake).
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// First byte of a TLS handshake record, as a ClientHello starts.
const TLS_HANDSHAKE: u8 = 0x16;
/// First byte of a TLS alert record.
const TLS_ALERT: u8 = 0x15;
/// A fatal `unexpected_message` alert (TLS 1.2 record version): what a TLS head answers to bytes
/// in clear.
const UNEXPECTED_MESSAGE_ALERT: [u8; 7] = [TLS_ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a];

/// The crypto provider of every TLS config here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// Why [`Frames`] ended a stream early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer's first bytes were a TLS record (a ClientHello, or an alert).
    SpeaksTls,
    /// The peer's first byte starts no cluster frame.
    NotCluster(u8),
    /// A frame header announced more than [`MAX_FRAME`] bytes.
    FrameTooLong(u64),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::SpeaksTls => f.write_str("the peer speaks TLS"),
            Fault::NotCluster(b) => write!(f, "the peer does not speak the cluster protocol (first byte {b:#04x})"),
            Fault::FrameTooLong(n) => write!(f, "a frame of {n} bytes, over the limit of {MAX_FRAME}"),
        }
    }
}

/// Where a stream's [`Fault`] is recorded, for whoever opened it to read after the session ends.
pub type FaultCell = Arc<OnceLock<Fault>>;

/// A reader that passes ractor_cluster's frames through and ends the stream at anything else
/// (see the module doc). Every end is an EOF, so ractor_cluster closes the session.
pub struct Frames<R> {
    inner: R,
    peer: String,
    fault: FaultCell,
    /// The current frame's header: `hdr_in` bytes of it read, `hdr_out` handed on.
    hdr: [u8; 8],
    hdr_in: usize,
    hdr_out: usize,
    /// Payload bytes of the current frame still to pass through.
    left: u64,
    /// No frame header has been completed yet.
    first: bool,
    done: bool,
}

impl<R> Frames<R> {
    pub fn new(inner: R, peer: String, fault: FaultCell) -> Self {
        Self {
            inner,
            peer,
            fault,
            hdr: [0; 8],
            hdr_in: 0,
            hdr_out: 8,
            left: 0,
            first: true,
            done: false,
        }
    }

    fn refuse(&mut self, fault: Fault) {
        tracing::warn!(peer = %self.peer, "closing the cluster connection: {fault}");
        let _ = self.fault.set(fault);
        self.done = true;
    }

    fn failed(&mut self, e: io::Error) {
        tracing::debug!(peer = %self.peer, error = %e, "cluster connection read failed; closing it");
        self.done = true;
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Frames<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.hdr_in < 8 {
                let mut rb = ReadBuf::new(&mut this.hdr[this.hdr_in..]);
                if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb)) {
                    this.failed(e);
                    continue;
                }
                let n = rb.filled().len();
                if n == 0 {
                    this.done = true;
                    continue;
                }
                this.hdr_in += n;
                if this.first && this.hdr[0] != 0 {
                    this.refuse(match this.hdr[0] {
                        TLS_HANDSHAKE | TLS_ALERT => Fault::SpeaksTls,
                        b => Fault::NotCluster(b),
                    });
                } else if this.hdr_in == 8 {
                    let len = u64::from_be_bytes(this.hdr);
                    if len > MAX_FRAME {
                        this.refuse(Fault::FrameTooLong(len));
                    } else {
                        this.left = len;
                        this.hdr_out = 0;
                        this.first = false;
                    }
                }
                continue;
            }
            if this.hdr_out < 8 {
                let k = (8 - this.hdr_out).min(buf.remaining());
                buf.put_slice(&this.hdr[this.hdr_out..this.hdr_out + k]);
                this.hdr_out += k;
                return Poll::Ready(Ok(()));
            }
            if this.left == 0 {
                this.hdr_in = 0;
                continue;
            }
            let want = this.left.min(buf.remaining() as u64) as usize;
            let n = {
                let mut rb = ReadBuf::new(buf.initialize_unfilled_to(want));
                if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb)) {
                    this.failed(e);
                    continue;
                }
                rb.filled().len()
            };
            if n == 0 {
                this.done = true;
                continue;
            }
            buf.advance(n);
            this.left -= n as u64;
            return Poll::Ready(Ok(()));
        }
    }
}

/// A connection as ractor_cluster takes it: the halves, the read one behind [`Frames`].
struct Conn {
    read: BoxRead,
    write: BoxWrite,
    peer: String,
}

impl ClusterBidiStream for Conn {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (self.read, self.write)
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }
}

fn conn<R, W>(read: R, write: W, peer: SocketAddr, fault: FaultCell) -> Box<Conn>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let peer = peer.to_string();
    Box::new(Conn {
        read: Box::new(Frames::new(read, peer.clone(), fault)),
        write: Box::new(write),
        peer,
    })
}

/// A file's bytes; errors name the file and `what` (the setting that names it).
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, RuntimeError> {
    std::fs::read(path).map_err(|e| RuntimeError::Config {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    })
}

/// Every certificate in a PEM file; `what` names the setting in errors.
fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, RuntimeError> {
    let bad = |msg: String| RuntimeError::Config {
        path: path.to_path_buf(),
        msg: format!("{what}: {msg}"),
    };
    let certs = CertificateDer::pem_slice_iter(&read_pem(path, what)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in it (expected PEM)".into()));
    }
    Ok(certs)
}

/// Resolves no certificate, so every TLS handshake fails.
#[derive(Debug)]
struct NoCertificate;

impl rustls::server::ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// A TLS acceptor that completes no handshake: bytes in clear fail to parse as a ClientHello,
/// and a real ClientHello finds no certificate. ractor_cluster's own listener (which tandem
/// cannot close: its node server respawns it) is given this, so no connection to it ever
/// becomes a node session whose length-prefixed frames could be forged; nodes come in through
/// [`serve`] instead, whose streams are handed to the node server already open.
pub fn refuse_all_tls() -> Result<TlsAcceptor, RuntimeError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RuntimeError::Cluster(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The head's TLS: its certificate chain and key (`cluster.tls_cert`, `cluster.tls_key`).
pub fn server_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, RuntimeError> {
    let chain = read_certs(cert, "cluster.tls_cert")?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&read_pem(key, "cluster.tls_key")?).map_err(|e| RuntimeError::Config {
            path: key.to_path_buf(),
            msg: format!("cluster.tls_key: no PEM private key in it ({e})"),
        })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RuntimeError::Cluster(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| RuntimeError::Config {
            path: key.to_path_buf(),
            msg: format!(
                "cluster.tls_key does not go with cluster.tls_cert {}: {e}",
                cert.display()
            ),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A worker's TLS: the certificates it trusts and the name the head's must carry.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the certificates in `ca` (PEM: the head's own, or the CA that issued it) and
    /// expects the head's to be for `server_name` (a DNS name or an IP address).
    pub fn new(ca: &Path, server_name: &str) -> Result<Self, RuntimeError> {
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "--tls-ca")? {
            roots.add(c).map_err(|e| RuntimeError::Config {
                path: ca.to_path_buf(),
                msg: format!("--tls-ca: a certificate that cannot be trusted as a root: {e}"),
            })?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| RuntimeError::Cluster(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|_| {
            RuntimeError::Cluster(format!(
                "--tls-server-name: {server_name:?} is not a DNS name or IP address"
            ))
        })?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too): the default name a worker expects the head's
/// certificate to carry.
pub fn join_host(join: &str) -> &str {
    let host = join.rsplit_once(':').map_or(join, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// Accepts nodes on `listener` for `server` until the task is aborted (see the module doc).
pub async fn serve(listener: TcpListener, server: ActorRef<NodeServerMessage>, tls: Option<TlsAcceptor>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(admit(stream, peer, server.clone(), tls.clone()));
            }
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn admit(stream: TcpStream, peer: SocketAddr, server: ActorRef<NodeServerMessage>, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let conn = match tokio::time::timeout(HANDSHAKE, handshake(stream, peer, tls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(Some(why))) => {
            tracing::warn!(%peer, "node connection refused: {why}");
            return;
        }
        Ok(Err(None)) => {
            tracing::debug!(%peer, "connection closed before it sent anything");
            return;
        }
        Err(_) => {
            let why = "no data, or a stalled TLS handshake";
            tracing::warn!(%peer, "node connection refused: not admitted within {HANDSHAKE:?} ({why})");
            return;
        }
    };
    let opened = NodeServerMessage::ConnectionOpenedExternal {
        stream: conn,
        is_server: true,
    };
    if server.cast(opened).is_err() {
        tracing::debug!(%peer, "the cluster server is stopping; connection dropped");
    }
}

/// Admits one connection: `Err(Some(why))` refuses it, `Err(None)` is a peer that left silently.
async fn handshake(stream: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>) -> Result<Box<Conn>, Option<String>> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) | Err(_) => return Err(None),
        Ok(_) => {}
    }
    match (first[0], tls) {
        (TLS_HANDSHAKE, Some(acceptor)) => match acceptor.accept(stream).await {
            Ok(s) => {
                let (r, w) = tokio::io::split(s);
                Ok(conn(r, w, peer, FaultCell::default()))
            }
            Err(e) => {
                let hint = if matches!(rustls_error(&e), Some(rustls::Error::AlertReceived(_))) {
                    " (does the node trust this head's certificate? see its --tls-ca and --tls-server-name)"
                } else {
                    ""
                };
                Err(Some(format!("TLS handshake failed: {e}{hint}")))
            }
        },
        (TLS_HANDSHAKE, None) => {
            close_after_reading(stream, &[]).await;
            Err(Some(
                "it opened a TLS session, but this head has no TLS (set cluster.tls_cert and cluster.tls_key, \
                 or start the node without --tls-ca)"
                    .into(),
            ))
        }
        (0, None) => {
            let (r, w) = stream.into_split();
            Ok(conn(r, w, peer, FaultCell::default()))
        }
        (0, Some(_)) => {
            close_after_reading(stream, &UNEXPECTED_MESSAGE_ALERT).await;
            Err(Some(
                "plain TCP, but this head requires TLS (start the node with --tls-ca naming the head's \
                 certificate or its CA)"
                    .into(),
            ))
        }
        (b, _) => {
            close_after_reading(stream, &[]).await;
            Err(Some(format!("not a tandem node (first byte {b:#04x})")))
        }
    }
}

/// Sends `reply`, ends the write side and reads what the peer sends until it closes (or for a
/// second, at most 1 MiB), so the close is no reset that could discard `reply` at the peer.
async fn close_after_reading(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.write_all(reply).await;
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < 1 << 20 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Why a worker could not open its session.
#[derive(Debug)]
pub enum ConnectError {
    /// No connection (the head is not up yet, or gone): worth retrying.
    Unreachable(io::Error),
    /// The TLS handshake failed. `closed`: by the head closing the connection (a head without
    /// TLS refusing it, or one going away); otherwise retrying does not help.
    Tls { why: String, closed: bool },
}

/// Connects to the head at `addr` (in TLS when `tls` is given) and hands the session to the
/// worker's `server`. The returned cell holds, once the session has ended, the [`Fault`] that
/// ended it, if the head's bytes were not the cluster protocol.
pub async fn connect(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<FaultCell, ConnectError> {
    let stream = TcpStream::connect(addr).await.map_err(ConnectError::Unreachable)?;
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map_err(ConnectError::Unreachable)?;
    let fault = FaultCell::default();
    let conn = match tls {
        None => {
            let (r, w) = stream.into_split();
            conn(r, w, peer, fault.clone())
        }
        Some(t) => {
            let handshake = t.connector.connect(t.server_name.clone(), stream);
            let s = match tokio::time::timeout(HANDSHAKE, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let closed = rustls_error(&e).is_none()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        );
                    let why = tls_failure(&e, closed);
                    return Err(ConnectError::Tls { why, closed });
                }
                Err(_) => {
                    let why = format!("no TLS handshake from the head within {HANDSHAKE:?} (is it a tandem head?)");
                    return Err(ConnectError::Tls { why, closed: false });
                }
            };
            let (r, w) = tokio::io::split(s);
            conn(r, w, peer, fault.clone())
        }
    };
    server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: conn,
            is_server: false,
        })
        .map_err(|e| ConnectError::Unreachable(io::Error::other(e.to_string())))?;
    Ok(fault)
}

/// What a failed client handshake means for the user.
fn tls_failure(e: &io::Error, closed: bool) -> String {
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            // webpki's error, behind rustls' `OtherError`: known only by its name.
            let ca = if c.to_string().contains("CaUsedAsEndEntity") {
                "; it is a CA certificate (basicConstraints CA:TRUE), which the head cannot present \
                 itself: give the head a certificate with CA:FALSE"
            } else {
                ""
            };
            format!(
                "the head's certificate is not trusted: {c}{ca} (--tls-ca must hold the head's certificate or \
                 the CA that issued it, and the certificate must be for --tls-server-name, by default the host \
                 of --join)"
            )
        }
        Some(other) => format!("TLS handshake with the head failed: {other}"),
        None if closed => format!(
            "the head closed the connection during the TLS handshake ({e}): it does not use TLS (no \
             cluster.tls_cert), or it refused this node (see its log)"
        ),
        None => format!("TLS handshake with the head failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_refusing_acceptor_completes_no_handshake() {
        use tokio::io::AsyncWriteExt;
        let acceptor = refuse_all_tls().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Bytes in clear (the 18 bytes of HTTP that aborted a raw node session).
        let garbage = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            s
        });
        let (stream, _) = listener.accept().await.unwrap();
        let accepted = tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await.unwrap();
        assert!(accepted.is_err(), "garbage became a TLS session");
        drop(garbage.await.unwrap());
        // A real TLS client: its ClientHello finds no certificate.
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(config));
        let client = tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector
                .connect(ServerName::try_from("localhost").unwrap(), s)
                .await
                .is_err()
        });
        let (stream, _) = listener.accept().await.unwrap();
        let accepted = tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await.unwrap();
        assert!(accepted.is_err(), "a TLS client completed a handshake");
        assert!(client.await.unwrap(), "the client saw a handshake succeed");
    }

    /// Reads everything `bytes` yields through [`Frames`], in reads of at most `chunk` bytes.
    async fn through(bytes: &[u8], chunk: usize) -> (Vec<u8>, Option<Fault>) {
        let fault = FaultCell::default();
        let mut r = Frames::new(bytes, "test".into(), fault.clone());
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, fault.get().copied())
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u64).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn frames_pass_through_whatever_the_read_size() {
        let mut wire = frame(b"hello");
        wire.extend(frame(b""));
        wire.extend(frame(&[7u8; 5000]));
        for chunk in [1, 3, 8, 13, 4096, 65536] {
            assert_eq!(through(&wire, chunk).await, (wire.clone(), None), "reads of {chunk}");
        }
    }

    #[tokio::test]
    async fn other_protocols_and_huge_frames_end_the_stream() {
        // A TLS alert, as a TLS head answers bytes in clear; and a ClientHello.
        assert_eq!(
            through(&UNEXPECTED_MESSAGE_ALERT, 64).await,
            (vec![], Some(Fault::SpeaksTls))
        );
        assert_eq!(through(&[0x16, 3, 1, 0, 200, 1], 64).await.1, Some(Fault::SpeaksTls));
        assert_eq!(
            through(b"GET / HTTP/1.1\r\n", 64).await.1,
            Some(Fault::NotCluster(b'G'))
        );
        // A good frame, then a header past the limit: the first frame gets through.
        let mut wire = frame(b"ok");
        wire.extend((MAX_FRAME + 1).to_be_bytes());
        wire.extend([0u8; 16]);
        let (out, fault) = through(&wire, 64).await;
        assert_eq!(out, frame(b"ok"));
        assert_eq!(fault, Some(Fault::FrameTooLong(MAX_FRAME + 1)));
        // A stream cut inside a frame is an EOF, not an error.
        let cut = &frame(&[1u8; 100])[..50];
        assert_eq!(through(cut, 64).await, (cut.to_vec(), None));
    }

    #[test]
    fn join_host_strips_port_and_brackets() {
        assert_eq!(join_host("head.example:7946"), "head.example");
        assert_eq!(join_host("127.0.0.1:7946"), "127.0.0.1");
        assert_eq!(join_host("[::1]:7946"), "::1");
    }
}
