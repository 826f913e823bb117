//! Password hashes as `mkts.yml` holds them: argon2id PHC strings (`$argon2id$v=19$m=…`), made by
//! `mkts hash-password` and checked when a user authenticates.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Hash `password` with a fresh random salt (argon2id, the crate's default cost).
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// `Ok` when `phc` is a hash this server can verify (checked when the config is read, so a pasted
/// password or a truncated hash is a start-up error, not a user who can never log in).
pub fn check_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| format!("not a password hash ({e}); make one with `mkts hash-password`"))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!("hash algorithm {} is not supported; make an argon2 hash with `mkts hash-password`", h.algorithm));
    }
    Ok(())
}

/// Whether `password` matches `phc`. Slow on purpose (tens of milliseconds): callers run it off the async
/// threads and cache successes.
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = hash("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        check_hash(&h).unwrap();
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horse!", &h));
        assert_ne!(hash("correct horse").unwrap(), h, "salted");
        assert!(check_hash("hunter2").unwrap_err().contains("mkts hash-password"));
        assert!(!verify("x", "hunter2"));
    }
}
