//! Which PostgreSQL database (shard) holds an account.
//!
//! An account, its devices and keys, the queue addressed to its devices and the receipts
//! waiting for them all live in one shard, chosen by a hash of the username:
//!
//! ```text
//! shard = (first 4 bytes of SHA-256(username), big-endian) mod shard_count
//! ```
//!
//! The same value is computable in SQL, which the resharding procedure in docs/server.md
//! relies on:
//!
//! ```sql
//! ('x' || substr(encode(sha256(convert_to(username, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint % shard_count
//! ```
//!
//! Usernames rather than device ids route every operation, so device ids need only be
//! unique across shards (each shard's sequences start at `shard_index << 48`), and an
//! account moved to another shard keeps its ids.

use sha2::{Digest, Sha256};

/// Most databases one service may be sharded across.
pub const MAX_SHARDS: usize = 256;

/// Where a database sits in the ordered list every node is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub index: usize,
    pub count: usize,
}

impl Placement {
    /// The only database of an unsharded service.
    pub const SINGLE: Placement = Placement { index: 0, count: 1 };

    /// Whether `username`'s account lives in this database.
    pub fn holds(&self, username: &str) -> bool {
        shard_of(username, self.count) == self.index
    }

    /// The first account and device id this shard hands out: ids stay unique across
    /// shards, and shard 0's are those of an unsharded database.
    pub fn first_id(&self) -> i64 {
        ((self.index as i64) << 48) + 1
    }
}

/// The shard (0-based) that holds `username`'s account among `count` databases.
pub fn shard_of(username: &str, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let digest = Sha256::digest(username.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (head as usize) % count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_database_holds_everyone() {
        assert_eq!(shard_of("alice", 1), 0);
        assert!(Placement::SINGLE.holds("anyone"));
        assert_eq!(Placement::SINGLE.first_id(), 1);
    }

    #[test]
    fn accounts_spread_evenly_and_stay_put() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("user{i}"), 4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
        // The placement is part of the stored data: it must never change between releases.
        // SHA-256("alice") = 2bd806c9…, SHA-256("bob") = 81b637d8…
        assert_eq!(shard_of("alice", 1000), 0x2bd806c9 % 1000);
        assert_eq!(shard_of("bob", 1000), 0x81b637d8 % 1000);
    }

    #[test]
    fn shard_ids_do_not_overlap() {
        let p = |index| Placement {
            index,
            count: MAX_SHARDS,
        };
        assert_eq!(p(1).first_id(), (1 << 48) + 1);
        assert!(p(MAX_SHARDS - 1).first_id() < i64::MAX / 2);
    }
}
