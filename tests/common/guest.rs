//! The first lines of every guest script of the VM tests: the registry on the host, the
//! daemon's binary and socket, and `check NAME STATUS [WHY]`, which prints the
//! `CHECK NAME ok|FAIL` lines the host asserts on.

/// The prelude, shebang first, for a registry on the host's `port`.
pub fn prelude(port: u16) -> String {
    format!(
        r#"#!/bin/sh
R=10.0.2.2:{port}
LB=/host/lazyblob
SOCK=/run/lazyblob.sock
check() {{ if [ "$2" = 0 ]; then echo "CHECK $1 ok"; else echo "CHECK $1 FAIL $3"; fi; }}"#
    )
}
