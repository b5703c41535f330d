//! Generates the containerd snapshots service (server, and a client for tests) from the vendored protos in
//! `proto/containerd`, compiled by `protox` (no `protoc` needed; it carries the
//! `google/protobuf` well-known types).

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["proto/containerd/services/snapshots/v1/snapshots.proto"],
        ["proto/containerd"],
    )
    .unwrap_or_else(|e| panic!("compiling containerd's snapshots protos: {e}"));
    // the client (no transport of its own) serves the tests that speak to the service
    tonic_prost_build::configure()
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the containerd snapshots API: {e}"));
}
