//! Real UCX: two workers (two contexts, as two daemons would have) on loopback, one writing into
//! the other's registered memory and reading it back, over TCP and over shared memory.

mod common;

use common::pair;
use kvtier_ucx::{check_worker_address, Context, Region, RemoteKey};

fn page_aligned(len: usize) -> Vec<u8> {
    vec![0u8; len]
}

fn round_trip(settings: &[(&str, &str)], detect_peer_failure: bool) {
    let (a, b) = pair(settings);
    let len = 4 << 20;
    let mut target = page_aligned(len);
    // SAFETY: `target` outlives the region (dropped first below).
    let region = unsafe { Region::map(b.context(), target.as_mut_ptr(), len) }.unwrap();
    let ep = a.connect(&b.address().unwrap(), detect_peer_failure).unwrap();
    let rkey = RemoteKey::unpack(&ep, &region.pack_rkey().unwrap()).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    // Many blocks of 256 KiB, then one odd-sized tail at an odd offset.
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        ep.put(chunk, region.address() + (i * (256 << 10)) as u64, &rkey, &[&a, &b]).unwrap();
    }
    ep.flush(&[&a, &b]).unwrap();
    let mut back = vec![0u8; 12345];
    ep.get(&mut back, region.address() + 777, &rkey, &[&a, &b]).unwrap();
    drop(rkey);
    ep.close(&[&a, &b]).unwrap();
    drop(region);
    assert!(target == data, "every byte arrived ({settings:?})");
    assert_eq!(&back[..], &data[777..777 + 12345]);
}

#[test]
fn put_and_get_over_tcp() {
    round_trip(&[("TLS", "tcp"), ("NET_DEVICES", "lo")], true);
}

#[test]
fn put_and_get_over_shared_memory() {
    round_trip(&[("TLS", "shm")], false);
}

#[test]
fn bad_settings_are_errors_not_crashes() {
    let err = Context::new(&[("RNDV_THRESH", "banana")]).err().expect("refused");
    assert_eq!(err.call, "ucp_config_modify");
    assert!(err.status < 0, "{err}");
}

#[test]
fn shared_memory_cannot_promise_peer_failure_detection() {
    let (a, b) = pair(&[("TLS", "shm")]);
    let err = a.connect(&b.address().unwrap(), true).err().expect("unreachable");
    assert_eq!((err.call, err.message.as_str()), ("ucp_ep_create", "Destination is unreachable"));
}

#[test]
fn worker_addresses_from_elsewhere_are_checked_before_use() {
    let (a, b) = pair(&[("TLS", "tcp"), ("NET_DEVICES", "lo")]);
    let (ua, ub) =
        (check_worker_address(&a.address().unwrap()).unwrap(), check_worker_address(&b.address().unwrap()).unwrap());
    assert_ne!(ua, ub, "each worker has its own id");
    assert_eq!(check_worker_address(&a.address().unwrap()).unwrap(), ua);
    for bad in [vec![], vec![0x20; 10], vec![0; 1 << 20]] {
        let err = check_worker_address(&bad).unwrap_err();
        assert!(err.message.contains("bytes"), "{err}");
    }
}
