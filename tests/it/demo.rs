//! `make demo` stays runnable: the demo, in its fast mode, end to end.

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_runs_to_the_end_with_no_failed_call() {
    let bin = Path::new(env!("CARGO_BIN_EXE_weir")).parent().unwrap();
    let demo = bin.join("examples/demo");
    assert!(
        demo.exists() && bin.join("examples/echo_server").exists(),
        "{} is missing: `make test` builds the examples (cargo test --all-targets only checks them)",
        demo.display()
    );
    let out = Command::new(&demo)
        .env("WEIR", env!("CARGO_BIN_EXE_weir"))
        .env("DEMO_FAST", "1")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The demo exits non-zero when a call failed or a step did not show
    // what it should; these lines say which.
    assert!(out.status.success(), "the demo failed:\n{report}");
    let has = |needle: &str| stdout.lines().any(|l| l.contains(needle));
    assert!(has("failed calls: 0"), "{report}");
    assert!(has("checks: 9 of 9 as expected"), "{report}");
    assert!(
        has("policy swaps: 4 (weighted (file)")
            && has("zone-aware (etcd)")
            && has("weighted (promoted)"),
        "{report}"
    );
    assert!(has("canary: the candidate placed"), "{report}");
    assert!(has("rejected policy versions: 1"), "{report}");
    for stopped in [
        "alpha: exited cleanly",
        "gamma: exited cleanly",
        "gateway: exited cleanly",
    ] {
        assert!(has(stopped), "{stopped}:\n{report}");
    }
    assert!(has("revoked, the set is empty"), "{report}");
}
