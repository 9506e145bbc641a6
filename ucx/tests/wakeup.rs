//! Real UCX workers sleeping in `Worker::wait` on both ends of a message, connected as the
//! daemon's lanes connect (worker addresses over shared memory, a listener over TCP, the
//! connection flushed before the first send): the sender
//! sleeps until a receive that is posted late has taken its 4 MiB, the receiver until the
//! connection and the message arrive; nothing is lost to a missed wake-up. Another fd handed to
//! `wait` wakes it too.

mod common;

use common::pair;
use kvtier_ucx::{Woken, Worker};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Long enough that a wait timing out means no wake-up came (a hang guard, not a timing check).
const NEVER: Duration = Duration::from_secs(30);

/// Progresses `w` (and `also_each_round`) and sleeps in `wait` until `done`; returns how often
/// it slept. Panics when a wait times out: then a wake-up was lost.
fn sleep_until(w: &Worker, mut also_each_round: impl FnMut(), mut done: impl FnMut() -> bool) -> usize {
    let mut sleeps = 0;
    loop {
        w.progress();
        also_each_round();
        if done() {
            return sleeps;
        }
        match w.wait(None, NEVER).unwrap() {
            Woken::TimedOut => panic!("a worker waiting for its peer was never woken"),
            Woken::Ready => sleeps += 1,
            Woken::Busy => {}
        }
    }
}

fn both_ends_sleep_through_a_message(settings: &'static [(&'static str, &'static str)], by_listener: bool) {
    let (sender, receiver) = pair(settings);
    let listener = by_listener.then(|| receiver.listen("127.0.0.1:0".parse().unwrap()).unwrap());
    let port = listener.as_ref().map(|l| l.local_addr().unwrap());
    let address = receiver.address().unwrap();
    let len = 4 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    let peer = std::thread::spawn(move || {
        let ep = match port {
            Some(at) => sender.connect_to(at, true),
            None => sender.connect(&address, false),
        }
        .unwrap();
        // Connected first, as lanes do: UCX 1.13 over TCP can lose the receiver's wake-up for
        // a message sent eager before the connection is up (seen with this test unflushed).
        sender.flush_endpoint(&ep, 99).unwrap();
        while sender.take_completions().is_empty() {
            sender.progress();
        }
        // SAFETY: `sent` outlives the send (completed below).
        unsafe { sender.tag_send(&ep, sent.as_ptr(), len, None, 7, 2) }.unwrap();
        let mut done = Vec::new();
        let sleeps = sleep_until(
            &sender,
            || {},
            || {
                done.extend(sender.take_completions());
                !done.is_empty()
            },
        );
        assert!(done[0].result.is_ok(), "{done:?}");
        sleeps
    });
    // The receive comes late: the sender has long posted its message and gone to sleep.
    let mut accepted = Vec::new();
    let mut accept = || {
        for request in listener.iter().flat_map(|l| l.take_requests()) {
            accepted.push(receiver.accept(request, true).unwrap());
        }
    };
    let ready = std::time::Instant::now() + Duration::from_millis(200);
    while std::time::Instant::now() < ready {
        receiver.progress();
        accept();
    }
    let mut got = vec![0u8; len];
    // SAFETY: `got` outlives the receive (completed below).
    unsafe { receiver.tag_recv(got.as_mut_ptr(), len, None, 7, 1) }.unwrap();
    let mut done = Vec::new();
    sleep_until(&receiver, accept, || {
        done.extend(receiver.take_completions());
        !done.is_empty()
    });
    let sender_sleeps = peer.join().unwrap();
    assert!(done[0].result.is_ok() && done[0].length == len, "{done:?}");
    assert!(got == data, "the message arrived byte-exact");
    assert!(sender_sleeps > 0, "the sender slept while its message waited for a receive");
}

#[test]
fn both_ends_sleep_through_a_message_over_shared_memory() {
    both_ends_sleep_through_a_message(&[("TLS", "shm")], false);
}

#[test]
fn both_ends_sleep_through_a_message_over_tcp() {
    both_ends_sleep_through_a_message(&[("TLS", "tcp"), ("NET_DEVICES", "lo")], true);
}

#[test]
fn another_fd_wakes_a_waiting_worker() {
    let (worker, _) = pair(&[("TLS", "shm")]);
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let wait = |timeout| loop {
        worker.progress();
        match worker.wait(Some(theirs.as_fd()), timeout).unwrap() {
            Woken::Busy => continue,
            woken => return woken,
        }
    };
    assert_eq!(wait(Duration::from_millis(20)), Woken::TimedOut, "nothing to wake it");
    let poke = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        ours.write_all(b"x").unwrap();
        ours
    });
    assert_eq!(wait(NEVER), Woken::Ready, "woken by the other fd");
    poke.join().unwrap();
}

#[test]
fn a_listener_sleeps_until_a_peer_connects_and_sends() {
    let (client, server) = pair(&[("TLS", "tcp"), ("NET_DEVICES", "lo")]);
    let listener = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let at = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let ep = client.connect_to(at, true).unwrap();
        client.flush_endpoint(&ep, 1).unwrap();
        while client.take_completions().is_empty() {
            client.progress();
        }
        let data = [9u8; 64];
        // SAFETY: `data` outlives the send (completed below).
        unsafe { client.tag_send(&ep, data.as_ptr(), data.len(), None, 5, 2) }.unwrap();
        while client.take_completions().is_empty() {
            client.progress();
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    let mut accepted = Vec::new();
    let sleeps = sleep_until(
        &server,
        || {},
        || {
            accepted.extend(listener.take_requests().into_iter().map(|r| server.accept(r, true).unwrap()));
            !accepted.is_empty()
        },
    );
    assert!(sleeps > 0, "the server slept while nobody had connected yet");
    let mut got = [0u8; 64];
    // SAFETY: `got` outlives the receive (completed below).
    unsafe { server.tag_recv(got.as_mut_ptr(), got.len(), None, 5, 3) }.unwrap();
    let mut done = Vec::new();
    sleep_until(
        &server,
        || {},
        || {
            done.extend(server.take_completions());
            !done.is_empty()
        },
    );
    assert_eq!(got, [9u8; 64]);
    peer.join().unwrap();
}
