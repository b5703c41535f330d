//! Generates the containerd snapshots service (server side) from the vendored protos in
//! `proto/containerd`, compiled by `protox` (no `protoc` needed; it carries the
//! `google/protobuf` well-known types).

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["proto/containerd/services/snapshots/v1/snapshots.proto"],
        ["proto/containerd"],
    )
    .unwrap_or_else(|e| panic!("compiling containerd's snapshots protos: {e}"));
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the containerd snapshots API: {e}"));
}
