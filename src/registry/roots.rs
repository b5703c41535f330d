//! TLS trust roots when the system has no CA store (minimal images, initramfs): the Mozilla
//! root set built into lazyblob is written to a PEM file and named by `SSL_CERT_FILE`, which the
//! platform verifier honours. TLS stays verified; it never falls back to "accept anything".

use std::path::{Path, PathBuf};

use base64::Engine as _;

/// Bundles the platform verifier looks for (the same list as openssl-probe's common ones).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// The bundled roots as PEM.
pub fn bundled_pem() -> String {
    let mut out = String::new();
    for c in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// If neither `SSL_CERT_FILE`/`SSL_CERT_DIR` nor a system bundle exists, write the bundled
/// roots into a new private directory (`0700`, random name) under `dir`, with `O_EXCL`, and
/// set `SSL_CERT_FILE`: nobody else can have planted or swapped the file. Call before any
/// thread starts.
pub fn ensure_ca_store(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if std::env::var_os("SSL_CERT_FILE").is_some() || std::env::var_os("SSL_CERT_DIR").is_some() {
        return Ok(None);
    }
    if SYSTEM_BUNDLES.iter().any(|p| Path::new(p).is_file()) {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    // tempdir: mkdir 0700 with a random name; kept for the life of the process
    let private = tempfile::Builder::new()
        .prefix("lazyblob-roots-")
        .tempdir_in(dir)?
        .keep();
    let path = private.join("bundled-roots.pem");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        f.write_all(bundled_pem().as_bytes())?;
    }
    // Edition 2021: set_var is safe; this runs single-threaded, before the runtime exists.
    std::env::set_var("SSL_CERT_FILE", &path);
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundled_roots_are_pem() {
        let pem = super::bundled_pem();
        assert!(pem.matches("BEGIN CERTIFICATE").count() > 100);
    }
}
