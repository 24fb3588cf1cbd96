//! The cost of applying one etcd change to a table of 10,000 endpoints across
//! 1,000 services, and of the hot path's read. `make bench-discovery`.

use criterion::{criterion_group, criterion_main, Criterion};
use weir::discovery::etcd::{Kv, KvChange, Position};
use weir::discovery::ServiceTable;
use weir::metrics::DiscoveryMetrics;

const SERVICES: usize = 1_000;
const PER_SERVICE: usize = 10;

fn fleet() -> ServiceTable {
    let table = ServiceTable::new("/services", DiscoveryMetrics::default());
    let keys: Vec<(String, String)> = (0..SERVICES)
        .flat_map(|s| {
            (0..PER_SERVICE).map(move |i| {
                (
                    format!("/services/svc-{s}/10.{}.{}.{}:50051", s / 256, s % 256, i),
                    format!(r#"{{"weight":100,"metadata":{{"zone":"z{}"}}}}"#, i % 3),
                )
            })
        })
        .collect();
    let kvs: Vec<Kv<'_>> = keys
        .iter()
        .map(|(k, v)| Kv {
            key: k.as_bytes(),
            value: v.as_bytes(),
            lease: 0,
            revision: 1,
        })
        .collect();
    table.reset(
        &kvs,
        Position {
            cluster_id: 1,
            revision: 1,
        },
        "bench",
    );
    table
}

fn bench(c: &mut Criterion) {
    let table = fleet();
    let key = b"/services/svc-500/10.1.244.3:50051";
    let values: [&[u8]; 2] = [br#"{"weight":50}"#, br#"{"weight":60}"#];
    let mut n = 0usize;
    c.bench_function("apply one change (10k endpoints, 1k services)", |b| {
        b.iter(|| {
            n += 1;
            table.apply(
                &[KvChange::Put {
                    key,
                    value: values[n % 2],
                    lease: 0,
                    revision: 1,
                }],
                Position {
                    cluster_id: 1,
                    revision: 2 + n as i64,
                },
            );
        })
    });
    c.bench_function("hot-path read of one service's set", |b| {
        b.iter(|| std::hint::black_box(table.get("svc-500")).is_some())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
