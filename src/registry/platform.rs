//! Platform choice in image indexes (`os/arch[/variant]`).

use oci_client::manifest::ImageIndexEntry;

/// A target platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture (`amd64`, `arm64`...).
    pub arch: String,
    /// Variant (`v7`, `v8`...).
    pub variant: Option<String>,
}

impl Platform {
    /// This node's platform in OCI spelling.
    pub fn current() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
            variant: (arch == "arm64").then(|| "v8".to_string()),
        }
    }

    /// The digest of the best entry: exact os/arch, matching variant if both name one (arm64
    /// without a variant counts as v8).
    pub fn choose(&self, entries: &[ImageIndexEntry]) -> Option<String> {
        let matches = |e: &&ImageIndexEntry| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os.to_string() == self.os && p.architecture.to_string() == self.arch)
        };
        let variant_of = |e: &ImageIndexEntry| {
            e.platform
                .as_ref()
                .and_then(|p| p.variant.clone())
                .or_else(|| (self.arch == "arm64").then(|| "v8".to_string()))
        };
        let candidates: Vec<&ImageIndexEntry> = entries.iter().filter(matches).collect();
        candidates
            .iter()
            .find(|e| self.variant.is_none() || variant_of(e) == self.variant)
            .or_else(|| candidates.first())
            .map(|e| e.digest.clone())
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("platform {0:?} is not os/arch[/variant]")]
pub struct BadPlatform(pub String);

impl std::str::FromStr for Platform {
    type Err = BadPlatform;
    fn from_str(s: &str) -> Result<Platform, BadPlatform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(BadPlatform(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest: &str, json_platform: &str) -> ImageIndexEntry {
        serde_json::from_str(&format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":1,"platform":{json_platform}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn chooses_os_arch_and_variant() {
        let entries = vec![
            entry("sha256:a", r#"{"os":"linux","architecture":"arm","variant":"v6"}"#),
            entry("sha256:b", r#"{"os":"linux","architecture":"arm","variant":"v7"}"#),
            entry("sha256:c", r#"{"os":"linux","architecture":"amd64"}"#),
            entry("sha256:d", r#"{"os":"windows","architecture":"amd64"}"#),
        ];
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.choose(&entries).as_deref(), Some("sha256:b"));
        let p: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(p.choose(&entries).as_deref(), Some("sha256:c"));
        let p: Platform = "linux/s390x".parse().unwrap();
        assert_eq!(p.choose(&entries), None);
        assert!("linux".parse::<Platform>().is_err());
    }
}
