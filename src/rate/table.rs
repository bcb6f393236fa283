//! The per-shard table of a keyed limiter: an open-addressing hash map from
//! key to TAT, single-threaded (the shard's lock protects it).
//!
//! - Linear probing; the home slot is `hash × capacity >> 64`, so the
//!   capacity need not be a power of two and grows by 1.5× instead of 2×.
//! - A slot is `Option<Entry<K>>`; the TAT is a `NonZeroU64`, whose niche
//!   holds the `None`, so a slot for a `u64` key is 16 bytes with no control
//!   byte. A TAT of 0 would mean "full", the same as absent, so it is never
//!   stored.
//! - Load stays in `[0.2, 0.85]` (except an empty table, which holds no
//!   memory): grow past 0.85, shrink below 0.2, both to about 0.67 by
//!   rebuilding (growth by 1.27x, so memory stays between 18.8 and 24 bytes
//!   per `u64` key at any size, where power-of-two tables swing by 2x).
//! - Deletion shifts the following cluster back, so there are no tombstones
//!   and a lookup stops at the first empty slot.
//! - An entry whose TAT is at or before `now` is **expired**: it decides
//!   exactly like an absent key, so any operation may drop it. Rebuilds drop
//!   every expired entry; `sweep` visits a bounded number of slots from a
//!   cursor that walks the table round and round.

use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU64;

/// The smallest non-empty capacity.
pub(crate) const MIN_CAPACITY: usize = 8;

#[derive(Debug)]
pub(crate) struct Entry<K> {
    pub(crate) key: K,
    pub(crate) tat: NonZeroU64,
}

#[derive(Debug)]
pub(crate) struct Table<K> {
    slots: Box<[Option<Entry<K>>]>,
    len: usize,
    cursor: usize,
}

#[inline]
fn home(hash: u64, cap: usize) -> usize {
    ((u128::from(hash) * cap as u128) >> 64) as usize
}

/// The capacity for `live` entries right after a rebuild: load about 0.67.
fn target_capacity(live: usize) -> usize {
    if live == 0 {
        0
    } else {
        (live.saturating_mul(3) / 2 + 1).max(MIN_CAPACITY)
    }
}

/// Whether `len` entries exceed the maximum load (0.85) of `cap` slots.
#[inline]
fn over_max_load(len: usize, cap: usize) -> bool {
    len.saturating_mul(20) > cap.saturating_mul(17)
}

impl<K: Hash + Eq> Table<K> {
    pub(crate) fn new() -> Self {
        Table {
            slots: Box::new([]),
            len: 0,
            cursor: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The slot holding `key`.
    #[inline]
    pub(crate) fn find(&self, hash: u64, key: &K) -> Option<usize> {
        let cap = self.slots.len();
        if self.len == 0 {
            return None;
        }
        let mut i = home(hash, cap);
        loop {
            match &self.slots[i] {
                None => return None,
                Some(e) if e.key == *key => return Some(i),
                Some(_) => {
                    i += 1;
                    if i == cap {
                        i = 0;
                    }
                }
            }
        }
    }

    #[inline]
    pub(crate) fn tat(&self, slot: usize) -> u64 {
        self.slots[slot].as_ref().map_or(0, |e| e.tat.get())
    }

    #[inline]
    pub(crate) fn set_tat(&mut self, slot: usize, tat: NonZeroU64) {
        if let Some(e) = &mut self.slots[slot] {
            e.tat = tat;
        }
    }

    /// Inserts a key known to be absent. Returns how many expired entries a
    /// growth rebuild dropped.
    pub(crate) fn insert<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: K,
        tat: NonZeroU64,
        now: u64,
        hasher: &S,
    ) -> usize {
        let mut dropped = 0;
        if over_max_load(self.len + 1, self.slots.len()) {
            dropped = self.rebuild(1, now, hasher);
        }
        self.place(hash, Entry { key, tat });
        self.len += 1;
        dropped
    }

    fn place(&mut self, hash: u64, entry: Entry<K>) {
        let cap = self.slots.len();
        let mut i = home(hash, cap);
        while self.slots[i].is_some() {
            i += 1;
            if i == cap {
                i = 0;
            }
        }
        self.slots[i] = Some(entry);
    }

    /// Rebuilds with room for the live entries plus `extra`, dropping
    /// expired ones; returns how many were dropped.
    fn rebuild<S: BuildHasher>(&mut self, extra: usize, now: u64, hasher: &S) -> usize {
        let old = std::mem::take(&mut self.slots);
        let live = old.iter().flatten().filter(|e| e.tat.get() > now).count();
        let dropped = self.len - live;
        let cap = target_capacity(live + extra);
        let mut slots = Vec::with_capacity(cap);
        slots.resize_with(cap, || None);
        self.slots = slots.into_boxed_slice();
        self.len = live;
        self.cursor = 0;
        for e in old.into_vec().into_iter().flatten() {
            if e.tat.get() > now {
                self.place(hasher.hash_one(&e.key), e);
            }
        }
        dropped
    }

    /// Removes the entry in `slot`, shifting its cluster back.
    fn remove_at<S: BuildHasher>(&mut self, slot: usize, hasher: &S) {
        let cap = self.slots.len();
        self.slots[slot] = None;
        self.len -= 1;
        let mut hole = slot;
        let mut j = slot;
        loop {
            j += 1;
            if j == cap {
                j = 0;
            }
            let Some(e) = &self.slots[j] else {
                break;
            };
            let h = home(hasher.hash_one(&e.key), cap);
            // The entry may move into the hole unless its home lies in the
            // cyclic range (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j].take();
                hole = j;
            }
        }
    }

    /// Visits up to `budget` slots from the cursor, removing expired
    /// entries, then shrinks if the load fell below 0.2. Returns how many
    /// entries left the table.
    pub(crate) fn sweep<S: BuildHasher>(&mut self, now: u64, budget: usize, hasher: &S) -> usize {
        let cap = self.slots.len();
        if self.len == 0 {
            return self.maybe_shrink(now, hasher);
        }
        let mut removed = 0;
        let mut cursor = self.cursor % cap;
        for _ in 0..budget {
            let expired = matches!(&self.slots[cursor], Some(e) if e.tat.get() <= now);
            if expired {
                // Look at the same slot again: the cluster shifted into it.
                self.remove_at(cursor, hasher);
                removed += 1;
                if self.len == 0 {
                    break;
                }
            } else {
                cursor += 1;
                if cursor == cap {
                    cursor = 0;
                }
            }
        }
        self.cursor = cursor;
        removed + self.maybe_shrink(now, hasher)
    }

    fn maybe_shrink<S: BuildHasher>(&mut self, now: u64, hasher: &S) -> usize {
        let cap = self.slots.len();
        if self.len == 0 && cap > 0 {
            self.slots = Box::new([]);
            self.cursor = 0;
            0
        } else if cap > MIN_CAPACITY && self.len.saturating_mul(5) < cap {
            self.rebuild(0, now, hasher)
        } else {
            0
        }
    }

    /// Drops every expired entry (and resizes to fit); returns how many.
    pub(crate) fn evict_expired<S: BuildHasher>(&mut self, now: u64, hasher: &S) -> usize {
        let expired = self
            .slots
            .iter()
            .flatten()
            .filter(|e| e.tat.get() <= now)
            .count();
        if expired > 0 {
            self.rebuild(0, now, hasher)
        } else {
            self.maybe_shrink(now, hasher)
        }
    }

    /// Every entry, in slot order (tests and debugging).
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        self.slots.iter().flatten().map(|e| (&e.key, e.tat.get()))
    }
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::hash::BuildHasherDefault;

    /// A deliberately bad hasher (few distinct homes) to force long clusters
    /// and wrap-around.
    #[derive(Default)]
    struct Clumpy(u64);
    impl std::hash::Hasher for Clumpy {
        fn finish(&self) -> u64 {
            (self.0 % 3).wrapping_mul(0x5555_5555_5555_5555)
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = self.0.wrapping_mul(31).wrapping_add(u64::from(*b));
            }
        }
    }

    #[test]
    fn slot_for_u64_key_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Option<Entry<u64>>>(), 16);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u64),
        Sweep(u64, usize),
        Evict(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), 1..100u64).prop_map(|(k, t)| Op::Set(k % 64, t)),
            2 => (0..100u64, 0..40usize).prop_map(|(n, b)| Op::Sweep(n, b)),
            1 => (0..100u64).prop_map(Op::Evict),
        ]
    }

    fn run<S: BuildHasher>(ops: &[Op], hasher: &S) {
        let mut t: Table<u64> = Table::new();
        // Model: key -> tat; removing an expired entry is always allowed,
        // so the model tracks which keys the table may have dropped.
        let mut model: HashMap<u64, u64> = HashMap::new();
        for op in ops {
            match *op {
                Op::Set(k, tat) => {
                    let k = u64::from(k);
                    let h = hasher.hash_one(k);
                    let tat = NonZeroU64::new(tat).unwrap();
                    match t.find(h, &k) {
                        Some(i) => t.set_tat(i, tat),
                        None => {
                            // Rebuild drops entries expired at "now" = 0: none.
                            assert_eq!(t.insert(h, k, tat, 0, hasher), 0);
                        }
                    }
                    model.insert(k, tat.get());
                }
                Op::Sweep(now, budget) => {
                    let before = t.len();
                    let removed = t.sweep(now, budget, hasher);
                    assert_eq!(before - removed, t.len());
                    model.retain(|k, tat| *tat > now || t.find(hasher.hash_one(*k), k).is_some());
                }
                Op::Evict(now) => {
                    let removed = t.evict_expired(now, hasher);
                    let expired = model.values().filter(|&&v| v <= now).count();
                    assert_eq!(removed, expired);
                    model.retain(|_, tat| *tat > now);
                }
            }
            // Same contents, every key findable, load bounds hold.
            assert_eq!(t.len(), model.len());
            for (k, tat) in &model {
                let i = t.find(hasher.hash_one(*k), k).expect("key lost");
                assert_eq!(t.tat(i), *tat);
            }
            assert_eq!(t.iter().count(), t.len());
            if t.capacity() > 0 {
                assert!(!over_max_load(t.len(), t.capacity()), "load above 0.85");
            } else {
                assert_eq!(t.len(), 0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn table_matches_a_hashmap(ops in prop::collection::vec(op(), 0..300)) {
            run(&ops, &std::hash::RandomState::new());
        }

        #[test]
        fn table_matches_a_hashmap_under_collisions(ops in prop::collection::vec(op(), 0..300)) {
            run(&ops, &BuildHasherDefault::<Clumpy>::default());
        }
    }

    #[test]
    fn empties_back_to_no_memory() {
        let hasher = std::hash::RandomState::new();
        let mut t: Table<u64> = Table::new();
        for k in 0..10_000u64 {
            t.insert(
                hasher.hash_one(k),
                k,
                NonZeroU64::new(5).unwrap(),
                0,
                &hasher,
            );
        }
        assert!(t.capacity() >= 10_000 * 20 / 17);
        let mut removed = 0;
        while t.len() > 0 {
            removed += t.sweep(5, 64, &hasher);
        }
        assert_eq!(removed, 10_000);
        assert_eq!(t.capacity(), 0, "an empty table holds no slots");
    }
}
