//! The connector server: length-prefixed protobuf frames on a unix socket, pool segments passed
//! with SCM_RIGHTS, peers checked with SO_PEERCRED.
//!
//! A connection's requests are executed in order. The daemon reads up to `max_inflight` complete
//! requests, answers them in one write, then reads again, so a pipelining client gets batched
//! replies and a flooding one is slowed by its own socket buffer. Any protocol error gets a typed
//! reply and closes that connection only; whatever it held is released.

use super::dispatch::{dispatch, op_of, Fatal, Session};
use crate::clients::ConnectionLimits;
use crate::node::Node;
use kvtier_proto::frame::{encode_into, FrameDecoder, FrameError};
use kvtier_proto::v1::{self as pb, response, ErrorCode, Request};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use prost::Message;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Binds the connector socket, replacing a stale socket file but refusing to steal a live one.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another daemon is listening on {}", path.display());
        }
        std::fs::remove_file(path).map_err(|e| anyhow::anyhow!("removing stale {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))
}

/// Lets every uid connect to the socket at `path` (mode 0666): for an explicit
/// `server.allowed_uids`, which then alone decides who is served.
pub fn open_to_all(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| anyhow::anyhow!("making {} connectable for allowed_uids: {e}", path.display()))
}

/// Accepts connections until the listener fails; each runs in its own task.
pub async fn serve(node: Arc<Node>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = Arc::clone(&node);
                tokio::spawn(async move { connection(node, stream).await });
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether `uid` may send admin requests: root and the daemon's own uid.
fn uid_admin(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::getuid().as_raw()
}

/// Whether `uid` may connect: root, the daemon's own uid, and `server.allowed_uids`.
pub(crate) fn uid_allowed(node: &Node, uid: u32) -> bool {
    uid_admin(uid) || node.config.server.allowed_uids.contains(&uid)
}

/// Logs a refused connection at warn level the 1st, 2nd, 4th, 8th... time (a flood of
/// refusals must not flood the log; the metric counts them all).
fn refusal_worth_logging(refused: u64) -> bool {
    refused.is_power_of_two()
}

/// How long a staging window may sit idle with pages before they are handed back.
const TRIM_IDLE_WINDOW: Duration = Duration::from_secs(2);

async fn connection(node: Arc<Node>, mut stream: UnixStream) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!("SO_PEERCRED failed: {e}");
            return;
        }
    };
    let refuse = |code: ErrorCode, why: String| {
        let refused = node.metrics.connections_refused.fetch_add(1, Relaxed) + 1;
        if refusal_worth_logging(refused) {
            warn!(uid = cred.uid(), pid = ?cred.pid(), refused, "connection refused: {why}");
        }
        frame_of(&Fatal::new(code, why).into_response(0))
    };
    if !uid_allowed(&node, cred.uid()) {
        let reply = refuse(ErrorCode::PermissionDenied, format!("uid {} is not allowed", cred.uid()));
        let _ = stream.write_all(&reply).await;
        return;
    }
    let server = &node.config.server;
    let limits =
        ConnectionLimits { total: server.max_connections as usize, per_uid: server.max_connections_per_uid as usize };
    let registered = match node.clients.connections.open(node.new_client(), cred.pid(), cred.uid(), limits) {
        Ok(r) => r,
        Err(why) => {
            let reply = refuse(ErrorCode::ResourceExhausted, why);
            let _ = stream.write_all(&reply).await;
            return;
        }
    };
    let trusted = server.trusted_uids.contains(&cred.uid());
    let mut session = Session::new(Arc::clone(&registered.record), uid_admin(cred.uid()), trusted);
    let client = session.client;
    node.metrics.connections_total.fetch_add(1, Relaxed);
    node.metrics.connected_clients.fetch_add(1, Relaxed);
    debug!(?client, pid = ?cred.pid(), trusted, "client connected");
    // In a task of its own, so that whatever happens to it (a panic included) the client's
    // reservations, pins and registrations are released here.
    let served = Arc::clone(&node);
    let result = tokio::spawn(async move {
        let result = run(&served, &mut stream, &mut session).await;
        session.settle().await;
        result
    })
    .await;
    node.disconnect(client);
    node.metrics.connected_clients.fetch_sub(1, Relaxed);
    drop(registered);
    match result {
        Ok(Ok(())) => debug!(?client, "client disconnected"),
        Ok(Err(e)) => info!(?client, "connection closed: {e}"),
        Err(e) => {
            node.metrics.connection_panics.fetch_add(1, Relaxed);
            let why = e.try_into_panic().map(|p| crate::supervise::panic_message(p.as_ref())).unwrap_or_default();
            error!(?client, "connection task panicked ({why}): its reservations and pins are released");
        }
    }
}

fn frame_of(resp: &pb::Response) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(resp, &mut out);
    out
}

/// Waits until the connection has bytes to read, holding no buffer meanwhile. Before Hello the
/// wait is bounded by `hello_deadline` (`Err` past it); an idle staging window's pages are handed
/// back while waiting.
async fn readable(stream: &UnixStream, session: &mut Session, hello_deadline: Instant) -> Result<(), Fatal> {
    loop {
        let trim = session.staging.as_ref().is_some_and(|st| st.window().idle_with_pages());
        let deadline = match (session.greeted, trim) {
            (false, _) => Some(hello_deadline),
            (true, true) => Some(Instant::now() + TRIM_IDLE_WINDOW),
            (true, false) => None,
        };
        let io = |e: std::io::Error| Fatal::new(ErrorCode::Internal, e.to_string());
        let Some(deadline) = deadline else { return stream.readable().await.map_err(io) };
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(r) => return r.map_err(io),
            Err(_) if !session.greeted => {
                return Err(Fatal::new(ErrorCode::NotHello, "no Hello within server.hello_timeout_ms"));
            }
            Err(_) => {
                if let Some(st) = session.staging.as_mut() {
                    st.window_mut().trim();
                }
            }
        }
    }
}

/// Serves one connection until EOF or a fatal error (returned for the log).
async fn run(node: &Arc<Node>, stream: &mut UnixStream, session: &mut Session) -> Result<(), String> {
    let max_inflight = node.config.server.max_inflight as usize;
    let hello_deadline = Instant::now() + Duration::from_millis(node.config.server.hello_timeout_ms);
    let mut decoder = FrameDecoder::new(node.config.server.max_frame_bytes.as_u64() as usize);
    let mut out = Vec::new();
    loop {
        const READ: usize = 64 * 1024;
        if let Err(f) = readable(stream, session, hello_deadline).await {
            return fail(node, stream, &mut out, 0, f).await;
        }
        let n = match stream.try_read(decoder.spare(READ)) {
            Ok(n) => {
                decoder.commit(n, READ);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A spurious wake-up (a new socket starts out as readable): hold no buffer.
                decoder.commit(0, READ);
                decoder.release_idle();
                continue;
            }
            Err(e) => {
                decoder.commit(0, READ);
                return Err(e.to_string());
            }
        };
        if n == 0 {
            return if decoder.buffered() == 0 { Ok(()) } else { Err("EOF inside a frame".into()) };
        }
        let mut answered = 0;
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    let f = Fatal::new(
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes exceeds max_frame_bytes {max}"),
                    );
                    return fail(node, stream, &mut out, 0, f).await;
                }
            };
            let req = match Request::decode(bytes::Bytes::from(body)) {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        node,
                        stream,
                        &mut out,
                        0,
                        Fatal::new(ErrorCode::Malformed, format!("undecodable request: {e}")),
                    )
                    .await
                }
            };
            let Some(op) = req.op else {
                let f = Fatal::new(ErrorCode::UnknownOp, "request has no op this daemon knows");
                return fail(node, stream, &mut out, req.id, f).await;
            };
            let kind = op_of(&op);
            node.load.requests_total.fetch_add(1, Relaxed);
            session.record.requested();
            let started = std::time::Instant::now();
            // Boxed: the future of the largest request is big, and an idle connection must not
            // carry its room while it waits for the next one.
            let result = Box::pin(dispatch(node, session, op)).await;
            node.metrics.observe(kind, started.elapsed());
            match result {
                Ok(result) => {
                    let is_hello = matches!(result, response::Result::Hello(_));
                    encode_into(&pb::Response { id: req.id, result: Some(result) }, &mut out);
                    if is_hello {
                        let fds: Vec<RawFd> = session.hello_fds(node).iter().map(|fd| fd.as_raw_fd()).collect();
                        send_with_fds(stream, &out, &fds).await.map_err(|e| e.to_string())?;
                        out.clear();
                    }
                }
                Err(f) => return fail(node, stream, &mut out, req.id, f).await,
            }
            answered += 1;
            if answered >= max_inflight {
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                out.clear();
                answered = 0;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        // Hold no buffer between requests: idle connections cost (almost) nothing.
        out = Vec::new();
        decoder.release_idle();
    }
}

/// Sends the replies so far plus the error, and ends the connection.
async fn fail(node: &Node, stream: &mut UnixStream, out: &mut Vec<u8>, id: u64, f: Fatal) -> Result<(), String> {
    node.metrics.error(f.code as i32);
    let why = format!("{}: {}", f.code.as_str_name(), f.reason);
    encode_into(&f.into_response(id), out);
    let _ = stream.write_all(out).await;
    let _ = stream.shutdown().await;
    Err(why)
}

/// Writes `bytes` with `fds` attached (SCM_RIGHTS) to the first chunk.
async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let raw = stream.as_raw_fd();
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(raw, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
        })
        .await?;
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
