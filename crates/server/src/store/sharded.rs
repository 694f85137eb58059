//! PostgreSQL across one or more databases: accounts sharded by a hash of the username.
//!
//! Every node is given the same ordered list of databases (`--database` repeated). An
//! account, its devices and keys, the queue addressed to it and the receipts waiting for
//! it live in the database [`placement`](super::placement) picks for its username; each
//! database is a [`PgStore`] with its own writer task (group commit) and its own
//! `LISTEN`ing connection for other nodes' wake-ups. With one database this is exactly
//! the unsharded store.
//!
//! Most operations touch one shard, found from a username the caller already has (the
//! connection's own device record, the recipient's name, the sender's name kept in each
//! queue row). Three cross shards:
//!
//! * **Connecting** looks a device up by its Noise key, which says nothing of its
//!   account: all shards are asked at once (one indexed read each, once per connection).
//!   Registering checks the key in the other shards before creating the account in its
//!   own, so a device key belongs to one account.
//! * **A delivery receipt** for a sender in another shard is queued in the sender's shard
//!   *first*, then the message is deleted from the recipient's: a crash in between leaves
//!   the message queued, so it is pushed again, acknowledged again, and its receipt (kept
//!   once per message id) is not repeated unless the sender had already taken it —
//!   clients drop repeated receipts. Never a lost receipt, never a lost message.
//! * **Expiry** deletes old messages in each shard and then queues their `expired`
//!   receipts in the senders' shards; a crash between the two loses those notices (the
//!   messages were undeliverable anyway, and the sender still shows ✓ for them).

use std::sync::Arc;

use futures::future::{join_all, try_join_all};

use super::placement::{shard_of, Placement, MAX_SHARDS};
use super::postgres::{ForeignReceipt, PgStore};
use super::*;
use crate::hub::Hub;
use crate::ServerError;

/// Handle to the shards; cheap to clone.
#[derive(Clone)]
pub struct PgShards {
    shards: Arc<[PgStore]>,
}

impl PgShards {
    /// Connects to every database (in the order given: every node must give the same
    /// order), migrates each, and checks or records its place among them.
    pub async fn open(urls: &[String], hub: Arc<Hub>) -> Result<Self, ServerError> {
        if urls.is_empty() || urls.len() > MAX_SHARDS {
            return Err(ServerError::Config(format!(
                "give between 1 and {MAX_SHARDS} PostgreSQL databases, not {}",
                urls.len()
            )));
        }
        let shards = try_join_all(urls.iter().map(|url| PgStore::open(url, hub.clone()))).await?;
        let count = shards.len();
        for (index, shard) in shards.iter().enumerate() {
            shard.claim_shard(Placement { index, count }).await?;
        }
        Ok(Self {
            shards: shards.into(),
        })
    }

    fn count(&self) -> usize {
        self.shards.len()
    }

    /// The shard holding `username`'s account.
    fn home(&self, username: &str) -> &PgStore {
        &self.shards[shard_of(username, self.count())]
    }

    pub async fn close(&self) {
        join_all(self.shards.iter().map(|s| s.close())).await;
    }

    pub async fn device_by_noise_key(
        &self,
        noise_key: &[u8],
    ) -> Result<Option<DeviceRecord>, ServerError> {
        if self.count() == 1 {
            return self.shards[0].device_by_noise_key(noise_key).await;
        }
        let found =
            try_join_all(self.shards.iter().map(|s| s.device_by_noise_key(noise_key))).await?;
        Ok(found.into_iter().flatten().next())
    }

    pub async fn register(
        &self,
        username: &str,
        noise_key: &[u8],
        curve25519: &[u8],
        ed25519: &[u8],
        one_time_keys: &[SignedKey],
        fallback: Option<&SignedKey>,
    ) -> Result<RegisterOutcome, ServerError> {
        let home = shard_of(username, self.count());
        for (index, shard) in self.shards.iter().enumerate() {
            // The home shard checks inside its own transaction.
            if index != home && shard.device_by_noise_key(noise_key).await?.is_some() {
                return Ok(RegisterOutcome::DeviceAlreadyRegistered);
            }
        }
        self.shards[home]
            .register(
                username,
                noise_key,
                curve25519,
                ed25519,
                one_time_keys,
                fallback,
            )
            .await
    }

    pub async fn one_time_key_count(
        &self,
        owner: &str,
        device_id: i64,
    ) -> Result<u32, ServerError> {
        self.home(owner).one_time_key_count(device_id).await
    }

    /// Tells the other nodes (through `owner`'s shard) that a device's keys run low.
    pub async fn keys_low(&self, owner: &str, device_id: i64) -> Result<(), ServerError> {
        self.home(owner).keys_low(device_id).await
    }

    pub async fn upload_keys(
        &self,
        device: &DeviceRecord,
        one_time_keys: &[SignedKey],
        fallback: Option<&SignedKey>,
        max_keys: u32,
    ) -> Result<Option<u32>, ServerError> {
        self.home(&device.username)
            .upload_keys(device.device_id, one_time_keys, fallback, max_keys)
            .await
    }

    pub async fn claim_keys(
        &self,
        username: &str,
        one_time: bool,
    ) -> Result<Option<Vec<DeviceBundle>>, ServerError> {
        self.home(username).claim_keys(username, one_time).await
    }

    /// Written to the recipient's shard; the sender's byte quota there counts what it
    /// has waiting in that shard.
    pub async fn enqueue(
        &self,
        sender: &DeviceRecord,
        recipient: &str,
        message_id: &[u8],
        ciphertexts: &[OutgoingCiphertext],
        limits: EnqueueLimits,
    ) -> Result<EnqueueOutcome, ServerError> {
        self.home(recipient)
            .enqueue(sender, recipient, message_id, ciphertexts, limits)
            .await
    }

    pub async fn pending(
        &self,
        device: &DeviceRecord,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedEnvelope>, ServerError> {
        self.home(&device.username)
            .pending(device.device_id, after_seq, limit)
            .await
    }

    /// See the module documentation for the order of the two writes across shards.
    pub async fn ack_message(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<Option<i64>, ServerError> {
        let home_index = shard_of(&device.username, self.count());
        let home = &self.shards[home_index];
        if self.count() == 1 {
            return home.ack_message(device, message_id).await;
        }
        let Some((sender_device, sender)) =
            home.queued_sender(device.device_id, message_id).await?
        else {
            return Ok(None);
        };
        let sender_index = shard_of(&sender, self.count());
        if sender_index == home_index {
            return home.ack_message(device, message_id).await;
        }
        let receipt = ForeignReceipt {
            sender,
            sender_device,
            message_id: message_id.to_vec(),
            recipient: device.username.clone(),
            expired: false,
        };
        let woken = self.shards[sender_index]
            .queue_receipts(vec![receipt])
            .await?;
        home.delete_delivered(device.device_id, message_id).await?;
        Ok((!woken.is_empty()).then_some(sender_device))
    }

    pub async fn pending_receipts(
        &self,
        device: &DeviceRecord,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedReceipt>, ServerError> {
        self.home(&device.username)
            .pending_receipts(device.device_id, after_seq, limit)
            .await
    }

    pub async fn ack_receipt(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<(), ServerError> {
        self.home(&device.username)
            .ack_receipt(device.device_id, message_id)
            .await
    }

    /// Expires up to `limit` messages in each shard; returns the sender devices to wake.
    pub async fn expire(&self, before_ms: u64, limit: u32) -> Result<Vec<i64>, ServerError> {
        let count = self.count();
        let mut wake = Vec::new();
        let mut foreign: Vec<Vec<ForeignReceipt>> = vec![Vec::new(); count];
        for (index, shard) in self.shards.iter().enumerate() {
            let (local, elsewhere) = shard
                .expire(before_ms, limit, Placement { index, count })
                .await?;
            wake.extend(local);
            for r in elsewhere {
                foreign[shard_of(&r.sender, count)].push(r);
            }
        }
        for (shard, receipts) in self.shards.iter().zip(foreign) {
            if !receipts.is_empty() {
                wake.extend(shard.queue_receipts(receipts).await?);
            }
        }
        Ok(wake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_test_kit::postgres::Postgres;

    async fn open(urls: &[String]) -> Result<PgShards, ServerError> {
        PgShards::open(urls, Arc::new(Hub::default())).await
    }

    async fn register(s: &PgShards, name: &str, noise: u8) -> RegisterOutcome {
        s.register(name, &[noise; 32], &[1; 32], &[2; 32], &[], None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn shards_know_their_place_and_refuse_another_order_or_count() {
        let pg = Postgres::shared();
        let (a, b) = (pg.fresh_database(), pg.fresh_database());
        let s = open(&[a.clone(), b.clone()]).await.unwrap();
        // alice lives in shard 1, bob in shard 0 (placement tests): ids of shard 1 start
        // at 1 << 48, so they never collide with shard 0's.
        let RegisterOutcome::Registered(alice) = register(&s, "alice", 1).await else {
            panic!("alice registers");
        };
        let RegisterOutcome::Registered(bob) = register(&s, "bob", 2).await else {
            panic!("bob registers");
        };
        assert!(alice.device_id > 1 << 48 && alice.account_id > 1 << 48);
        assert!(bob.device_id < 1 << 48);
        // A device key belongs to one account, whichever shard the new name falls in.
        assert!(matches!(
            register(&s, "carol", 1).await,
            RegisterOutcome::DeviceAlreadyRegistered
        ));
        assert_eq!(
            s.device_by_noise_key(&[1; 32]).await.unwrap(),
            Some(alice.clone())
        );
        s.close().await;

        let swapped = open(&[b.clone(), a.clone()])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(swapped.contains("same order"), "{swapped}");
        let fewer = open(std::slice::from_ref(&a))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(fewer.contains("set up as 2 shard(s)"), "{fewer}");
        let more = open(&[a.clone(), b.clone(), pg.fresh_database()])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(more.contains("Resharding"), "{more}");
        // The right list still opens, and nothing was lost.
        let s = open(&[a, b]).await.unwrap();
        assert_eq!(s.device_by_noise_key(&[2; 32]).await.unwrap(), Some(bob));
    }

    #[tokio::test]
    async fn an_unsharded_database_with_accounts_is_not_silently_split() {
        let pg = Postgres::shared();
        let a = pg.fresh_database();
        let s = open(std::slice::from_ref(&a)).await.unwrap();
        assert!(matches!(
            register(&s, "alice", 1).await,
            RegisterOutcome::Registered(_)
        ));
        s.close().await;
        // Its record says one shard; a database that predates the record is refused too.
        let e = open(&[a.clone(), pg.fresh_database()]).await.err().unwrap();
        assert!(e.to_string().contains("Resharding"), "{e}");
        let old = pg.fresh_database();
        let s = open(std::slice::from_ref(&old)).await.unwrap();
        register(&s, "bob", 2).await;
        s.close().await;
        let pool = sqlx::PgPool::connect(&old).await.unwrap();
        sqlx::query("DELETE FROM shard")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let e = open(&[old, pg.fresh_database()]).await.err().unwrap();
        assert!(e.to_string().contains("already holds accounts"), "{e}");
    }

    /// docs/server.md gives the placement as SQL for resharding by hand: it must agree.
    #[tokio::test]
    async fn the_documented_sql_places_accounts_like_the_server() {
        let url = Postgres::shared().fresh_database();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        for name in ["alice", "bob", "carol", "zoë", "u_1234567890"] {
            for count in [2i64, 3, 7, 256] {
                let sql: i64 = sqlx::query_scalar(
                    "SELECT ('x' || substr(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 1, 8))
                            ::bit(32)::bigint % $2",
                )
                .bind(name)
                .bind(count)
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(
                    sql as usize,
                    shard_of(name, count as usize),
                    "{name} of {count}"
                );
            }
        }
    }
}
