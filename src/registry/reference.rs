//! Image references (`[host[:port]/]path[:tag][@digest]`), parsed by the grammar of the
//! distribution project (`reference/regexp.go`) into `oci-client`'s [`Reference`], with the
//! same normalization (`docker.io`, `library/`, `latest`).
//!
//! Why not `Reference::from_str`: oci-spec matches one large Unicode regex, and the regex's
//! compiled program and per-thread match caches hold about 17 MiB for the daemon's life
//! (measured with heaptrack under the 10,000-reader scale bench), more than a third of the
//! daemon's whole heap. This is a direct reading of the same grammar, ASCII only (as the
//! distribution spec's tags are), with no allocation beyond the result.

#![forbid(unsafe_code)]

use oci_client::Reference;

/// The longest repository path (`library/` included) a registry takes.
const NAME_MAX: usize = 255;
/// The longest tag.
const TAG_MAX: usize = 128;

/// Why a string is not an image reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The empty string.
    #[error("empty reference")]
    Empty,
    /// The name part breaks the grammar.
    #[error("invalid reference format")]
    Format,
    /// The tag breaks the grammar.
    #[error("invalid tag (want [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})")]
    Tag,
    /// The digest is not `algorithm:hex`.
    #[error("invalid digest format")]
    Digest,
    /// The hex part's length is not the algorithm's.
    #[error("invalid digest length")]
    DigestLength,
    /// Not sha256, sha384 or sha512.
    #[error("unsupported digest algorithm")]
    DigestAlgorithm,
    /// The repository path is too long.
    #[error("repository name is longer than {NAME_MAX} characters")]
    NameTooLong,
}

/// Parse `s` as an image reference.
pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(check_digest(digest)?)),
        None => (s, None),
    };
    // a tag is what follows the last ':' when no '/' follows it (else the ':' is a port's)
    let (name, tag) = match rest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(check_tag(tag)?)),
        _ => (rest, None),
    };
    if !is_name(name) {
        return Err(ReferenceError::Format);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_MAX {
        return Err(ReferenceError::NameTooLong);
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.into(), d.into()),
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn check_tag(tag: &str) -> Result<&str, ReferenceError> {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = tag.as_bytes();
    let ok =
        !b.is_empty() && b.len() <= TAG_MAX && word(b[0]) && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-');
    ok.then_some(tag).ok_or(ReferenceError::Tag)
}

/// `algorithm:hex`: the algorithm `[A-Za-z][A-Za-z0-9]*` components joined by one of `+._-`,
/// at least 32 hex digits, and the length the algorithm gives (sha256, sha384, sha512).
fn check_digest(digest: &str) -> Result<&str, ReferenceError> {
    let (algorithm, hex) = digest.split_once(':').ok_or(ReferenceError::Digest)?;
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|c| {
        let b = c.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ReferenceError::Digest);
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ReferenceError::DigestAlgorithm),
    };
    (hex.len() == want)
        .then_some(digest)
        .ok_or(ReferenceError::DigestLength)
}

/// `[domain/]component(/component)*`: the first part may be a domain or a path component.
fn is_name(name: &str) -> bool {
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    let rest_ok = rest.is_none_or(|r| r.split('/').all(is_component));
    rest_ok && (is_component(first) || (rest.is_some() && is_domain(first)))
}

/// A path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn is_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host[:port]`: host labels (`[A-Za-z0-9]`, `-` inside) joined by `.`, a decimal port.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()));
    port_ok && host.split('.').all(label)
}

/// Docker's normalization: a first part that is not a host (no `.` or `:`, not `localhost`)
/// belongs to the path on Docker Hub; Docker Hub's one-part names are under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (domain, remainder) = match name.split_once('/') {
        Some((d, r)) if d.contains(['.', ':']) || d == "localhost" => (d, r),
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if domain == "docker.io" && !remainder.contains('/') {
        (domain.to_string(), format!("library/{remainder}"))
    } else {
        (domain.to_string(), remainder.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> Option<(String, String, Option<String>, Option<String>)> {
        parse(s).ok().map(|r| {
            (
                r.registry().to_string(),
                r.repository().to_string(),
                r.tag().map(str::to_string),
                r.digest().map(str::to_string),
            )
        })
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// The same answers as oci-spec's regex for references of every shape, valid and not.
    #[test]
    fn agrees_with_oci_spec() {
        let digest = format!("sha256:{HEX}");
        let mut cases: Vec<String> = [
            "busybox",
            "busybox:1.36",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "localhost/repo",
            "localhost:5000/a/b/c:v1",
            "index.docker.io/nginx",
            "docker.io/nginx",
            "library/nginx",
            "org/app",
            "127.0.0.1:5000/x/y:z",
            "a.b-c.d/e__f/g-h--i.j_k:Tag_1.0-x",
            "a-/b",
            "-a/b",
            "a/b-",
            "a/b..c",
            "a/b___c",
            "a/B",
            "A.com/b",
            "a:/b",
            "a:5000x/b",
            ":tag",
            "repo:",
            "repo:.tag",
            "repo:-tag",
            "repo@",
            "repo@sha256",
            "repo@sha256:abc",
            "a//b",
            "/a",
            "a/",
            "a b",
            "a/b:c/d",
            "a@b@c",
            "host:1:2/x",
            "x.y:1/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for base in ["busybox", "reg.io:443/a/b", "reg.io/a:t"] {
            cases.push(format!("{base}@{digest}"));
            cases.push(format!("{base}@sha512:{HEX}{HEX}"));
            cases.push(format!("{base}@sha384:{}", &format!("{HEX}{HEX}")[..96]));
            cases.push(format!("{base}@sha256:{}", &HEX[..63]));
            cases.push(format!("{base}@md5:{HEX}"));
            cases.push(format!("{base}@sha256:{}", HEX.to_uppercase()));
            cases.push(format!("{base}@sha256+b64:{HEX}"));
            cases.push(format!("{base}@sha256:{}g", &HEX[..63]));
        }
        cases.push(format!("repo:{}", "t".repeat(128)));
        cases.push(format!("repo:{}", "t".repeat(129)));
        cases.push(format!("r/{}", "a".repeat(250)));
        cases.push(format!("r/{}", "a".repeat(260)));
        cases.push("a".repeat(250));
        for s in &cases {
            let theirs = s.parse::<Reference>().ok().map(|r| {
                (
                    r.registry().to_string(),
                    r.repository().to_string(),
                    r.tag().map(str::to_string),
                    r.digest().map(str::to_string),
                )
            });
            assert_eq!(parts(s), theirs, "{s}");
        }
    }

    /// Random strings over the grammar's alphabet: both parsers accept the same ones and read
    /// them alike.
    #[test]
    fn agrees_with_oci_spec_on_random_strings() {
        let alphabet = b"ab0Z.-_:/@";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 1 + (x % 12) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i * 4)) % alphabet.len() as u64) as usize] as char)
                .collect();
            let theirs = s.parse::<Reference>().ok().map(|r| r.whole());
            assert_eq!(parse(&s).ok().map(|r| r.whole()), theirs, "{s:?}");
        }
    }

    #[test]
    fn refuses_non_ascii_tags() {
        assert_eq!(parse("repo:tägg").unwrap_err(), ReferenceError::Tag);
        assert_eq!(parse("").unwrap_err(), ReferenceError::Empty);
        assert_eq!(
            parse(&format!("r@md5:{HEX}")).unwrap_err(),
            ReferenceError::DigestAlgorithm
        );
    }
}
