//! `Key::slot` against a real Redis Cluster's `CLUSTER KEYSLOT`, and every
//! key of one owner landing on one node.
#![cfg(feature = "test-util")]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use raceguard::keys::{Key, UserId};
use raceguard::testing::RedisCluster;

fn hostile_id() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(vec![':', '*', '{', '}', '\\', ' ', '\n', '%', 'é', 'a', 'Z', '7']),
            1 => any::<char>(),
        ],
        1..20,
    )
    .prop_map(|v| v.into_iter().collect())
}

#[test]
fn key_slots_match_cluster_keyslot_and_owners_stay_on_one_node() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                hostile_id(),
                prop::collection::vec(hostile_id(), 0..4),
                prop::collection::vec(hostile_id(), 0..4),
            ),
            |(owner, parts_a, parts_b)| {
                let u = UserId::new(&owner).unwrap();
                let a = Key::builder("a")
                    .unwrap()
                    .owner(&u)
                    .parts(parts_a.iter())
                    .build()
                    .unwrap();
                let b = Key::builder("b")
                    .unwrap()
                    .owner(&u)
                    .parts(parts_b.iter())
                    .build()
                    .unwrap();
                let server_slot = cluster.key_slot(a.as_str()).unwrap();
                prop_assert_eq!(a.slot(), server_slot, "key {}", a);
                prop_assert_eq!(b.slot(), cluster.key_slot(b.as_str()).unwrap(), "key {}", b);
                prop_assert_eq!(a.slot(), b.slot());
                // Ownerless keys hash whole; still exactly as Redis computes.
                let bare = Key::builder("c")
                    .unwrap()
                    .parts(parts_a.iter())
                    .build()
                    .unwrap();
                prop_assert_eq!(bare.slot(), cluster.key_slot(bare.as_str()).unwrap());
                Ok(())
            },
        )
        .unwrap();

    // A user's keys can be used together in one MULTI/EXEC on the cluster
    // (no CROSSSLOT), whatever the user id contains.
    let client = cluster.client();
    let mut conn = client.get_connection().unwrap();
    let u = UserId::new("*}:{evil\n").unwrap();
    let k1 = Key::builder("chat")
        .unwrap()
        .owner(&u)
        .part("history")
        .build()
        .unwrap();
    let k2 = Key::builder("chat")
        .unwrap()
        .owner(&u)
        .part("version")
        .build()
        .unwrap();
    let node = cluster.node_for_key(k1.as_str()).unwrap();
    let mut direct = node.connection().unwrap();
    let (): () = redis::pipe()
        .atomic()
        .set(k1.as_str(), "h")
        .incr(k2.as_str(), 1)
        .query(&mut direct)
        .unwrap();
    // A multi-key command through the cluster client: a CROSSSLOT error if
    // the two keys were in different slots.
    let got: (String, i64) = redis::cmd("MGET")
        .arg(k1.as_str())
        .arg(k2.as_str())
        .query(&mut conn)
        .unwrap();
    assert_eq!(got, ("h".to_owned(), 1));
}
