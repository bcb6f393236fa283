//! Signed session tokens: round trips, key rotation, and the proof that any
//! single-byte mutation or truncation of a valid token is rejected.

use proptest::prelude::*;
use raceguard::keys::UserId;
use raceguard::session::{SessionId, TokenKey, TokenSigner};
use raceguard::{Error, SessionError};

fn signer(id: u8, byte: u8) -> TokenSigner {
    TokenSigner::new(TokenKey::new(id, [byte; 32]).unwrap())
}

fn is_err(r: Result<impl std::fmt::Debug, Error>, want: SessionError) -> bool {
    matches!(r, Err(Error::Session(got)) if got == want)
}

#[test]
fn round_trip_and_expiry() {
    let s = signer(1, 7);
    let alice = UserId::new("alice").unwrap();
    let id = SessionId::generate().unwrap();
    let t = s.sign(&alice, &id, 1_000).unwrap();
    let claims = s.verify(&t, 999).unwrap();
    assert_eq!(claims.user(), &alice);
    assert_eq!(claims.session_id(), &id);
    assert!(is_err(s.verify(&t, 1_000), SessionError::Expired));
    assert!(is_err(s.verify(&t, u64::MAX), SessionError::Expired));
}

#[test]
fn foreign_and_rotated_keys() {
    let alice = UserId::new("alice").unwrap();
    let id = SessionId::generate().unwrap();
    let old = signer(1, 1);
    let t_old = old.sign(&alice, &id, 100).unwrap();
    // Another deployment's key with the same id: foreign.
    assert!(is_err(
        signer(1, 9).verify(&t_old, 0),
        SessionError::BadToken
    ));
    // Rotation: new signer still accepts key 1 ...
    let new = signer(2, 2)
        .with_verification_key(TokenKey::new(1, [1; 32]).unwrap())
        .unwrap();
    assert_eq!(new.verify(&t_old, 0).unwrap().key_id(), 1);
    let t_new = new.sign(&alice, &id, 100).unwrap();
    assert_eq!(new.verify(&t_new, 0).unwrap().key_id(), 2);
    // ... and once key 1 is dropped, its tokens are rejected.
    assert!(is_err(
        signer(2, 2).verify(&t_old, 0),
        SessionError::BadToken
    ));
    // The old verifier does not know key 2.
    assert!(is_err(old.verify(&t_new, 0), SessionError::BadToken));
}

#[test]
fn garbage_is_bad_token() {
    let s = signer(1, 7);
    for t in ["", "a", "====", "AAAA", &"A".repeat(5_000), "éé"] {
        assert!(is_err(s.verify(t, 0), SessionError::BadToken), "{t:?}");
    }
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Replacing any one character of a valid token by any other character
    /// is rejected (never accepted, never panics).
    #[test]
    fn any_single_character_change_is_rejected(
        user in "[a-zA-Z0-9@._-]{1,40}",
        expires in 1u64..u64::MAX,
        pos in any::<prop::sample::Index>(),
        replacement in any::<prop::sample::Index>(),
    ) {
        let s = signer(1, 7);
        let user = UserId::new(user).unwrap();
        let token = s.sign(&user, &SessionId::generate().unwrap(), expires).unwrap();
        let mut bytes = token.clone().into_bytes();
        let i = pos.index(bytes.len());
        let c = ALPHABET[replacement.index(ALPHABET.len())];
        prop_assume!(bytes[i] != c);
        bytes[i] = c;
        let mutated = String::from_utf8(bytes).unwrap();
        prop_assert!(is_err(s.verify(&mutated, 0), SessionError::BadToken), "{} accepted", mutated);
    }

    /// Flipping any bit of any byte of the token text is rejected.
    #[test]
    fn any_byte_flip_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let s = signer(1, 7);
        let token = s.sign(&UserId::new("alice").unwrap(), &SessionId::generate().unwrap(), 10).unwrap();
        let mut bytes = token.into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let mutated = String::from_utf8_lossy(&bytes).into_owned();
        prop_assert!(is_err(s.verify(&mutated, 0), SessionError::BadToken));
    }

    /// Every truncation (and every extension) of a valid token is rejected.
    #[test]
    fn truncations_and_extensions_are_rejected(
        user in "[a-z]{1,20}",
        cut in any::<prop::sample::Index>(),
        extra in "[A-Za-z0-9_-]{1,4}",
    ) {
        let s = signer(1, 7);
        let token = s.sign(&UserId::new(user).unwrap(), &SessionId::generate().unwrap(), 10).unwrap();
        let n = cut.index(token.len());
        prop_assert!(is_err(s.verify(&token[..n], 0), SessionError::BadToken));
        let longer = format!("{token}{extra}");
        prop_assert!(is_err(s.verify(&longer, 0), SessionError::BadToken));
    }
}
