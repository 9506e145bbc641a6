//! The connector server: length-prefixed protobuf frames on a unix socket, pool segments passed
//! with SCM_RIGHTS, peers checked with SO_PEERCRED.
//!
//! A connection's requests are executed in order. The daemon reads up to `max_inflight` complete
//! requests, answers them in one write, then reads again, so a pipelining client gets batched
//! replies and a flooding one is slowed by its own socket buffer. Any protocol error gets a typed
//! reply and closes that connection only; whatever it held is released.

use super::dispatch::{dispatch, op_of, Fatal, Session};
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
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

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

fn uid_allowed(node: &Node, uid: u32) -> bool {
    let allowed = &node.config.server.allowed_uids;
    if allowed.is_empty() {
        uid_admin(uid)
    } else {
        allowed.contains(&uid)
    }
}

async fn connection(node: Arc<Node>, mut stream: UnixStream) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!("SO_PEERCRED failed: {e}");
            return;
        }
    };
    if !uid_allowed(&node, cred.uid()) {
        node.metrics.connections_refused.fetch_add(1, Relaxed);
        warn!(uid = cred.uid(), pid = ?cred.pid(), "connection refused: uid not in server.allowed_uids");
        let reply = Fatal::new(ErrorCode::PermissionDenied, format!("uid {} is not allowed", cred.uid()));
        let _ = stream.write_all(&frame_of(&reply.into_response(0))).await;
        return;
    }
    let registered = node.connections.open(node.new_client(), cred.pid(), cred.uid());
    let mut session = Session::new(Arc::clone(&registered.record), uid_admin(cred.uid()));
    let client = session.client;
    node.metrics.connections_total.fetch_add(1, Relaxed);
    node.metrics.connected_clients.fetch_add(1, Relaxed);
    debug!(?client, pid = ?cred.pid(), "client connected");
    let result = run(&node, &mut stream, &mut session).await;
    session.settle().await;
    drop(session);
    node.disconnect(client);
    node.metrics.connected_clients.fetch_sub(1, Relaxed);
    match result {
        Ok(()) => debug!(?client, "client disconnected"),
        Err(e) => info!(?client, "connection closed: {e}"),
    }
}

fn frame_of(resp: &pb::Response) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(resp, &mut out);
    out
}

/// Serves one connection until EOF or a fatal error (returned for the log).
async fn run(node: &Arc<Node>, stream: &mut UnixStream, session: &mut Session) -> Result<(), String> {
    let max_inflight = node.config.server.max_inflight as usize;
    let mut decoder = FrameDecoder::new(node.config.server.max_frame_bytes.as_u64() as usize);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        const READ: usize = 64 * 1024;
        let n = stream.read(decoder.spare(READ)).await.map_err(|e| e.to_string());
        let n = match n {
            Ok(n) => {
                decoder.commit(n, READ);
                n
            }
            Err(e) => {
                decoder.commit(0, READ);
                return Err(e);
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
            node.requests_total.fetch_add(1, Relaxed);
            session.record.requested();
            let started = Instant::now();
            let result = dispatch(node, session, op).await;
            node.metrics.observe(kind, started.elapsed());
            match result {
                Ok(result) => {
                    let is_hello = matches!(result, response::Result::Hello(_));
                    encode_into(&pb::Response { id: req.id, result: Some(result) }, &mut out);
                    if is_hello {
                        send_with_fds(stream, &out, &segment_fds(node)).await.map_err(|e| e.to_string())?;
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
            out.clear();
        }
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

fn segment_fds(node: &Node) -> Vec<RawFd> {
    node.pool().segments().iter().map(|s| s.fd().as_raw_fd()).collect()
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
