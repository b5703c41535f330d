//! Source images for converter tests: tar layers built entry by entry (including whiteouts,
//! hard links, devices, xattrs), compressed, pushed as ordinary OCI images; mounting a
//! converted image file-backed; walking a tree into comparable entries; lazy images served
//! by registry-mock.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lazyblob::registry::{parse_reference, sha256_digest, Registry};
use registry_mock::{MockConfig, MockRegistry};
use serde_json::json;

use super::{build_files, client, insecure_config, push_image};

/// Builds one tar layer.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

/// A header with fixed owner (0:0) and time.
pub fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }
    pub fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }
    /// A file with extended attributes (PAX `SCHILY.xattr.*` records).
    pub fn file_xattrs(&mut self, path: &str, mode: u32, data: &[u8], xattrs: &[(&str, &[u8])]) -> &mut Self {
        let ext: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.b
            .append_pax_extensions(ext.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, mode, data)
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn device(&mut self, path: &str, block: bool, major: u32, minor: u32) -> &mut Self {
        let kind = if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        };
        let mut h = header(kind, 0o660, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    pub fn fifo(&mut self, path: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Fifo, 0o644, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    /// A regular file whose name bytes are written as given, unsanitised (`..`, absolute).
    pub fn raw_file(&mut self, name: &[u8], data: &[u8]) -> &mut Self {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        self.raw(&mut h, data)
    }

    /// Raw bytes appended as they are (hostile headers).
    pub fn raw(&mut self, h: &mut tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.b.append(h, data).unwrap();
        self
    }
    pub fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// How a layer is compressed in the source image.
#[derive(Clone, Copy, Debug)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Compression::Zstd => (
            zstd::encode_all(tar, 1).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

/// Push an ordinary OCI image with these (already compressed) layers; returns its digest.
pub async fn push_source(reg: &Registry, reference: &str, layers: &[(Vec<u8>, &str)]) -> String {
    let r = parse_reference(reference).unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "Env": ["PATH=/usr/bin", "MODE=test"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|_| "sha256:00").collect::<Vec<_>>()},
        "history": [{"created_by": "test"}]
    });
    push_image_of(reg, &r, &config, layers).await
}

/// Push an ordinary OCI image whose layers are these tars (gzip-compressed), with the
/// config's `rootfs.diff_ids` right, as containerd checks them.
pub async fn push_runnable(reg: &Registry, reference: &str, tars: &[Vec<u8>]) {
    let r = parse_reference(reference).unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| sha256_digest(t)).collect::<Vec<_>>()},
    });
    let layers: Vec<(Vec<u8>, &str)> = tars.iter().map(|t| compress(t, Compression::Gzip)).collect();
    push_image_of(reg, &r, &config, &layers).await;
}

/// Push `config` and these (compressed) layers as an OCI image manifest; its digest.
async fn push_image_of(
    reg: &Registry,
    r: &oci_client::Reference,
    config: &serde_json::Value,
    layers: &[(Vec<u8>, &str)],
) -> String {
    let config = serde_json::to_vec(config).unwrap();
    reg.push_blob(r, Bytes::from(config.clone())).await.unwrap();
    let mut descs = Vec::new();
    for (data, mt) in layers {
        reg.push_blob(r, Bytes::from(data.clone())).await.unwrap();
        descs.push(json!({"mediaType": mt, "digest": sha256_digest(data), "size": data.len()}));
    }
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&config), "size": config.len()},
        "layers": descs
    });
    reg.push_manifest(
        r,
        Bytes::from(serde_json::to_vec(&manifest).unwrap()),
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await
    .unwrap()
}

/// A mounted filesystem, unmounted (lazily, if busy) on drop.
pub struct Mounted {
    pub dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if nix::mount::umount(&self.dir).is_err() {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Mount an EROFS metadata image file-backed with `device=` for each data blob (mount(2):
/// util-linux would turn the file into a loop device).
pub fn mount_erofs(meta: &Path, devices: &[PathBuf], dir: &Path) -> Mounted {
    std::fs::create_dir_all(dir).unwrap();
    let opts: Vec<String> = devices.iter().map(|d| format!("device={}", d.display())).collect();
    nix::mount::mount(
        Some(meta),
        dir,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.join(",").as_str()),
    )
    .unwrap_or_else(|e| panic!("mount erofs {}: {e}", meta.display()));
    Mounted { dir: dir.to_path_buf() }
}

/// Everything compared about one entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub target: Option<String>,
    pub rdev: Option<u64>,
    pub mtime: Option<i64>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// For files with several names: the first of them (hard-link identity).
    pub link_group: Option<String>,
}

/// Walk `root` into path -> entry (the root itself excluded).
pub fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    for p in paths {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let mut xattrs = BTreeMap::new();
        if kind != 'l' {
            if let Ok(names) = xattr::list(&p) {
                for n in names {
                    let name = n.to_string_lossy().into_owned();
                    if let Ok(Some(v)) = xattr::get(&p, &n) {
                        xattrs.insert(name, v);
                    }
                }
            }
        }
        let link_group = (kind != 'd' && md.nlink() > 1).then(|| {
            inodes
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        });
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: matches!(kind, 'f' | 'l').then(|| md.len()),
                sha256: (kind == 'f').then(|| super::sha256_hex(&std::fs::read(&p).unwrap())),
                target: (kind == 'l').then(|| std::fs::read_link(&p).unwrap().to_string_lossy().into_owned()),
                rdev: matches!(kind, 'c' | 'b').then(|| md.rdev()),
                mtime: (kind == 'f').then(|| md.mtime()),
                xattrs,
                link_group,
            },
        );
    }
    out
}

/// Compare two walks; panics with the first differences.
pub fn assert_same_tree(ours: &BTreeMap<String, Entry>, reference: &BTreeMap<String, Entry>) {
    let mut diffs = Vec::new();
    for (p, e) in reference {
        match ours.get(p) {
            None => diffs.push(format!("missing in lazyblob mount: {p}")),
            Some(o) if o != e => diffs.push(format!("{p}: lazyblob {o:?} != reference {e:?}")),
            _ => {}
        }
    }
    for p in ours.keys() {
        if !reference.contains_key(p) {
            diffs.push(format!("extra in lazyblob mount: {p}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(10)]
    );
}

/// Independent unpack: skopeo copies the source to an OCI layout, GNU tar extracts each layer
/// in order after applying its whiteouts with rm.
pub fn skopeo_unpack(source: &str, work: &Path) -> PathBuf {
    super::require_tool("skopeo", "skopeo");
    super::require_tool("tar", "tar");
    let layout = work.join("layout");
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", "--insecure-policy"])
        .arg(format!("docker://{source}"))
        .arg(format!("oci:{}:src", layout.display()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy failed");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let script = r#"set -e
root=$1; layer=$2
tar -tf "$layer" | while IFS= read -r p; do
  p=${p#./}; p=${p%/}; base=${p##*/}; case "$p" in */*) dir=${p%/*} ;; *) dir=. ;; esac
  case "$base" in
    .wh..wh..opq) find "$root/$dir" -mindepth 1 -maxdepth 1 -exec rm -rf {} + ;;
    .wh.*) rm -rf "$root/$dir/${base#.wh.}" ;;
  esac
done
tar -xpf "$layer" -C "$root" --xattrs --xattrs-include='*' --numeric-owner --exclude='.wh.*' --exclude='*/.wh.*'
"#;
    for l in manifest["layers"].as_array().unwrap() {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("unpack")
            .arg(&rootfs)
            .arg(blob(l["digest"].as_str().unwrap()))
            .status()
            .unwrap();
        assert!(st.success(), "unpacking a layer with GNU tar failed");
    }
    rootfs
}

/// Convert registry reference `src` into `dst` with the default options.
pub async fn convert_ref(reg: &Registry, src: &str, dst: &str) -> lazyblob::image::convert::ConvertReport {
    lazyblob::image::convert::convert(reg, &src.parse().unwrap(), &dst.parse().unwrap(), &Default::default())
        .await
        .unwrap_or_else(|e| panic!("converting {src} to {dst}: {e}"))
}

/// The lazyblob manifest `reference` resolves to.
pub async fn lazy_manifest(reg: &Registry, reference: &str) -> lazyblob::image::format::LazyManifest {
    let resolved = reg.resolve(&parse_reference(reference).unwrap()).await.unwrap();
    lazyblob::image::format::LazyManifest::from_manifest(&resolved.manifest).unwrap()
}

/// Push `layers` as `{host}/src/{name}:v1` and convert them to `{host}/lazy/{name}:v1` with
/// `opts`: the conversion must fail with an error mentioning every one of `expect`, and
/// nothing may be tagged at the destination.
pub async fn convert_refused(
    reg: &Registry,
    host: &str,
    name: &str,
    layers: &[(Vec<u8>, &str)],
    opts: &lazyblob::image::convert::ConvertOptions,
    expect: &[&str],
) {
    let src = format!("{host}/src/{name}:v1");
    let dst = format!("{host}/lazy/{name}:v1");
    push_source(reg, &src, layers).await;
    let err = lazyblob::image::convert::convert(reg, &src.parse().unwrap(), &dst.parse().unwrap(), opts)
        .await
        .expect_err("hostile layer must fail");
    let msg = format!("{err}");
    for e in expect {
        assert!(msg.contains(e), "error {msg:?} should mention {e:?}");
    }
    assert!(
        reg.resolve(&parse_reference(&dst).unwrap()).await.is_err(),
        "nothing may be tagged at {dst} after a failure"
    );
}

/// A registry-mock serving `files` as image `repo` (format 3) spread over `blobs` data blobs
/// (round robin); the mock and the image as built.
pub async fn serve_blobs(
    files: &BTreeMap<String, Vec<u8>>,
    repo: &str,
    blobs: usize,
) -> (MockRegistry, lazyblob::image::build::BuiltImage) {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let img = build_files(files, blobs);
    push_image(&client(&insecure_config(&[&host])), &host, repo, &img).await;
    (mock, img)
}

/// [`serve_blobs`] with one data blob; the mock and the data blob's digest.
pub async fn serve(files: &BTreeMap<String, Vec<u8>>, repo: &str) -> (MockRegistry, String) {
    let (mock, img) = serve_blobs(files, repo, 1).await;
    (mock, sha256_digest(&img.data[0]))
}

/// [`serve`] of one file, `f.bin`, holding `data`.
pub async fn serve_one(data: &[u8], repo: &str) -> (MockRegistry, String) {
    serve(&BTreeMap::from([("f.bin".to_string(), data.to_vec())]), repo).await
}
