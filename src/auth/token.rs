//! Bearer tokens: `mkts1.<payload>.<signature>`, the payload `{"u": user, "e": expiry}` (base64url) and
//! the signature an HMAC-SHA256 of it. A token names a user, never a role: the role is looked up in the
//! current configuration each time, so a user removed from `mkts.yml` loses access at the next restart
//! even if the signing key is kept.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;

const PREFIX: &str = "mkts1.";

/// Signs and checks tokens with one key.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    /// A key from configured secret bytes (`auth.token_secret`): tokens survive restarts.
    pub fn from_secret(secret: &[u8]) -> TokenKey {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// A random key for this process: a restart invalidates every token.
    pub fn random() -> Result<TokenKey, String> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| format!("no randomness for the token key: {e}"))?;
        Ok(Self::from_secret(&k))
    }

    /// A token for `user` valid until `expires` (Unix seconds).
    pub fn issue(&self, user: &str, expires: u64) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::json!({ "u": user, "e": expires }).to_string());
        let tag = hmac::sign(&self.0, payload.as_bytes());
        format!("{PREFIX}{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The user of a token whose signature is right and that has not expired at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Option<String> {
        let (payload, sig) = token.strip_prefix(PREFIX)?.split_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        hmac::verify(&self.0, payload.as_bytes(), &sig).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let expires = v.get("e")?.as_u64()?;
        (now < expires).then(|| v.get("u")?.as_str().map(str::to_owned))?
    }

    /// A keyed digest of `parts` (the password cache's key: equal inputs give equal digests, and without
    /// the key nothing can be learnt from it).
    pub fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(&(p.len() as u64).to_le_bytes());
            ctx.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_check_signature_and_expiry() {
        let k = TokenKey::from_secret(b"0123456789abcdef");
        let t = k.issue("alice", 1_000);
        assert_eq!(k.verify(&t, 999).as_deref(), Some("alice"));
        assert_eq!(k.verify(&t, 1_000), None, "expired");
        assert_eq!(TokenKey::from_secret(b"another key 1234").verify(&t, 0), None, "other key");
        assert_eq!(TokenKey::random().unwrap().verify(&t, 0), None);
        // A forged payload with the old signature.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let forged = format!("{PREFIX}{}.{sig}", URL_SAFE_NO_PAD.encode(r#"{"u":"root","e":9999999999}"#));
        assert_eq!(k.verify(&forged, 0), None);
        for junk in ["", "mkts1.", "mkts1.a.b", "Bearer x", &t[..t.len() - 2]] {
            assert_eq!(k.verify(junk, 0), None, "{junk}");
        }
        assert_eq!(k.digest(&[b"a", b"bc"]), k.digest(&[b"a", b"bc"]));
        assert_ne!(k.digest(&[b"a", b"bc"]), k.digest(&[b"ab", b"c"]));
    }
}
