//! Generates the example service's code (proto/weir/example/v1/echo.proto),
//! used by the examples, the testkit's echo backend and the tests.
fn main() {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/weir/example/v1/echo.proto"], &["proto"])
        .expect("compiling proto/weir/example/v1/echo.proto (needs protoc: `make deps`)");
}
