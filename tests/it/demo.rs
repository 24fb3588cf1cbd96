//! `make demo` stays runnable: the demo script, in its fast mode, end to end.

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_runs_to_the_end_with_no_failed_call() {
    let bin = Path::new(env!("CARGO_BIN_EXE_weir")).parent().unwrap();
    let server = bin.join("examples/echo_server");
    assert!(
        server.exists(),
        "{} is missing: `make test` (cargo test --all-targets) builds the examples",
        server.display()
    );
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.sh"))
        .env("WEIR", env!("CARGO_BIN_EXE_weir"))
        .env("SERVER", &server)
        .env("CLIENT", bin.join("examples/echo_client"))
        .env("DEMO_FAST", "1")
        .output()
        .expect("bash runs the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let has = |needle: &str| stdout.lines().any(|l| l.contains(needle));
    assert!(
        has("300 calls in") && !has("failed 1") && !stdout.contains(" ok, 1"),
        "{stdout}"
    );
    let runs: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" calls in "))
        .collect();
    assert_eq!(runs.len(), 3, "{stdout}");
    assert!(
        runs.iter().all(|l| l.ends_with(" 0 failed")),
        "no call failed: {runs:?}"
    );
    for name in ["b1", "b2", "b3"] {
        assert!(
            has(&format!("  {name}        100 calls   33.3%")),
            "even round-robin over {name}:\n{stdout}"
        );
    }
    assert!(
        has("b3        100 calls  100.0%"),
        "only b3 is left at the end:\n{stdout}"
    );
    // Lease expiry and SIGTERM show as removals (the final stop may race the watcher's exit).
    assert!(
        stdout.lines().filter(|l| l.contains("- echo")).count() >= 2,
        "{stdout}"
    );
    assert!(
        has("weir_ejections_total"),
        "the killed backend was ejected:\n{stdout}"
    );
}
