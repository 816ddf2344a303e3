//! Consistent hashing: a ring of virtual nodes, weighted.
//!
//! Each backend puts `weight × VNODES_PER_WEIGHT` points on a 64-bit ring,
//! at hashes of its *name* (so every sluice instance, and every restart,
//! builds the same ring). A key goes to the first point at or after its
//! hash whose backend may take it; a backend that leaves only moves the
//! keys that were on its own points, about 1/n of them.

/// Points per unit of weight: enough to keep shares within a few percent.
pub const VNODES_PER_WEIGHT: u32 = 160;

/// FNV-1a, then a SplitMix64 finalizer for even spread: stable across
/// builds and platforms (unlike std's hasher), which a shared view needs.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The ring.
#[derive(Debug, Clone)]
pub struct Ring {
    /// (hash, backend index), sorted by hash.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring over backends given as (name, weight), in pool order.
    pub fn new(backends: &[(&str, u32)]) -> Self {
        let mut points = Vec::new();
        for (i, (name, weight)) in backends.iter().enumerate() {
            for v in 0..weight * VNODES_PER_WEIGHT {
                points.push((hash64(format!("{name}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The backend for `key`: the first eligible one clockwise from it.
    pub fn pick(&self, key: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let start = self.points.partition_point(|&(h, _)| h < key);
        (0..n)
            .map(|step| self.points[(start + step) % n].1 as usize)
            .find(|&b| eligible(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(ring: &Ring, keys: u32, eligible: impl Fn(usize) -> bool + Copy) -> Vec<usize> {
        (0..keys)
            .map(|k| {
                ring.pick(hash64(format!("user-{k}").as_bytes()), eligible)
                    .expect("a backend")
            })
            .collect()
    }

    #[test]
    fn removing_one_of_five_moves_only_its_keys_and_adding_it_back_restores_them() {
        let names = ["a", "b", "c", "d", "e"];
        let ring = Ring::new(&names.map(|n| (n, 1)));
        let before = owners(&ring, 10_000, |_| true);
        let without_c = owners(&ring, 10_000, |b| b != 2);
        let moved = before
            .iter()
            .zip(&without_c)
            .filter(|(x, y)| x != y)
            .count();
        assert!(moved <= 2_500, "{moved} of 10,000 keys moved");
        assert!(
            before
                .iter()
                .zip(&without_c)
                .all(|(x, y)| x == y || *x == 2),
            "only c's keys move"
        );
        assert_eq!(
            owners(&ring, 10_000, |_| true),
            before,
            "adding it back restores them"
        );
        println!(
            "removing 1 of 5 backends remapped {moved} of 10,000 keys ({:.1} %)",
            moved as f64 / 100.0
        );
    }

    #[test]
    fn shares_follow_weights() {
        let ring = Ring::new(&[("a", 1), ("b", 1), ("c", 2)]);
        let o = owners(&ring, 40_000, |_| true);
        let count = |b| o.iter().filter(|&&x| x == b).count() as f64 / 40_000.0;
        assert!((count(0) - 0.25).abs() < 0.04, "{}", count(0));
        assert!((count(2) - 0.5).abs() < 0.04, "{}", count(2));
    }

    #[test]
    fn the_hash_is_stable() {
        // Fixed values: every instance and every release must agree.
        assert_eq!(hash64(b"user-42"), 0x7a15_96f0_e94b_5793);
        assert_eq!(hash64(b""), 0xf52a_15e9_a9b5_e89b);
    }
}
