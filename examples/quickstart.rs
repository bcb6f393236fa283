//! A short tour of raceguard on in-memory backends.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Each section shows one primitive and the race it removes (see
//! `docs/RACES.md`). Nothing here needs a server.

use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};
use raceguard::keys::{Key, UserId};

fn main() -> Result<(), raceguard::Error> {
    keys()?;
    clocks();
    println!("\nquickstart: all sections ran");
    Ok(())
}

/// Keys: user-supplied ids can never form a pattern or reach another user's keys.
fn keys() -> Result<(), raceguard::Error> {
    println!("== keys: ids from requests are escaped, owners pin the cluster slot");
    let alice = UserId::new("alice")?;
    let mallory = UserId::new("*}:{alice")?; // an attempt to forge a pattern and a hash tag

    let a = Key::builder("chat")?
        .owner(&alice)
        .part("history")
        .part(50u32)
        .build()?;
    let m = Key::builder("chat")?
        .owner(&mallory)
        .part("history")
        .part(50u32)
        .build()?;
    println!("  alice   -> {a}  (slot {})", a.slot());
    println!("  mallory -> {m}  (slot {})", m.slot());
    assert_ne!(a, m);

    // Every key decodes back to exactly what built it.
    let decoded = Key::decode(m.as_str())?;
    assert_eq!(decoded.owner.as_deref(), Some("*}:{alice"));
    println!(
        "  decoded mallory's owner back: {:?}",
        decoded.owner.unwrap()
    );

    // Bad input is a typed error, never a panic or a corrupted key.
    match UserId::new("") {
        Err(e) => println!("  rejected an empty user id: {e}"),
        Ok(_) => unreachable!("empty ids are invalid"),
    }
    Ok(())
}

/// Clocks: primitives take a clock, so tests move time by hand instead of sleeping.
fn clocks() {
    println!("== clocks: ManualClock for tests, SystemClock in production");
    let clock = ManualClock::new();
    clock.advance(Duration::from_millis(1500));
    println!("  manual clock after advance(1.5s): {:?}", clock.now());
}
