//! A `PullImage`'s `AuthConfig` as a credential for one repository: which registry host and
//! repository the image names (the registry client's own normalisation, so lookups match),
//! and which secret kubelet sent.

#![forbid(unsafe_code)]

use base64::Engine as _;
use k8s_cri::v1::AuthConfig;

use crate::registry::captured::Secret;

/// The longest `auth` field decoded (a base64 `user:password`).
const MAX_AUTH_FIELD: usize = 64 * 1024;

/// Why a pull's credentials were not kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// The image is not a valid reference.
    #[error("image {0:?} is not a valid reference")]
    Reference(String),
    /// `auth` is not base64 of `user:password`.
    #[error("the auth field is not base64 of user:password")]
    AuthField,
    /// An identity token needs an OAuth2 refresh exchange lazyblob does not do.
    #[error("identity tokens are not supported (use a user and password, or a registry token)")]
    IdentityToken,
}

/// Where an image lives: registry host (`docker.io`, `reg:5000`) and repository.
pub fn scope_of(image: &str) -> Result<(String, String), SecretError> {
    let r: oci_client::Reference = image.parse().map_err(|_| SecretError::Reference(image.to_string()))?;
    Ok((r.registry().to_string(), r.repository().to_string()))
}

/// The secret in `auth`; `None` when it holds none (an anonymous pull).
pub fn secret_of(auth: &AuthConfig) -> Result<Option<Secret>, SecretError> {
    if !auth.username.is_empty() {
        return Ok(Some(Secret::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        if auth.auth.len() > MAX_AUTH_FIELD {
            return Err(SecretError::AuthField);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| SecretError::AuthField)?;
        let text = String::from_utf8(decoded).map_err(|_| SecretError::AuthField)?;
        let (username, password) = text.split_once(':').ok_or(SecretError::AuthField)?;
        return Ok(Some(Secret::Basic {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    if !auth.registry_token.is_empty() {
        return Ok(Some(Secret::Bearer {
            token: auth.registry_token.clone(),
        }));
    }
    if !auth.identity_token.is_empty() {
        return Err(SecretError::IdentityToken);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_the_registry_client_does() {
        assert_eq!(
            scope_of("nginx").unwrap(),
            ("docker.io".to_string(), "library/nginx".to_string())
        );
        assert_eq!(
            scope_of("reg.example:5000/team/app:v1").unwrap(),
            ("reg.example:5000".to_string(), "team/app".to_string())
        );
        assert!(scope_of("UPPER/Case").is_err());
    }

    #[test]
    fn every_form_of_secret_kubelet_sends() {
        let user = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        let basic = |u: &str, p: &str| {
            Some(Secret::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(secret_of(&user).unwrap(), basic("u", "p"));
        let field = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u2:p:2"),
            ..Default::default()
        };
        assert_eq!(secret_of(&field).unwrap(), basic("u2", "p:2"));
        let token = AuthConfig {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(secret_of(&token).unwrap(), Some(Secret::Bearer { token: "t".into() }));
        assert_eq!(secret_of(&AuthConfig::default()).unwrap(), None);
        let bad = AuthConfig {
            auth: "not base64!".into(),
            ..Default::default()
        };
        assert_eq!(secret_of(&bad), Err(SecretError::AuthField));
        let identity = AuthConfig {
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert_eq!(secret_of(&identity), Err(SecretError::IdentityToken));
    }
}
