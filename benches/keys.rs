//! Key encoding cost against the naive `format!` that the seeds used.
//!
//! `cargo bench --bench keys`
//!
//! - `key_build/{raceguard,format}`: a typical key (namespace, user owner,
//!   two parts) from ids that need no escaping: the common case.
//! - `key_build_hostile/{raceguard,format}`: ids full of metacharacters; the
//!   naive version produces corrupt keys, raceguard escapes them.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use raceguard::keys::{Key, UserId};

fn bench_keys(c: &mut Criterion) {
    for (group, id) in [
        ("key_build", "user-1234567"),
        ("key_build_hostile", "us*r:{12}\n34"),
    ] {
        let user = UserId::new(id).unwrap();
        let mut g = c.benchmark_group(group);
        g.bench_function("raceguard", |b| {
            b.iter(|| {
                Key::builder(black_box("chat"))
                    .unwrap()
                    .owner(black_box(&user))
                    .part(black_box("history"))
                    .part(black_box(50u32))
                    .build()
                    .unwrap()
            })
        });
        g.bench_function("format", |b| {
            b.iter(|| format!("chat:{}:history:{}", black_box(id), black_box(50u32)))
        });
        g.finish();
    }
}

criterion_group!(benches, bench_keys);
criterion_main!(benches);
