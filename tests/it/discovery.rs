//! Discovery against a real etcd: events, resets, outages, snapshots, clusters.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{CompactionOptions, PutOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weir::discovery::{spawn_watch, DeclaredHealth, EtcdConfig};
use weir::testkit::Etcd;

use crate::support::{addrs, client, key, wait_on, Discovery, PREFIX};

fn count(
    m: &prometheus_client::metrics::family::Family<
        weir::metrics::ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    reason: &'static str,
) -> u64 {
    m.get_or_create(&weir::metrics::ReasonLabel { reason })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_visible_to_the_watcher_within_100ms() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut c = client(&etcd).await;
    let mut took = Vec::new();
    for i in 0..20 {
        let addr = format!("127.0.0.1:{}", 7000 + i);
        let began = Instant::now();
        c.put(key("echo", &addr), "", None).await.unwrap();
        d.wait(&format!("{addr} to appear"), |t| {
            addrs(t, "echo").contains(&addr)
        })
        .await;
        took.push(began.elapsed());
    }
    assert_eq!(d.addrs("echo").len(), 20);
    // All but the slowest within 100 ms: one stall of a shared test machine
    // (another test compiling a policy) is not the watch's doing; a watch
    // that lags (polling, batching, a lost wake-up) is slow every time.
    took.sort();
    assert!(
        took[18] < Duration::from_millis(100) && took[19] < Duration::from_secs(2),
        "puts took {took:?} to show"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_and_reput_updates_in_place() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut c = client(&etcd).await;
    c.put(
        key("echo", "127.0.0.1:1"),
        r#"{"metadata":{"zone":"a"}}"#,
        None,
    )
    .await
    .unwrap();
    c.put(key("echo", "127.0.0.1:2"), "", None).await.unwrap();
    d.wait("two endpoints", |t| addrs(t, "echo").len() == 2)
        .await;
    let before = d.table.get("echo").unwrap();

    c.put(
        key("echo", "127.0.0.1:1"),
        r#"{"weight":5,"metadata":{"zone":"b"}}"#,
        None,
    )
    .await
    .unwrap();
    d.wait("new metadata", |t| {
        t.get("echo").unwrap().endpoints[0]
            .metadata
            .get("zone")
            .map(String::as_str)
            == Some("b")
    })
    .await;
    let after = d.table.get("echo").unwrap();
    assert_eq!(after.endpoints.len(), 2, "updated in place, not added");
    assert_eq!(after.endpoints[0].weight, 5);
    assert!(
        Arc::ptr_eq(&before.endpoints[1], &after.endpoints[1]),
        "the other endpoint is untouched"
    );

    c.delete(key("echo", "127.0.0.1:2"), None).await.unwrap();
    d.wait("the delete", |t| addrs(t, "echo") == ["127.0.0.1:1"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_removes_the_endpoint_and_its_ttl_counts_down() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut c = client(&etcd).await;
    let lease = c.lease_grant(3, None).await.unwrap().id();
    c.put(
        key("echo", "127.0.0.1:1"),
        "",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    c.put(key("echo", "127.0.0.1:2"), "", None).await.unwrap();
    d.wait("the leased endpoint with a polled TTL", |t| {
        t.get("echo").is_some_and(|s| {
            s.endpoints.iter().any(|e| {
                e.lease_id() == Some(lease)
                    && e.lease
                        .as_ref()
                        .unwrap()
                        .remaining_ms()
                        .is_some_and(|ms| ms > 0 && ms <= 3000)
            })
        })
    })
    .await;
    d.wait("the lease to expire", |t| {
        addrs(t, "echo") == ["127.0.0.1:2"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_from_a_compacted_revision_resets_to_exactly_the_right_set() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    for i in 1..=4 {
        c.put(key("echo", &format!("127.0.0.1:{i}")), "", None)
            .await
            .unwrap();
    }
    let d = Discovery::synced(&etcd).await;
    d.wait("four endpoints", |t| addrs(t, "echo").len() == 4)
        .await;
    let metrics = d.metrics.clone();
    let table = d.stop().await;
    let kept = table.get("echo").unwrap().endpoints[0].clone();
    let stopped_at = table.position().unwrap().revision;

    // While nobody watches: remove two, change one, add a service; then compact.
    c.delete(key("echo", "127.0.0.1:2"), None).await.unwrap();
    c.delete(key("echo", "127.0.0.1:3"), None).await.unwrap();
    c.put(key("echo", "127.0.0.1:4"), r#"{"weight":9}"#, None)
        .await
        .unwrap();
    c.put(key("other", "127.0.0.1:5"), "", None).await.unwrap();
    let head = c
        .put(key("other", "127.0.0.1:6"), "", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(head, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert!(head > stopped_at + 1);

    let cancel = CancellationToken::new();
    let task = spawn_watch(
        table.clone(),
        EtcdConfig::new(etcd.endpoints(), PREFIX),
        cancel.clone(),
    );
    wait_on(
        &table,
        "the reset after compaction",
        Duration::from_secs(10),
        |t| t.position().is_some_and(|p| p.revision >= head) && addrs(t, "other").len() == 2,
    )
    .await;
    cancel.cancel();
    task.await.unwrap();

    assert_eq!(addrs(&table, "echo"), ["127.0.0.1:1", "127.0.0.1:4"]);
    assert_eq!(addrs(&table, "other"), ["127.0.0.1:5", "127.0.0.1:6"]);
    assert_eq!(table.get("echo").unwrap().endpoints[1].weight, 9);
    assert!(
        Arc::ptr_eq(&kept, &table.get("echo").unwrap().endpoints[0]),
        "unchanged endpoint kept, not re-created"
    );
    assert_eq!(count(&metrics.resyncs, "compacted"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_the_last_sets_and_nothing_is_lost_or_duplicated() {
    let mut etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut c = client(&etcd).await;
    for i in 1..=3 {
        c.put(key("echo", &format!("127.0.0.1:{i}")), "", None)
            .await
            .unwrap();
    }
    d.wait("three endpoints", |t| addrs(t, "echo").len() == 3)
        .await;

    etcd.stop();
    d.wait("the watch to notice", |_| {
        d.metrics.etcd_connected.get() == 0
    })
    .await;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            d.addrs("echo").len(),
            3,
            "last known set stays while etcd is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    etcd.restart();
    let puts_before = d
        .metrics
        .events
        .get_or_create(&weir::metrics::KindLabel { kind: "put" })
        .get();
    // Changed right after the restart, likely before the watch is back: the
    // resume from the last applied revision must deliver them.
    let mut c = client(&etcd).await;
    c.delete(key("echo", "127.0.0.1:1"), None).await.unwrap();
    c.put(key("echo", "127.0.0.1:4"), "", None).await.unwrap();
    c.put(key("echo", "127.0.0.1:5"), "", None).await.unwrap();
    d.wait("changes after the outage", |t| {
        addrs(t, "echo") == ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4", "127.0.0.1:5"]
    })
    .await;
    d.wait("reconnected", |_| d.metrics.etcd_connected.get() == 1)
        .await;
    let puts_after = d
        .metrics
        .events
        .get_or_create(&weir::metrics::KindLabel { kind: "put" })
        .get();
    assert_eq!(
        puts_after - puts_before,
        2,
        "each put applied once, none replayed"
    );
    assert_eq!(
        count(&d.metrics.resyncs, "start"),
        1,
        "resumed, never re-listed"
    );
    assert_eq!(
        d.metrics
            .resyncs
            .get_or_create(&weir::metrics::ReasonLabel {
                reason: "revision_backwards"
            })
            .get(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_with_etcd_down_serves_the_snapshot_then_reconciles() {
    let mut etcd = Etcd::start();
    let snapshot = etcd.dir().join("weir-snapshot.json");
    let mut c = client(&etcd).await;
    c.put(key("echo", "127.0.0.1:1"), "", None).await.unwrap();
    c.put(key("echo", "127.0.0.1:2"), r#"{"weight":7}"#, None)
        .await
        .unwrap();
    let d = Discovery::start(etcd.endpoints(), Some(snapshot.clone())).await;
    d.wait("two endpoints", |t| addrs(t, "echo").len() == 2)
        .await;
    crate::support::eventually("the snapshot file", Duration::from_secs(5), || {
        let s = snapshot.clone();
        async move { std::fs::read_to_string(&s).is_ok_and(|t| t.contains("127.0.0.1:2")) }
    })
    .await;
    d.stop().await;
    etcd.stop();

    let d = Discovery::start(etcd.endpoints(), Some(snapshot.clone())).await;
    assert!(d.table.is_ready(), "ready from the snapshot alone");
    assert_eq!(d.addrs("echo"), ["127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(d.table.get("echo").unwrap().endpoints[1].weight, 7);
    assert_eq!(d.metrics.etcd_connected.get(), 0);

    etcd.restart();
    let mut c = client(&etcd).await;
    c.delete(key("echo", "127.0.0.1:1"), None).await.unwrap();
    c.put(key("echo", "127.0.0.1:3"), "", None).await.unwrap();
    d.wait("reconciled with etcd", |t| {
        addrs(t, "echo") == ["127.0.0.1:2", "127.0.0.1:3"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_and_counted_and_the_service_keeps_its_endpoints() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    c.put(key("echo", "127.0.0.1:1"), "", None).await.unwrap();
    c.put(
        key("echo", "127.0.0.1:2"),
        r#"{"status":"unhealthy"}"#,
        None,
    )
    .await
    .unwrap();
    let d = Discovery::synced(&etcd).await;
    d.wait("two endpoints", |t| addrs(t, "echo").len() == 2)
        .await;

    let bad = [
        (key("echo", "127.0.0.1:3"), "{not json"),
        (key("echo", "127.0.0.1:4"), r#"{"addr":""}"#),
        (
            key("echo", "127.0.0.1:5"),
            r#"{"weight":"heavy","metadata":[1]}"#,
        ),
        (key("echo", "127.0.0.1:1"), r#"{"Op":0,"Addr":17}"#),
    ];
    for (k, v) in &bad {
        c.put(k.as_str(), *v, None).await.unwrap();
    }
    c.put(key("echo", "127.0.0.1:6"), "", None).await.unwrap();
    d.wait("the good put after the bad ones", |t| {
        addrs(t, "echo").len() == 3
    })
    .await;
    assert_eq!(
        d.addrs("echo"),
        ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:6"]
    );
    assert_eq!(d.metrics.skipped_values.get(), 4);
    let set = d.table.get("echo").unwrap();
    assert_eq!(
        set.endpoints[1].health,
        DeclaredHealth::Unhealthy,
        "kept, but marked"
    );

    // A fresh listing (the reset path) skips the same values.
    let fresh = Discovery::synced(&etcd).await;
    assert_eq!(fresh.addrs("echo"), ["127.0.0.1:2", "127.0.0.1:6"]);
    assert_eq!(fresh.metrics.skipped_values.get(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_key_formats_and_bare_addresses_are_read() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut c = client(&etcd).await;
    c.put(
        format!("{PREFIX}/team/echo/instance-a"),
        r#"{"Op":0,"Addr":"127.0.0.1:9001","Metadata":{"zone":"z1"}}"#,
        None,
    )
    .await
    .unwrap();
    c.put(
        format!("{PREFIX}/team/echo/instance-b"),
        "127.0.0.1:9002",
        None,
    )
    .await
    .unwrap();
    c.put(
        key("team/echo", "127.0.0.1:9003"),
        r#"{"weight":30,"metadata":{"zone":"z2"}}"#,
        None,
    )
    .await
    .unwrap();
    c.put(format!("{PREFIX}/_policies/rr"), "not an endpoint", None)
        .await
        .unwrap();
    d.wait("three endpoints", |t| addrs(t, "team/echo").len() == 3)
        .await;
    let set = d.table.get("team/echo").unwrap();
    let zones: Vec<_> = set
        .endpoints
        .iter()
        .map(|e| e.metadata.get("zone").cloned())
        .collect();
    assert_eq!(zones, [Some("z2".to_owned()), Some("z1".to_owned()), None]);
    assert!(d.table.get("_policies").is_none());
    assert_eq!(d.metrics.skipped_values.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_discovery_working_when_any_one_member_dies() {
    let mut etcd = Etcd::start_cluster(3);
    let d = Discovery::synced(&etcd).await;
    for dead in 0..3 {
        etcd.stop_member(dead);
        let alive = (dead + 1) % 3;
        let c =
            weir::discovery::connect(&weir::discovery::EtcdAccess::new(
                vec![etcd.endpoint(alive)],
            ))
            .await
            .unwrap();
        let addr = format!("127.0.0.1:{}", 8000 + dead);
        // The put may land during a leader election: retry until etcd accepts it.
        crate::support::eventually(
            "a put to the surviving members",
            Duration::from_secs(10),
            || {
                let (mut c, k) = (c.clone(), key("echo", &addr));
                async move { c.put(k, "", None).await.is_ok() }
            },
        )
        .await;
        d.wait(&format!("{addr} with member {dead} down"), |t| {
            addrs(t, "echo").contains(&addr)
        })
        .await;
        etcd.restart_member(dead);
    }
    assert_eq!(d.addrs("echo").len(), 3);
}

/// A member cut off from the other two (frozen here with SIGSTOP) answers
/// nothing and its watch goes quiet, not broken. Regression: the gateway
/// stayed on such a member with a frozen view that looked healthy. It now
/// notices within the progress interval, moves to another member and picks
/// up what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_left_for_another_and_nothing_written_meanwhile_is_missed() {
    let mut etcd = Etcd::start_cluster(3);
    let mut config = EtcdConfig::new(etcd.endpoints(), PREFIX);
    config.follow.progress_interval = Duration::from_secs(1);
    // Requests that land on the frozen member give up quickly.
    config.follow.request_timeout = Duration::from_secs(1);
    config.follow.backoff_max = Duration::from_millis(200);
    let d = Discovery::start_with(config).await;
    d.wait("first listing", |t| t.is_ready()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let watched = loop {
        if let Some(m) = (0..3).find(|&m| etcd.watch_streams(m) > 0) {
            break m;
        }
        assert!(Instant::now() < deadline, "no member reports the watch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let restarts_before = d.metrics.watch_restarts.get();
    etcd.pause_member(watched);
    let frozen_at = Instant::now();

    // Written through another member while the watched one is frozen (the
    // two left elect a leader first if the frozen one led).
    let other = (watched + 1) % 3;
    let mut c =
        weir::discovery::connect(&weir::discovery::EtcdAccess::new(
            vec![etcd.endpoint(other)],
        ))
        .await
        .unwrap();
    // A put forwarded to a frozen leader waits out etcd's own request
    // timeout (about 6 s here): give each attempt 1 s, so the put lands
    // soon after the two left elect a leader, well within the wait below.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let put = c.put(key("echo", "127.0.0.1:7"), "", None);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), put).await {
            break;
        }
        assert!(Instant::now() < deadline, "no write through member {other}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "put through member {other} {:?} after the freeze",
        frozen_at.elapsed()
    );
    // etcd's client would notice the frozen member only when its HTTP/2
    // keep-alive gives up (10 s + 5 s); the progress requests, well before.
    d.wait_for(
        "the put made while the watched member was frozen",
        Duration::from_secs(12).saturating_sub(frozen_at.elapsed()),
        |t| addrs(t, "echo") == ["127.0.0.1:7"],
    )
    .await;
    eprintln!("picked up {:?} after the freeze", frozen_at.elapsed());
    assert!(d.metrics.watch_restarts.get() > restarts_before);
    etcd.resume_member(watched);
}

/// Regression: past ~600 instances at the default poll rate, lease TTLs
/// were counted down from polls older than the TTL itself: healthy leases,
/// renewed in etcd all along, read "about to expire", and lease-aware
/// drained them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_polled_too_rarely_read_unknown_and_lease_aware_drains_none() {
    use weir::members::Members;
    use weir::policy::{Limits, PolicyEngine, PolicySet};
    use weir::upstream::{Backends, CheckedHealth, PoolConfig};

    let etcd = Etcd::start();
    // 40 instances with 10 s leases (the registration default), kept alive;
    // 2 polls a second: each lease is polled every 20 s, twice its TTL.
    let mut registrations = Vec::new();
    for i in 0..40 {
        let spec =
            weir::RegistrationSpec::new(PREFIX, "fleet", &format!("127.0.0.1:{}", 20_000 + i));
        registrations.push(weir::Registration::spawn(client(&etcd).await, spec).unwrap());
    }
    for r in &mut registrations {
        r.registered().await;
    }
    let mut config = EtcdConfig::new(etcd.endpoints(), PREFIX);
    config.lease_poll.polls_per_second = 2;
    let d = Discovery::start_with(config).await;
    d.wait("the fleet", |t| {
        t.get("fleet").is_some_and(|s| s.len() == 40)
    })
    .await;

    let set = PolicySet::new(
        Arc::new(
            PolicyEngine::new(
                Limits {
                    deadline: Duration::from_millis(100),
                    ..Limits::default()
                },
                None,
            )
            .unwrap(),
        ),
        None,
        weir::metrics::PolicyMetrics::default(),
    );
    let file = crate::policy::policy_file("lease-aware");
    set.install_file("lease-aware", &file).unwrap();
    let lease_aware = set.balancer("lease-aware");
    let backends = Backends::new(PoolConfig::default());
    let mut picked = vec![0usize; 40];
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(9) {
        let endpoints = d.table.get("fleet").unwrap();
        for e in &endpoints.endpoints {
            if let Some(ms) = e.lease.as_ref().and_then(|l| l.remaining_ms()) {
                assert!(
                    ms >= 1_000,
                    "{} reads {ms} ms left on a healthy lease",
                    e.addr
                );
            }
        }
        let members = Arc::new(Members::unconnected(endpoints, &backends));
        for m in &members.list {
            m.backend.record_check(CheckedHealth::Serving, 1, 1);
        }
        let candidates: Vec<usize> = (0..members.len()).collect();
        let headers = Arc::new(http::HeaderMap::new());
        for _ in 0..40 {
            let ctx = weir::balance::PickContext {
                service: "fleet",
                method: "M",
                headers: &headers,
                members: &members,
                candidates: &candidates,
                options: None,
                hidden_headers: weir::balance::HiddenHeaders::sensitive(),
            };
            picked[lease_aware.pick(&ctx).unwrap()] += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        picked.iter().all(|&n| n > 0),
        "lease-aware drained none: {picked:?}"
    );
}

/// A wiped etcd whose new history has already passed the last event the
/// watch applied (other keys were written first) is still another history:
/// the follower re-lists (a resume would keep keys the wipe removed),
/// because it compares with the highest revision etcd ever showed it (its
/// progress answers), not only with its last event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_etcd_is_noticed_when_its_new_history_passed_the_last_event() {
    let mut etcd = Etcd::start();
    let mut c = client(&etcd).await;
    c.put(key("echo", "127.0.0.1:1"), "", None).await.unwrap();
    let mut config = EtcdConfig::new(etcd.endpoints(), PREFIX);
    config.follow.progress_interval = Duration::from_millis(200);
    // Long enough for the new history to move on before the watch is back.
    config.follow.backoff_min = Duration::from_secs(3);
    config.follow.backoff_max = Duration::from_secs(3);
    let d = Discovery::start_with(config).await;
    d.wait("the first endpoint", |t| {
        addrs(t, "echo") == ["127.0.0.1:1"]
    })
    .await;
    for i in 0..30 {
        c.put(format!("/elsewhere/{i}"), "x", None).await.unwrap();
    }
    // Heard after the writes: a progress answer, whose header shows them.
    let written = Instant::now();
    d.wait("a progress answer after the writes", |t| {
        t.since_heard()
            .is_some_and(|since| since + Duration::from_millis(20) < written.elapsed())
    })
    .await;

    etcd.wipe_and_restart();
    let mut c = client(&etcd).await;
    for i in 0..5 {
        c.put(format!("/elsewhere/{i}"), "x", None).await.unwrap();
    }
    c.put(key("echo", "127.0.0.1:2"), "", None).await.unwrap();
    d.wait_for(
        "only what the new history holds",
        Duration::from_secs(20),
        |t| addrs(t, "echo") == ["127.0.0.1:2"],
    )
    .await;
    assert_eq!(count(&d.metrics.resyncs, "revision_backwards"), 1);
}
