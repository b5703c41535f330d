//! The pure part of configuring containerd: given the text of one containerd config file,
//! the same text with lazyblob's proxy plugin and CRI settings in it, formatting and
//! comments kept. Setting a value that is already right changes nothing, so applying the edit
//! to its own output gives the same bytes (what makes the node setup idempotent).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Table, TableLike, Value};

/// The proxy plugin's name in containerd (`[proxy_plugins.lazyblob]`, `snapshotter = "lazyblob"`).
pub const PLUGIN: &str = "lazyblob";

/// What lazyblob's settings in containerd point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The snapshotter's unix socket (lazyblob's `[snapshotter] socket`).
    pub socket: PathBuf,
    /// The snapshotter's root (exported to containerd 2.x for its disk usage accounting).
    pub root: PathBuf,
    /// `os/arch` of the node, for containerd 2.x's transfer service (`linux/amd64`).
    pub platform: String,
}

/// Which containerd reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `version = 2`: containerd 1.6 and 1.7.
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

/// Which file of a containerd configuration is edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The file containerd is started with: it gets every setting.
    Main,
    /// A file named by the main file's `imports`: it gets lazyblob's values only for the
    /// plugins it already defines (there they would override the main file's).
    Import,
}

/// A file that cannot be edited safely.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// Not TOML.
    #[error("not valid TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    /// A version this edit does not know.
    #[error(
        "config version {0}: containerd 1.6/1.7 read version 2 and containerd 2.x version 3; migrate it with `containerd config migrate` first"
    )]
    Version(String),
    /// A key lazyblob must set holds something else than a table.
    #[error("`{0}` is not a table")]
    NotATable(String),
}

/// The CRI table holding the snapshotter settings.
fn cri_table(version: Version) -> &'static [&'static str] {
    match version {
        Version::V2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        Version::V3 => &["plugins", "io.containerd.cri.v1.images"],
    }
}

const PROXY: &[&str] = &["proxy_plugins", PLUGIN];
const EXPORTS: &[&str] = &["proxy_plugins", PLUGIN, "exports"];
const TRANSFER: &[&str] = &["plugins", "io.containerd.transfer.v1.local"];

/// The config version of `text` (`version = 2` or `3`; no version is containerd's old
/// version 1, which is refused).
pub fn version(doc: &DocumentMut) -> Result<Version, EditError> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(2) => Ok(Version::V2),
        Some(3) => Ok(Version::V3),
        Some(n) => Err(EditError::Version(n.to_string())),
        None => Err(EditError::Version("1 (no `version` key)".into())),
    }
}

/// Parse `text`, for [`version`] and [`edit`].
pub fn parse(text: &str) -> Result<DocumentMut, EditError> {
    Ok(text.parse::<DocumentMut>()?)
}

/// `text` with lazyblob's settings for a containerd of `version`, as a file of `role`.
/// Returns the text unchanged (byte for byte) when every setting is already there.
pub fn edit(text: &str, version: Version, role: Role, settings: &Settings) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let mut changed = false;
    // containerd 1.6/1.7 replace a plugin's whole table with an import's (2.x merge key by
    // key): an import that defines the plugin gets lazyblob's keys, or it would undo them
    let wanted = |path: &[&str], doc: &DocumentMut| role == Role::Main || defines(doc, &path[..2]);

    if wanted(PROXY, &doc) {
        let proxy = table_at(doc.as_item_mut(), PROXY, PROXY)?;
        changed |= set(proxy, "type", "snapshot".into());
        changed |= set(proxy, "address", path_value(&settings.socket));
        if version == Version::V3 {
            let exports = table_at(doc.as_item_mut(), EXPORTS, EXPORTS)?;
            // the transfer service (2.1+) passes image and layer labels only when asked
            changed |= set(exports, "enable_remote_snapshot_annotations", "true".into());
            changed |= set(exports, "root", path_value(&settings.root));
        }
    }
    let cri = cri_table(version);
    if wanted(cri, &doc) {
        let table = table_at(doc.as_item_mut(), cri, cri)?;
        changed |= set(table, "snapshotter", PLUGIN.into());
        // the CRI plugin passes image and layer labels to the snapshotter only with this off
        changed |= set(table, "disable_snapshot_annotations", false.into());
        changed |= set(table, "discard_unpacked_layers", false.into());
    }
    if version == Version::V3 {
        let unpack: Vec<&str> = TRANSFER.iter().copied().chain(["unpack_config"]).collect();
        if wanted(&unpack, &doc) {
            let transfer = table_at(doc.as_item_mut(), TRANSFER, TRANSFER)?;
            changed |= unpack_config(transfer, &settings.platform)?;
        }
    }
    Ok(if changed { doc.to_string() } else { text.to_string() })
}

/// Whether the file defines the table at `path` (containerd merges it over the main file's).
fn defines(doc: &DocumentMut, path: &[&str]) -> bool {
    let mut item = doc.as_item();
    for key in path {
        match item.as_table_like().and_then(|t| t.get(key)) {
            Some(next) => item = next,
            None => return false,
        }
    }
    true
}

fn path_value(path: &std::path::Path) -> Value {
    path.to_string_lossy().as_ref().into()
}

/// The table at `path` under `item`, created where missing (as headers in a document, inline
/// inside inline tables; only the last one gets its own header).
fn table_at<'a>(item: &'a mut Item, path: &[&str], whole: &[&str]) -> Result<&'a mut dyn TableLike, EditError> {
    let inline = item.is_value();
    let table = item
        .as_table_like_mut()
        .ok_or_else(|| EditError::NotATable(whole.join(".")))?;
    let Some((first, rest)) = path.split_first() else {
        return Ok(table);
    };
    if table.get(first).is_none() {
        table.insert(first, new_table(inline, rest.is_empty()));
    }
    match table.get_mut(first) {
        Some(next) => table_at(next, rest, whole),
        None => Err(EditError::NotATable(whole.join("."))),
    }
}

fn new_table(inline: bool, last: bool) -> Item {
    if inline {
        Item::Value(Value::InlineTable(InlineTable::new()))
    } else {
        let mut t = Table::new();
        t.set_implicit(!last);
        Item::Table(t)
    }
}

/// Set `key` to `want` unless it already holds that value; keeps the line's comments.
fn set(table: &mut dyn TableLike, key: &str, want: Value) -> bool {
    match table.get_mut(key) {
        Some(Item::Value(have)) if same(have, &want) => false,
        Some(Item::Value(have)) => {
            let decor = have.decor().clone();
            *have = want;
            *have.decor_mut() = decor;
            true
        }
        _ => {
            // indented like the table's other keys
            let indent = table
                .iter()
                .next()
                .and_then(|(k, _)| table.key(k))
                .and_then(|k| k.leaf_decor().prefix())
                .and_then(|p| p.as_str())
                .map(str::to_string);
            table.insert(key, Item::Value(want));
            if let (Some(indent), Some(mut k)) = (indent, table.key_mut(key)) {
                k.leaf_decor_mut().set_prefix(indent);
            }
            true
        }
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        _ => false,
    }
}

/// containerd 2.x's transfer service unpacks with the snapshotters of `unpack_config`; an
/// empty list means overlayfs only, and setting it replaces that default, so a new list gets
/// lazyblob and overlayfs, an existing one gets lazyblob added.
fn unpack_config(transfer: &mut dyn TableLike, platform: &str) -> Result<bool, EditError> {
    let entry = |snapshotter: &str| {
        let mut t = InlineTable::new();
        t.insert("platform", platform.into());
        t.insert("snapshotter", snapshotter.into());
        t.insert("differ", "walking".into());
        t
    };
    let has_lazyblob = |t: &dyn TableLike| t.get("snapshotter").and_then(Item::as_str) == Some(PLUGIN);
    match transfer.get_mut("unpack_config") {
        None => {
            let mut list = ArrayOfTables::new();
            for name in [PLUGIN, "overlayfs"] {
                list.push(entry(name).into_table());
            }
            transfer.insert("unpack_config", Item::ArrayOfTables(list));
            Ok(true)
        }
        Some(Item::ArrayOfTables(list)) => {
            if list.iter().any(|t| has_lazyblob(t)) {
                return Ok(false);
            }
            list.push(entry(PLUGIN).into_table());
            Ok(true)
        }
        Some(Item::Value(Value::Array(list))) => {
            let present = list.iter().any(|v| {
                v.as_inline_table()
                    .is_some_and(|t| t.get("snapshotter").and_then(Value::as_str) == Some(PLUGIN))
            });
            if present {
                return Ok(false);
            }
            list.push(Value::InlineTable(entry(PLUGIN)));
            Ok(true)
        }
        Some(_) => Err(EditError::NotATable(
            "plugins.'io.containerd.transfer.v1.local'.unpack_config".into(),
        )),
    }
}

#[cfg(test)]
#[path = "containerd_edit_tests.rs"]
mod tests;
