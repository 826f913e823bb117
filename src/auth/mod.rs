//! Authentication: who a request is, from the credentials its interface carries.
//!
//! With `auth:` in `mkts.yml`, every interface but `/heartbeat` (and `/metrics`, unless
//! `auth.protect_metrics`) needs credentials, in its ecosystem's own form: HTTP Basic (`user:password`,
//! padded or not, as the ADBC driver sends it) or `Bearer <token>` in the `authorization` header of a
//! gRPC call or an HTTP request. Arrow Flight's handshake trades Basic credentials for a token
//! ([`Authenticator::issue_token`]) that works on every interface. The [`grpc`] layer and the [`http`]
//! middleware verify the header once per request and put the [`Principal`] into the request's
//! extensions; interfaces turn it into their [`crate::service::Caller`], and the operations layer checks
//! its role ([`crate::service::policy`]).
//!
//! Wrong credentials get one message whether or not the user exists, and cost the same time (an unknown
//! user is checked against a dummy hash). Neither passwords nor tokens are ever logged.

pub mod grpc;
pub mod http;
pub mod password;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use parking_lot::Mutex;

use crate::config::AuthConfig;
use crate::service::{Principal, Role, UNAUTHENTICATED};
use token::TokenKey;

/// Why a request was not authenticated. The texts are what clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{}", UNAUTHENTICATED)]
    Missing,
    /// Unknown user, wrong password, bad or expired token: deliberately one message.
    #[error("invalid credentials (wrong user or password, or an expired token)")]
    Invalid,
    #[error("unsupported authorization scheme: use Basic or Bearer")]
    Scheme,
}

/// How long a verified password is remembered, so clients that send Basic on every call (pymarketstore)
/// do not pay an argon2 verification each time.
const PASSWORD_CACHE_TTL: Duration = Duration::from_secs(300);
/// Entries the password cache holds before it is emptied.
const PASSWORD_CACHE_MAX: usize = 4096;

/// Base64 for HTTP Basic, accepting input with or without padding.
const BASIC_B64: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

struct User {
    hash: String,
    role: Role,
}

/// The users of `auth:` and the key that signs their tokens.
pub struct Authenticator {
    users: HashMap<String, User>,
    key: TokenKey,
    ttl: Duration,
    /// Whether the key came from `auth.token_secret` (tokens survive a restart).
    persistent_key: bool,
    /// Verified passwords: keyed digest of (user, password) → user, valid until the instant.
    verified: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    /// Tokens the plugin host minted for its out-of-process plugins (valid while this server runs).
    plugin_tokens: Mutex<HashMap<String, Principal>>,
    /// A hash to check unknown users against, so they cost what a known one does.
    dummy_hash: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("users", &self.users.len()).field("ttl", &self.ttl).finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Authenticator {
    /// The authenticator of an `auth:` block.
    pub fn new(cfg: &AuthConfig) -> Result<Arc<Authenticator>, String> {
        let (key, persistent_key) = match &cfg.token_secret {
            Some(s) => (TokenKey::from_secret(s.0.as_bytes()), true),
            None => (TokenKey::random()?, false),
        };
        for u in &cfg.users {
            password::check_hash(&u.password_hash.0).map_err(|e| format!("user {:?}: password_hash is {e}", u.name))?;
        }
        let users = cfg.users.iter().map(|u| (u.name.clone(), User { hash: u.password_hash.0.clone(), role: u.role })).collect();
        Ok(Arc::new(Authenticator {
            users,
            key,
            ttl: cfg.token_ttl,
            persistent_key,
            verified: Mutex::new(HashMap::new()),
            plugin_tokens: Mutex::new(HashMap::new()),
            dummy_hash: password::hash("mkts: no such user")?,
        }))
    }

    /// Whether tokens stay valid across a restart (`auth.token_secret` is set).
    pub fn tokens_survive_restart(&self) -> bool {
        self.persistent_key
    }

    /// The principal of an `authorization` header value (`None`: the request had none).
    pub async fn authenticate(self: &Arc<Self>, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty()).ok_or(AuthError::Missing)?;
        let (scheme, value) = header.split_once(' ').ok_or(AuthError::Scheme)?;
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.verify_token(value).ok_or(AuthError::Invalid);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::Scheme);
        }
        let decoded = BASIC_B64.decode(value).map_err(|_| AuthError::Invalid)?;
        let text = String::from_utf8(decoded).map_err(|_| AuthError::Invalid)?;
        let (user, pass) = text.split_once(':').ok_or(AuthError::Invalid)?;
        let digest = self.key.digest(&[b"password", user.as_bytes(), pass.as_bytes()]);
        if let Some(p) = self.cached(&digest) {
            return Ok(p);
        }
        let (me, user, pass) = (self.clone(), user.to_string(), pass.to_string());
        // argon2 takes tens of milliseconds of CPU: off the async threads.
        let ok = tokio::task::spawn_blocking(move || {
            let hash = me.users.get(&user).map(|u| u.hash.as_str()).unwrap_or(&me.dummy_hash);
            let ok = password::verify(&pass, hash) && me.users.contains_key(&user);
            ok.then_some(user)
        })
        .await
        .map_err(|_| AuthError::Invalid)?;
        let user = ok.ok_or(AuthError::Invalid)?;
        let mut cache = self.verified.lock();
        if cache.len() >= PASSWORD_CACHE_MAX {
            cache.clear();
        }
        cache.insert(digest, (user.clone(), Instant::now() + PASSWORD_CACHE_TTL));
        drop(cache);
        self.principal(&user).ok_or(AuthError::Invalid)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Principal> {
        let mut cache = self.verified.lock();
        match cache.get(digest) {
            Some((user, until)) if Instant::now() < *until => {
                let user = user.clone();
                drop(cache);
                self.principal(&user)
            }
            Some(_) => {
                cache.remove(digest);
                None
            }
            None => None,
        }
    }

    fn principal(&self, user: &str) -> Option<Principal> {
        self.users.get(user).map(|u| Principal { user: user.to_string(), role: u.role })
    }

    fn verify_token(&self, token: &str) -> Option<Principal> {
        if let Some(p) = self.plugin_tokens.lock().get(token) {
            return Some(p.clone());
        }
        let user = self.key.verify(token, now_secs())?;
        self.principal(&user)
    }

    /// A bearer token for `principal`, valid for `auth.token_ttl` (the Flight handshake's answer).
    pub fn issue_token(&self, principal: &Principal) -> String {
        if self.plugin_tokens.lock().values().any(|p| p == principal) {
            // A plugin's identity is not a configured user: hand back a plugin token for it.
            return self.plugin_token(&principal.user, principal.role);
        }
        self.key.issue(&principal.user, now_secs().saturating_add(self.ttl.as_secs()))
    }

    /// A token for an out-of-process plugin acting as `name` with `role`. It is valid until this server
    /// stops (the host restarts its plugins with the server, and hands each a new one).
    pub fn plugin_token(&self, name: &str, role: Role) -> String {
        let mut b = [0u8; 24];
        // Without randomness no token is minted that could be guessed: the plugin then cannot connect.
        if getrandom::fill(&mut b).is_err() {
            return String::new();
        }
        let token = format!("mktsp.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b));
        self.plugin_tokens.lock().insert(token.clone(), Principal { user: name.to_string(), role });
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, UserConfig};

    fn auth(secret: Option<&str>) -> Arc<Authenticator> {
        let users = vec![
            UserConfig { name: "alice".into(), password_hash: Secret(password::hash("wonderland").unwrap()), role: Role::Admin },
            UserConfig { name: "bob".into(), password_hash: Secret(password::hash("builder").unwrap()), role: Role::ReadOnly },
        ];
        Authenticator::new(&AuthConfig { users, protect_metrics: false, token_ttl: Duration::from_secs(60), token_secret: secret.map(|s| Secret(s.into())) }).unwrap()
    }

    fn basic(user_pass: &str, pad: bool) -> String {
        let e = if pad { base64::engine::general_purpose::STANDARD.encode(user_pass) } else { base64::engine::general_purpose::STANDARD_NO_PAD.encode(user_pass) };
        format!("Basic {e}")
    }

    #[tokio::test]
    async fn basic_and_bearer_resolve_to_the_configured_role() {
        let a = auth(None);
        let alice = Principal { user: "alice".into(), role: Role::Admin };
        // "alice:wonderland" is 16 bytes: its base64 has padding, which the ADBC driver leaves out.
        assert_eq!(a.authenticate(Some(&basic("alice:wonderland", true))).await, Ok(alice.clone()));
        assert_eq!(a.authenticate(Some(&basic("alice:wonderland", false))).await, Ok(alice.clone()));
        assert_eq!(a.authenticate(Some(&basic("bob:builder", true))).await.map(|p| p.role), Ok(Role::ReadOnly));
        let t = a.issue_token(&alice);
        assert_eq!(a.authenticate(Some(&format!("Bearer {t}"))).await, Ok(alice.clone()));
        assert_eq!(a.authenticate(Some(&format!("bearer {t}"))).await, Ok(alice));
    }

    #[tokio::test]
    async fn wrong_credentials_read_the_same_whoever_is_named() {
        let a = auth(None);
        let wrong_pw = a.authenticate(Some(&basic("alice:nope", true))).await.unwrap_err();
        let no_user = a.authenticate(Some(&basic("mallory:nope", true))).await.unwrap_err();
        assert_eq!(wrong_pw, AuthError::Invalid);
        assert_eq!(wrong_pw.to_string(), no_user.to_string());
        assert_eq!(a.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some("Digest x")).await, Err(AuthError::Scheme));
        assert_eq!(a.authenticate(Some("Basic !!!")).await, Err(AuthError::Invalid));
        assert_eq!(a.authenticate(Some("Bearer mkts1.x.y")).await, Err(AuthError::Invalid));
        // A cached success does not make a wrong password right.
        a.authenticate(Some(&basic("alice:wonderland", true))).await.unwrap();
        assert_eq!(a.authenticate(Some(&basic("alice:wonderlan", true))).await, Err(AuthError::Invalid));
    }

    #[tokio::test]
    async fn tokens_outlive_a_restart_only_with_a_configured_secret() {
        let alice = Principal { user: "alice".into(), role: Role::Admin };
        let t = auth(Some("sixteen chars ok")).issue_token(&alice);
        assert_eq!(auth(Some("sixteen chars ok")).authenticate(Some(&format!("Bearer {t}"))).await, Ok(alice.clone()));
        let t = auth(None).issue_token(&alice);
        assert_eq!(auth(None).authenticate(Some(&format!("Bearer {t}"))).await, Err(AuthError::Invalid));
    }

    #[test]
    fn a_pasted_password_instead_of_a_hash_is_refused_at_start() {
        let users = vec![UserConfig { name: "a".into(), password_hash: Secret("hunter2".into()), role: Role::Admin }];
        let e = Authenticator::new(&AuthConfig { users, protect_metrics: false, token_ttl: Duration::from_secs(60), token_secret: None }).unwrap_err();
        assert!(e.starts_with("user \"a\": password_hash is not a password hash") && e.contains("mkts hash-password"), "{e}");
    }

    #[tokio::test]
    async fn plugin_tokens_carry_the_plugin_role() {
        let a = auth(None);
        let t = a.plugin_token("bgworkers:feed", Role::ReadWrite);
        let p = a.authenticate(Some(&format!("Bearer {t}"))).await.unwrap();
        assert_eq!((p.user.as_str(), p.role), ("bgworkers:feed", Role::ReadWrite));
        assert_eq!(a.authenticate(Some("Bearer mktsp.guess")).await, Err(AuthError::Invalid));
    }
}
