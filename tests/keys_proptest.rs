//! Property tests of the key encoding (10,000 cases per property).
//!
//! Components are drawn from an alphabet rich in the characters that break
//! naive encodings (`:`, `*`, `?`, `[`, `]`, `{`, `}`, `\`, `%`, spaces,
//! newlines, control and non-ASCII characters), so collisions that a naive
//! `join(":")` would produce are common in the inputs.

use proptest::prelude::*;
use raceguard::keys::{Key, MAX_ID_LEN, UserId, hash_tag, slot_of};

const CASES: u32 = 10_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Characters chosen to collide under naive encodings, plus arbitrary ones.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(vec![
            ':', '*', '?', '[', ']', '{', '}', '\\', '%', ' ', '\n', '\r', '\t', '\0',
            '\u{7f}', '\u{85}', '\u{a0}', '\u{2028}', 'é', '用', '🦀', 'a', 'B', '0', '-', '_',
        ]),
        1 => any::<char>(),
    ]
}

fn component(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn owner_id() -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 1..24).prop_map(|v| v.into_iter().collect())
}

fn namespace() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,12}"
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Components {
    namespace: String,
    owner: Option<String>,
    parts: Vec<String>,
}

fn components() -> impl Strategy<Value = Components> {
    components_with_parts(0..5)
}

fn components_with_parts(n: std::ops::Range<usize>) -> impl Strategy<Value = Components> {
    (
        namespace(),
        prop::option::of(owner_id()),
        prop::collection::vec(component(12), n),
    )
        .prop_map(|(namespace, owner, parts)| Components {
            namespace,
            owner,
            parts,
        })
}

fn build(c: &Components) -> Key {
    let mut b = Key::builder(&c.namespace).expect("valid namespace");
    if let Some(o) = &c.owner {
        b = b.owner(&UserId::new(o).expect("valid owner"));
    }
    b.parts(c.parts.iter()).build().expect("short key")
}

/// The characters that must never appear unescaped in an encoded component.
fn is_forbidden_raw(c: char) -> bool {
    matches!(c, ':' | '*' | '?' | '[' | ']' | '\\' | '{' | '}')
        || c.is_control()
        || c.is_whitespace()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn round_trip(c in components()) {
        let key = build(&c);
        let d = Key::decode(key.as_str()).expect("every built key decodes");
        prop_assert_eq!(&d.namespace, &c.namespace);
        prop_assert_eq!(&d.owner, &c.owner);
        prop_assert_eq!(&d.parts, &c.parts);
    }

    #[test]
    fn injective(a in components(), b in components()) {
        let (ka, kb) = (build(&a), build(&b));
        prop_assert_eq!(ka == kb, a == b, "{:?} vs {:?} -> {} / {}", a, b, ka, kb);
    }

    #[test]
    fn injective_on_near_misses(a in components_with_parts(1..5), split in any::<prop::sample::Index>()) {
        // Put a separator inside a part: the naive `join(":")` of the two
        // lists can coincide, the escaped encodings must differ.
        let i = split.index(a.parts.len());
        let whole = a.parts[i].clone();
        let mid = whole.char_indices().nth(whole.chars().count() / 2).map_or(whole.len(), |(at, _)| at);
        let (l, r) = whole.split_at(mid);
        let mut a = a.clone();
        a.parts.splice(i..=i, [l.to_owned(), r.to_owned()]);
        let mut b = a.clone();
        b.parts.splice(i..=i + 1, [format!("{l}:{r}")]);
        prop_assert_eq!(a.parts.join(":"), b.parts.join(":"), "naive encodings coincide");
        prop_assert_ne!(build(&a), build(&b));
    }

    #[test]
    fn no_unescaped_metacharacter_in_any_component(c in components()) {
        let key = build(&c);
        let s = key.as_str();
        let mut comps = s.split(':');
        comps.next(); // the namespace, validated separately
        for (i, comp) in comps.enumerate() {
            let body = if i == 0 && c.owner.is_some() {
                comp.strip_prefix('{').and_then(|x| x.strip_suffix('}')).expect("owner tag")
            } else {
                comp
            };
            prop_assert!(!body.chars().any(is_forbidden_raw), "raw metacharacter in {:?} of {}", body, s);
            // Every '%' starts a well-formed escape.
            let bytes = body.as_bytes();
            for (j, &b) in bytes.iter().enumerate() {
                if b == b'%' {
                    let hex = bytes.get(j + 1..j + 3).unwrap_or(&[]);
                    prop_assert!(hex.len() == 2 && hex.iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)), "bad escape in {}", s);
                }
            }
        }
        // Braces appear only as the owner's tag, and only when there is an owner.
        let braces = s.chars().filter(|&ch| ch == '{' || ch == '}').count();
        prop_assert_eq!(braces, if c.owner.is_some() { 2 } else { 0 });
        // No glob metacharacter anywhere in the key.
        prop_assert!(!s.contains(['*', '?', '[', ']', '\\']));
    }

    #[test]
    fn all_keys_of_one_owner_share_a_slot(
        owner in owner_id(),
        ns1 in namespace(), ns2 in namespace(),
        p1 in prop::collection::vec(component(12), 0..4),
        p2 in prop::collection::vec(component(12), 0..4),
    ) {
        let u = UserId::new(&owner).unwrap();
        let k1 = Key::builder(&ns1).unwrap().owner(&u).parts(p1.iter()).build().unwrap();
        let k2 = Key::builder(&ns2).unwrap().owner(&u).parts(p2.iter()).build().unwrap();
        prop_assert_eq!(k1.slot(), k2.slot());
        // The tag is exactly the escaped owner, whatever the parts contain.
        prop_assert_eq!(hash_tag(k1.as_str().as_bytes()), hash_tag(k2.as_str().as_bytes()));
        let owner_only = Key::builder("x").unwrap().owner(&u).build().unwrap();
        prop_assert_eq!(k1.slot(), owner_only.slot());
        prop_assert_eq!(k1.slot(), slot_of(hash_tag(owner_only.as_str().as_bytes())));
    }

    #[test]
    fn invalid_ids_are_typed_errors(raw in prop_oneof![
        Just(String::new()),
        prop::collection::vec(hostile_char(), MAX_ID_LEN + 1..MAX_ID_LEN + 40).prop_map(|v| v.into_iter().collect::<String>()),
    ]) {
        match UserId::new(&raw) {
            Err(raceguard::Error::InvalidInput { what: "user_id", .. }) => {}
            other => prop_assert!(false, "{:?} gave {:?}", raw, other),
        }
    }

    #[test]
    fn decode_never_panics_and_accepts_only_canonical_keys(s in prop::collection::vec(hostile_char(), 0..40).prop_map(|v| v.into_iter().collect::<String>())) {
        let s = format!("ns:{s}");
        if let Ok(d) = Key::decode(&s) {
            // Anything accepted rebuilds to exactly the same text.
            let mut b = Key::builder(&d.namespace).unwrap();
            if let Some(o) = &d.owner {
                b = b.owner(&UserId::new(o).unwrap());
            }
            let rebuilt = b.parts(d.parts.iter()).build().unwrap();
            prop_assert_eq!(rebuilt.as_str(), s.as_str());
        }
    }
}

#[test]
fn naive_join_collides_where_the_encoding_does_not() {
    // Sanity check that the generators above exercise real collisions.
    let a = ["a:b", "c"];
    let b = ["a", "b:c"];
    assert_eq!(a.join(":"), b.join(":"));
    let ka = Key::builder("n").unwrap().parts(a).build().unwrap();
    let kb = Key::builder("n").unwrap().parts(b).build().unwrap();
    assert_ne!(ka, kb);
}
