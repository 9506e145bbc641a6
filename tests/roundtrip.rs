//! Save and load through a real daemon: across processes, across connections, byte-exact.

use kvtier_client::{testdata, Reservation};
use kvtier_tests::{blocks_for, namespace, ok_stdout, refs, Daemon};

#[test]
fn blocks_saved_by_one_process_load_byte_exact_in_another() {
    let d = Daemon::start(&[]);
    let args = ["--count", "48", "--seed", "7", "--block-bytes", "20000"];
    let put = ok_stdout(&d.kvtier(&[&["put"], &args[..]].concat()));
    assert!(put.contains("stored 48 present 0 no_space 0"), "{put}");
    let get = ok_stdout(&d.kvtier(&[&["get"], &args[..]].concat()));
    assert!(get.contains("loaded 48 of 48 blocks, 48 verified"), "{get}");
    // A longer prompt with the same prefix loads the shared part only.
    let get = ok_stdout(&d.kvtier(&["get", "--count", "60", "--seed", "7", "--block-bytes", "20000"]));
    assert!(get.contains("loaded 48 of 60 blocks, 48 verified"), "{get}");
    // Another prompt shares nothing.
    let get = ok_stdout(&d.kvtier(&["get", "--count", "8", "--seed", "8", "--block-bytes", "20000"]));
    assert!(get.contains("loaded 0 of 8"), "{get}");
    let status = ok_stdout(&d.kvtier(&["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["tiers"][0]["blocks"], 48);
}

#[tokio::test]
async fn reservation_is_invisible_to_others_until_commit() {
    let d = Daemon::start(&[]);
    let (mut writer, mut reader) = (d.client("writer").await, d.client("reader").await);
    let ns_w = writer.register(namespace("m", 8192)).await.unwrap();
    let ns_r = reader.register(namespace("m", 8192)).await.unwrap();
    assert_eq!(ns_w.id, ns_r.id);
    let hashes = testdata::chained_hashes(1, 4);
    let blocks = blocks_for(&hashes, 8192);
    let (res, slots) = writer.reserve(&ns_w, &hashes, None).await.unwrap();
    for (s, b) in slots.iter().zip(&blocks) {
        let Reservation::Slot(s) = s else { panic!("{s:?}") };
        writer.pool().write(*s, b).unwrap();
    }
    assert_eq!(reader.lookup(&ns_r, &hashes).await.unwrap(), 0);
    let (lease, got) = reader.acquire(&ns_r, &hashes).await.unwrap();
    assert_eq!((lease, got.len()), (0, 0));
    // A second writer is told the blocks are being written, and gets no slot.
    let (res2, slots2) = reader.reserve(&ns_r, &hashes, None).await.unwrap();
    assert_eq!(res2, 0);
    assert!(slots2.iter().all(|s| *s == Reservation::Present));
    assert_eq!(writer.commit(res).await.unwrap(), 4);
    assert_eq!(reader.lookup(&ns_r, &hashes).await.unwrap(), 4);
    let mut loaded = Vec::new();
    reader.load(&ns_r, &hashes, |_, b| loaded.push(b.to_vec())).await.unwrap();
    assert_eq!(loaded, blocks);
}

#[tokio::test]
async fn tenants_and_models_never_share_blocks() {
    let d = Daemon::start(&[]);
    let mut a = d.client("tenant-a").await;
    let mut b = d.client("tenant-b").await;
    let ns_a = a
        .register(kvtier_client::NamespaceDescriptor { cache_salt: "a".into(), ..namespace("m", 4096) })
        .await
        .unwrap();
    let ns_b = b
        .register(kvtier_client::NamespaceDescriptor { cache_salt: "b".into(), ..namespace("m", 4096) })
        .await
        .unwrap();
    let ns_other_model = b.register(namespace("other", 4096)).await.unwrap();
    let hashes = testdata::chained_hashes(3, 5);
    let blocks = blocks_for(&hashes, 4096);
    assert_eq!(a.save(&ns_a, &hashes, &refs(&blocks)).await.unwrap().stored, 5);
    assert_eq!(a.lookup(&ns_a, &hashes).await.unwrap(), 5);
    assert_eq!(b.lookup(&ns_b, &hashes).await.unwrap(), 0);
    assert_eq!(b.lookup(&ns_other_model, &hashes).await.unwrap(), 0);
    // b cannot reach a's namespace through a handle it never registered.
    let forged = kvtier_client::Namespace { handle: ns_b.handle + 5, ..ns_b.clone() };
    assert!(b.lookup(&forged, &hashes).await.is_err());
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    use kvtier_proto::v1::{request::Op, response, Lookup, Stats};
    let d = Daemon::start(&[]);
    let mut c = d.client("pipeline").await;
    let ns = c.register(namespace("m", 4096)).await.unwrap();
    let hashes = testdata::chained_hashes(9, 3);
    c.save(&ns, &hashes, &refs(&blocks_for(&hashes, 4096))).await.unwrap();
    let ops: Vec<Op> = (0..200)
        .map(|i| match i % 2 {
            0 => Op::Lookup(Lookup { handle: ns.handle, hashes: hashes[..(i / 2) % 4].to_vec() }),
            _ => Op::Stats(Stats {}),
        })
        .collect();
    let replies = c.pipeline(ops).await.unwrap();
    assert_eq!(replies.len(), 200);
    for (i, r) in replies.iter().enumerate() {
        match (i % 2, r) {
            (0, response::Result::Lookup(l)) => {
                assert_eq!(l.matched as usize, ((i / 2) % 4).min(3))
            }
            (1, response::Result::Stats(_)) => {}
            other => panic!("reply {i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn long_runs_move_in_pipelined_chunks() {
    let d = Daemon::start(&[]);
    let mut c = d.client("long").await;
    let ns = c.register(namespace("long", 4096)).await.unwrap();
    let n = 3 * kvtier_client::CHUNK_BLOCKS + 17;
    let hashes = testdata::chained_hashes(11, n);
    let blocks = blocks_for(&hashes, 4096);
    let report = c.save(&ns, &hashes[..n - 5], &refs(&blocks[..n - 5])).await.unwrap();
    assert_eq!((report.stored, report.present, report.no_space), (n - 5, 0, 0));
    // Saving the whole run again stores only the 5 new tail blocks.
    let report = c.save(&ns, &hashes, &refs(&blocks)).await.unwrap();
    assert_eq!((report.stored, report.present), (5, n - 5));
    let mut seen = Vec::new();
    let loaded = c
        .load(&ns, &hashes, |i, b| {
            assert_eq!(b, &blocks[i][..], "block {i}");
            seen.push(i);
        })
        .await
        .unwrap();
    assert_eq!(loaded, n);
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    // A run whose held prefix ends inside the second chunk loads exactly that prefix.
    let mut other = hashes[..kvtier_client::CHUNK_BLOCKS + 3].to_vec();
    other.extend(testdata::chained_hashes(12, 900));
    assert_eq!(c.load(&ns, &other, |_, _| {}).await.unwrap(), kvtier_client::CHUNK_BLOCKS + 3);
    // Every saved block is held once, committed.
    let s = c.stats().await.unwrap();
    assert_eq!(s.tiers[0].blocks as usize, n);
}
