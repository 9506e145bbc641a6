//! Real UCX tagged messages between two workers (two contexts, as two daemons would have) on
//! loopback: hundreds of large messages in flight, received byte-exact into their buffers; an
//! unmatched receive cancelled; a short message reported with its length.

mod common;

use common::pair;
use kvtier_ucx::{Completion, Region, Worker};

/// Progresses both workers until `want` completions arrived on `w`.
fn drain(w: &Worker, other: &Worker, want: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    while got.len() < want {
        w.progress();
        other.progress();
        got.extend(w.take_completions());
    }
    got
}

fn ship(settings: &[(&str, &str)], detect_peer_failure: bool) {
    let (sender, receiver) = pair(settings);
    let (n, len) = (300usize, 256 << 10);
    let data: Vec<u8> = (0..n * len).map(|i| (i * 131 + i / 4093) as u8).collect();
    let mut target = vec![0u8; n * len];
    // Both sides' buffers registered up front, as the daemon registers its pool.
    // SAFETY: the buffers outlive their regions (dropped at the end of this function, after).
    let target_region = unsafe { Region::map(receiver.context(), target.as_mut_ptr(), n * len) }.unwrap();
    let data_region = unsafe { Region::map(sender.context(), data.as_ptr() as *mut u8, n * len) }.unwrap();
    assert!(
        target_region.holds(target[len..].as_ptr() as usize, len)
            && !target_region.holds(target.as_ptr() as usize, n * len + 1)
    );
    for i in 0..n {
        // SAFETY: `target` outlives the receives (drained below).
        let at = target[i * len..].as_mut_ptr();
        unsafe { receiver.tag_recv(at, len, Some(&target_region), 1000 + i as u64, i as u64) }.unwrap();
    }
    // One receive nobody sends to, and one bigger than its message.
    let mut spare = vec![0u8; 64];
    unsafe { receiver.tag_recv(spare.as_mut_ptr(), 64, None, 99, 7777) }.unwrap();
    let mut big = vec![0u8; 4096];
    unsafe { receiver.tag_recv(big.as_mut_ptr(), 4096, None, 98, 8888) }.unwrap();
    let ep = sender.connect(&receiver.address().unwrap(), detect_peer_failure).unwrap();
    // Sent in reverse order: matching is by tag, not arrival.
    for i in (0..n).rev() {
        let at = data[i * len..].as_ptr();
        unsafe { sender.tag_send(&ep, at, len, Some(&data_region), 1000 + i as u64, i as u64) }.unwrap();
    }
    unsafe { sender.tag_send(&ep, data.as_ptr(), 100, None, 98, 5555) }.unwrap();
    let sent = drain(&sender, &receiver, n + 1);
    assert!(sent.iter().all(|c| c.result.is_ok()), "{sent:?}");
    let mut got = drain(&receiver, &sender, n + 1);
    assert_eq!(receiver.in_flight(), 1, "the unmatched receive is still pending");
    receiver.cancel(7777);
    got.extend(drain(&receiver, &sender, 1));
    assert_eq!(receiver.in_flight(), 0);
    for c in &got {
        match c.token {
            7777 => assert_eq!(c.result.as_ref().unwrap_err().message, "Request canceled"),
            8888 => assert_eq!((c.result.is_ok(), c.length), (true, 100)),
            _ => assert_eq!((c.result.is_ok(), c.length), (true, len), "{c:?}"),
        }
    }
    assert!(target == data, "every message landed in its own buffer ({settings:?})");
    assert_eq!(&big[..100], &data[..100]);
    ep.close(&[&sender, &receiver]).unwrap();
    drop((target_region, data_region));
}

#[test]
fn many_tagged_messages_over_tcp() {
    ship(&[("TLS", "tcp"), ("NET_DEVICES", "lo")], true);
}

#[test]
fn many_tagged_messages_over_shared_memory() {
    ship(&[("TLS", "shm")], false);
}

#[test]
fn a_token_in_flight_cannot_be_reused() {
    let (_, receiver) = pair(&[("TLS", "tcp"), ("NET_DEVICES", "lo")]);
    let mut buf = vec![0u8; 16];
    unsafe { receiver.tag_recv(buf.as_mut_ptr(), 16, None, 1, 42) }.unwrap();
    let err = unsafe { receiver.tag_recv(buf.as_mut_ptr(), 16, None, 2, 42) }.unwrap_err();
    assert!(err.message.contains("still in flight"), "{err}");
    receiver.cancel(42);
    while receiver.in_flight() > 0 {
        receiver.progress();
        receiver.take_completions();
    }
}
