//! containerd's list filters, the part snapshotters see: a filter is a comma-separated
//! conjunction of `field==value`, `field!=value` or a bare `field` (present), where a field is
//! `name`, `parent`, `kind` or `labels.<key>` and keys or values may be double-quoted
//! (`labels."containerd.io/snapshot.ref"==sha256:...`). Several filters are alternatives.
//! Anything else (the regexp operator `~=` among them) is refused, never silently matched.

use std::collections::BTreeMap;

/// What a filter can look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The snapshot's name.
    Name,
    /// Its parent.
    Parent,
    /// Its kind (`active`, `view`, `committed`).
    Kind,
    /// One of its labels.
    Label(String),
}

/// One condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The field equals the value.
    Equals(Field, String),
    /// The field differs from the value.
    Differs(Field, String),
    /// The field is set and not empty.
    Present(Field),
}

/// A parsed filter: every condition must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Condition>);

/// The values a snapshot offers to filters.
pub struct Subject<'a> {
    /// The snapshot's name.
    pub name: &'a str,
    /// Its parent (empty: none).
    pub parent: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Subject<'_> {
    fn get(&self, f: &Field) -> Option<&str> {
        match f {
            Field::Name => Some(self.name),
            Field::Parent => Some(self.parent),
            Field::Kind => Some(self.kind),
            Field::Label(k) => self.labels.get(k).map(String::as_str),
        }
    }
}

/// A filter containerd sent that this snapshotter cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// An operator other than `==`, `!=` or presence.
    #[error("filter {filter:?}: operator {op:?} is not supported")]
    Operator {
        /// The filter.
        filter: String,
        /// The operator (`~=` and others are refused).
        op: String,
    },
    /// A quote that is not closed.
    #[error("unterminated quote in {0:?}")]
    UnterminatedQuote(String),
    /// A backslash at the end of a quoted string.
    #[error("dangling escape in {0:?}")]
    DanglingEscape(String),
    /// A field that is not name, parent, kind or labels.<key>.
    #[error("unknown filter field {0:?}")]
    Field(String),
}

impl Filter {
    /// Parse one filter string.
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        let mut conds = Vec::new();
        for part in split_unquoted(s, ',')? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, op, value) = split_condition(part)?;
            let field = parse_field(field)?;
            conds.push(match (op, value) {
                ("==", Some(v)) => Condition::Equals(field, unquote(v)?),
                ("!=", Some(v)) => Condition::Differs(field, unquote(v)?),
                ("", None) => Condition::Present(field),
                (op, _) => {
                    return Err(FilterError::Operator {
                        filter: s.to_string(),
                        op: op.to_string(),
                    })
                }
            });
        }
        Ok(Filter(conds))
    }

    /// Whether `subject` meets every condition.
    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        self.0.iter().all(|c| match c {
            Condition::Equals(f, v) => subject.get(f) == Some(v.as_str()),
            Condition::Differs(f, v) => subject.get(f) != Some(v.as_str()),
            Condition::Present(f) => subject.get(f).is_some_and(|v| !v.is_empty()),
        })
    }
}

/// Whether `subject` passes `filters` (any of them; all pass when there are none).
pub fn any_matches(filters: &[Filter], subject: &Subject<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(subject))
}

/// The characters of `s` outside double quotes, with their byte offsets (a backslash
/// escapes inside quotes); an error if a quote is left open.
fn unquoted(s: &str) -> Result<Vec<(usize, char)>, FilterError> {
    let (mut out, mut quoted, mut escaped) = (Vec::new(), false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if !quoted => out.push((i, c)),
            _ => {}
        }
    }
    if quoted {
        return Err(FilterError::UnterminatedQuote(s.to_string()));
    }
    Ok(out)
}

/// Split on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Result<Vec<&str>, FilterError> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in unquoted(s)? {
        if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    Ok(out)
}

/// `field`, operator and value of one condition (the operator is the first `==`, `!=` or
/// `~=` outside quotes).
fn split_condition(part: &str) -> Result<(&str, &str, Option<&str>), FilterError> {
    let bytes = part.as_bytes();
    for (i, c) in unquoted(part)? {
        if matches!(c, '=' | '!' | '~') && bytes.get(i + 1) == Some(&b'=') {
            return Ok((part[..i].trim(), &part[i..i + 2], Some(part[i + 2..].trim())));
        }
    }
    Ok((part.trim(), "", None))
}

fn parse_field(f: &str) -> Result<Field, FilterError> {
    match f {
        "name" => Ok(Field::Name),
        "parent" => Ok(Field::Parent),
        "kind" => Ok(Field::Kind),
        _ => match f.strip_prefix("labels.") {
            Some(k) if !k.is_empty() => Ok(Field::Label(unquote(k)?)),
            _ => Err(FilterError::Field(f.to_string())),
        },
    }
}

fn unquote(s: &str) -> Result<String, FilterError> {
    let Some(inner) = s.strip_prefix('"') else {
        return Ok(s.to_string());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| FilterError::UnterminatedQuote(s.to_string()))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().ok_or_else(|| FilterError::DanglingEscape(s.to_string()))?);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_remote_snapshot_filter() {
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==sha256:p"#).unwrap();
        let labels: BTreeMap<String, String> =
            [("containerd.io/snapshot.ref".to_string(), "sha256:abc".to_string())].into();
        let s = |parent| Subject {
            name: "sha256:abc",
            parent,
            kind: "committed",
            labels: &labels,
        };
        assert!(f.matches(&s("sha256:p")));
        assert!(!f.matches(&s("")));
        let any = [
            Filter::parse("kind==active").unwrap(),
            Filter::parse("name!=x,labels.\"containerd.io/snapshot.ref\"").unwrap(),
        ];
        assert!(any_matches(&any, &s("")));
        assert!(any_matches(&[], &s("")));
        assert!(!any_matches(&[Filter::parse("labels.nope").unwrap()], &s("")));
        assert!(Filter::parse("name~=^a").is_err());
        assert!(Filter::parse("bogus==1").is_err());
        assert!(Filter::parse(r#"labels."open==1"#).is_err());
        assert_eq!(
            Filter::parse(r#"labels."a,b"=="x\"y""#).unwrap(),
            Filter(vec![Condition::Equals(Field::Label("a,b".into()), "x\"y".into())])
        );
    }
}
