//! `make demo` stays runnable: the demo script, in its fast mode, end to end.

use std::process::Command;

#[test]
fn the_discovery_demo_runs_to_the_end_and_shows_each_step() {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/discovery-demo.sh"
        ))
        .env("WEIR", env!("CARGO_BIN_EXE_weir"))
        .env("DEMO_FAST", "1")
        .output()
        .expect("bash runs the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |sign: &str, addr: &str| {
        stdout
            .lines()
            .any(|l| l.contains(&format!("{sign} echo")) && l.contains(addr))
    };
    for addr in ["127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"] {
        assert!(line("+", addr), "{addr} added:\n{stdout}");
    }
    assert!(
        line("-", "127.0.0.1:50061"),
        "expired lease removed:\n{stdout}"
    );
    assert!(
        line("-", "127.0.0.1:50062"),
        "deregistration removed:\n{stdout}"
    );
    assert!(
        stdout.contains(r#""billing":[{"addr":"127.0.0.1:50071""#),
        "final JSON:\n{stdout}"
    );
}
