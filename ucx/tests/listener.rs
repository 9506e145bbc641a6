//! Real UCX client-server connections on loopback over TCP: a worker listens on a port, another
//! connects knowing only that socket address, and tagged messages cross both ways byte-exact; a
//! rejected connection fails its sender's operations; failed endpoints are reported on both
//! sides.

mod common;

use common::pair;
use kvtier_ucx::{Completion, Endpoint, Listener, Worker};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TCP: [(&str, &str); 2] = [("TLS", "tcp"), ("NET_DEVICES", "lo")];

/// Progresses both workers until `done` says so; panics after 30 s (a hang guard, not a timing
/// assertion).
fn until<T>(a: &Worker, b: &Worker, mut done: impl FnMut() -> Option<T>) -> T {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        a.progress();
        b.progress();
        if let Some(v) = done() {
            return v;
        }
        assert!(Instant::now() < give_up, "UCX made no progress for 30 s");
    }
}

/// A listener of `server` on a loopback port, and `client`'s endpoint connecting to it.
fn dial<'s>(server: &'s Worker, client: &Worker) -> (Listener<'s>, Endpoint) {
    let listener = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = client.connect_to(listener.local_addr().unwrap(), true).unwrap();
    (listener, ep)
}

/// Accepts the next connection request on `listener`.
fn accept(server: &Worker, client: &Worker, listener: &Listener) -> Endpoint {
    let request = until(server, client, || listener.take_requests().pop());
    server.accept(request, true).unwrap()
}

/// Sends `data` over `ep` from `from` into a receive posted on `to`; returns what arrived.
fn message(from: &Worker, ep: &Endpoint, to: &Worker, data: &[u8], tag: u64) -> Vec<u8> {
    let mut got = vec![0u8; data.len()];
    // SAFETY: `got` and `data` outlive their operations (both completed below).
    unsafe { to.tag_recv(got.as_mut_ptr(), got.len(), None, tag, 1) }.unwrap();
    unsafe { from.tag_send(ep, data.as_ptr(), data.len(), None, tag, 2) }.unwrap();
    let (mut sent, mut received): (Vec<Completion>, Vec<Completion>) = (Vec::new(), Vec::new());
    until(from, to, || {
        sent.extend(from.take_completions());
        received.extend(to.take_completions());
        (!sent.is_empty() && !received.is_empty()).then_some(())
    });
    assert!(sent[0].result.is_ok() && received[0].result.is_ok(), "{sent:?} {received:?}");
    assert_eq!(received[0].length, data.len());
    got
}

#[test]
fn a_peer_connects_by_socket_address_and_messages_cross_both_ways() {
    let (server, client) = pair(&TCP);
    let listener = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let at: SocketAddr = listener.local_addr().unwrap();
    assert!(at.ip().is_loopback() && at.port() != 0, "{at}");
    let to_server = client.connect_to(at, true).unwrap();
    let to_client = accept(&server, &client, &listener);
    let data: Vec<u8> = (0..(1usize << 20) + 13).map(|i| (i * 7 + i / 251) as u8).collect();
    assert_eq!(message(&client, &to_server, &server, &data, 42), data, "client to server");
    let back: Vec<u8> = data.iter().rev().copied().collect();
    assert_eq!(message(&server, &to_client, &client, &back, 43), back, "server to client");
    drop((to_server, to_client));
}

#[test]
fn a_rejected_connection_fails_its_senders_operations() {
    let (server, client) = pair(&TCP);
    let (listener, to_server) = dial(&server, &client);
    let request = until(&server, &client, || listener.take_requests().pop());
    listener.reject(request);
    let data = vec![5u8; 4096];
    // SAFETY: `data` outlives the send (completed below).
    unsafe { client.tag_send(&to_server, data.as_ptr(), data.len(), None, 1, 9) }.unwrap();
    let done = until(&client, &server, || client.take_completions().pop());
    assert!(done.result.is_err(), "a send over a rejected connection fails: {done:?}");
    let failed = until(&client, &server, || Some(client.take_failed_endpoints()).filter(|f| !f.is_empty()));
    assert_eq!(failed, [to_server.id()], "the endpoint is reported failed");
    drop(to_server);
}

#[test]
fn an_accepted_connection_whose_peer_closes_is_reported_failed() {
    let (server, client) = pair(&TCP);
    let (listener, to_server) = dial(&server, &client);
    let to_client = accept(&server, &client, &listener);
    assert_eq!(message(&client, &to_server, &server, &[9u8; 100], 5), [9u8; 100]);
    drop(to_server);
    let failed = until(&server, &client, || Some(server.take_failed_endpoints()).filter(|f| !f.is_empty()));
    assert_eq!(failed, [to_client.id()], "the server learns its peer is gone");
    drop(to_client);
}

#[test]
fn a_new_endpoints_flush_completes_once_its_connection_is_up_or_failed() {
    let (server, client) = pair(&TCP);
    let (listener, to_server) = dial(&server, &client);
    client.flush_endpoint(&to_server, 7).unwrap();
    let request = until(&server, &client, || listener.take_requests().pop());
    for _ in 0..1000 {
        client.progress();
    }
    assert!(client.take_completions().is_empty(), "no connection yet: the flush waits (sends would go eager)");
    let to_client = server.accept(request, true).unwrap();
    let done = until(&client, &server, || client.take_completions().pop());
    assert_eq!((done.token, done.result), (7, Ok(())), "accepted: the connection is up");
    assert_eq!(message(&client, &to_server, &server, &[3u8; 5000], 8), [3u8; 5000]);

    let refused = client.connect_to(listener.local_addr().unwrap(), true).unwrap();
    client.flush_endpoint(&refused, 9).unwrap();
    listener.reject(until(&server, &client, || listener.take_requests().pop()));
    let done = until(&client, &server, || client.take_completions().pop());
    assert_eq!(done.token, 9);
    assert!(done.result.is_err(), "rejected: the flush fails ({done:?})");
    drop((to_server, to_client, refused));
}
