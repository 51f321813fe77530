//! The s3 lease against s3s-fs (loopback, one per test; skipped without
//! it), a server whose conditional writes are not atomic: the probe finds
//! so, `--lease auto` refuses the volume with the reason, and `--lease
//! host` keeps this host's daemons apart however they race. (RADOS
//! Gateway, whose writes are atomic, is raced by tests/s3/suite.sh
//! --server rgw.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // the nbdkit half is for the conformance suite
#[path = "common/servers.rs"]
mod servers;
mod skip;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use servers::S3sFs as Server;
use userblk::targets::s3::lease::probe::{self, Verdict};
use userblk::targets::s3::{
    Lease, LeaseMode, Manifest, S3Options, S3Store, S3Target, LEASE_KEY, MANIFEST_KEY,
};

const BUCKET: &str = "vol";

macro_rules! server_or_skip {
    () => {
        match Server::start(BUCKET) {
            Some(s) => s,
            None => return,
        }
    };
}

fn opts(server: &Server, prefix: &str, cache: &Path, mode: LeaseMode) -> S3Options {
    let mut o = S3Options::new(
        servers::s3_config(&server.endpoint(), BUCKET, prefix),
        cache.into(),
    );
    o.size = Some(4 << 20);
    o.chunk_size = Some(1 << 20);
    o.writeback_delay = Duration::from_secs(600);
    o.lease = mode;
    o
}

#[test]
fn the_probe_finds_s3s_fs_not_atomic_and_auto_refuses_it() {
    let server = server_or_skip!();
    let store = S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, "p")).unwrap();
    // One at a time, s3s-fs honours both conditions.
    assert!(store.put_if_absent("k", Bytes::from_static(b"1")).unwrap());
    assert!(!store.put_if_absent("k", Bytes::from_static(b"2")).unwrap());
    let (_, etag) = store.get_with_etag("k").unwrap().unwrap();
    let wrong = "\"00000000000000000000000000000000\"";
    assert_eq!(store.put_if_match("k", Bytes::new(), wrong).unwrap(), None);
    assert!(store
        .put_if_match("k", Bytes::new(), &etag)
        .unwrap()
        .is_some());
    // At once, it does not.
    let p = probe::run(&store).unwrap();
    eprintln!("s3s-fs probe: {:?} in {:?}", p.verdict, p.took);
    match &p.verdict {
        Verdict::Not(why) => assert!(why.contains("not make conditional"), "{why}"),
        v @ Verdict::Atomic(_) => panic!("s3s-fs found atomic: {v:?}"),
    }
    let keys: Vec<String> = store
        .list("")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["k"], "the probe left its object");

    let tmp = tempfile::tempdir().unwrap();
    let msg = S3Target::open(opts(&server, "v", &tmp.path().join("c"), LeaseMode::Auto))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot keep a second writer out") && msg.contains("--lease host"),
        "{msg}"
    );
    // Refused before anything of the volume was written.
    let vol = S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, "v")).unwrap();
    assert_eq!(vol.list("").unwrap(), []);
}

#[test]
fn host_lease_lets_one_of_two_racing_daemons_in() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..10 {
        // Even rounds race to create a volume, odd ones to open it.
        let prefix = format!("r{}", round / 2);
        let gate = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let o = opts(
                    &server,
                    &prefix,
                    &tmp.path().join(format!("{who}{round}")),
                    LeaseMode::Host,
                );
                let gate = Arc::clone(&gate);
                std::thread::spawn(move || {
                    gate.wait();
                    S3Target::open(o).map_err(|e| e.to_string())
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            won,
            1,
            "round {round}: {results:?}",
            results = results
                .iter()
                .map(|r| r.as_ref().map(|_| "opened"))
                .collect::<Vec<_>>()
        );
        for r in &results {
            if let Err(e) = r {
                assert!(e.contains("the volume is in use"), "round {round}: {e}");
            }
        }
    }
}

#[test]
fn a_stale_lease_of_this_host_is_taken_over_and_another_hosts_is_not() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    drop(S3Target::open(opts(&server, "s", &tmp.path().join("c0"), LeaseMode::Host)).unwrap());
    let store = S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, "s")).unwrap();
    let m = Manifest::decode(&store.get(MANIFEST_KEY).unwrap().unwrap()).unwrap();
    // A daemon of this host that died without giving the lease back.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let mut stale = Lease::for_this_process(m.volume_id);
    stale.pid = dead;
    store
        .put(LEASE_KEY, Bytes::from(stale.encode().unwrap()))
        .unwrap();
    let t = S3Target::open(opts(&server, "s", &tmp.path().join("c1"), LeaseMode::Host)).unwrap();
    let now = Lease::decode(&store.get(LEASE_KEY).unwrap().unwrap()).unwrap();
    assert_eq!(now.pid, std::process::id());
    drop(t);
    // Another host's: honoured.
    stale.host = "elsewhere".into();
    store
        .put(LEASE_KEY, Bytes::from(stale.encode().unwrap()))
        .unwrap();
    let msg = S3Target::open(opts(&server, "s", &tmp.path().join("c2"), LeaseMode::Host))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("elsewhere pid"), "{msg}");
}

/// The probe of a server whose conditional writes are atomic: RADOS
/// Gateway of tests/ceph/cluster.sh, named by `USERBLK_TEST_ATOMIC_S3`
/// (`http://127.0.0.1:PORT/BUCKET`, the bucket existing, the test
/// credentials); skipped without it.
#[test]
fn the_probe_finds_an_atomic_server_atomic() {
    let url = std::env::var("USERBLK_TEST_ATOMIC_S3").unwrap_or_default();
    let Some((endpoint, bucket)) = url.rsplit_once('/').filter(|_| !url.is_empty()) else {
        skip::skip(
            skip::Prereq::Environment,
            "USERBLK_TEST_ATOMIC_S3 names no server (tests/ceph/cluster.sh start)",
        );
        return;
    };
    let store = S3Store::new(&servers::s3_config(endpoint, bucket, "probe")).unwrap();
    for _ in 0..5 {
        let p = probe::run(&store).unwrap();
        eprintln!("{endpoint} probe: {:?} in {:?}", p.verdict, p.took);
        assert!(matches!(p.verdict, Verdict::Atomic(_)), "{:?}", p.verdict);
    }
    assert_eq!(store.list("").unwrap(), [], "the probe left its object");
}
