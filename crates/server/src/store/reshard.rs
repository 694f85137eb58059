//! `postern server reshard`: add PostgreSQL databases to a sharded service.
//!
//! Accounts are placed by `hash(username) mod shard_count` ([`placement`](super::placement)),
//! so a new shard count moves some accounts. With every node stopped, [`reshard`] takes
//! the current list of databases and the new one (the current list, in order, with new
//! databases appended), prepares the new databases (schema, their place, their id ranges),
//! and moves each account whose shard changes, with everything that belongs to it: its
//! devices, their one-time and fallback keys, the messages queued for them and the receipts
//! waiting for them. Ids are kept (they are unique across shards), so clients notice nothing.
//!
//! Each account moves in two steps, copy (one transaction on the target, idempotent) then
//! delete (one on the source), so an interrupted run leaves at worst an account in both
//! places, and running the same command again finishes the job. Only when every account
//! is in place is the new count written into the old databases; until then nodes still
//! start with the old list and refuse the new one.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use super::placement::{shard_of, Placement, MAX_SHARDS};
use super::postgres::{claim_shard, APPLICATION_NAME};
use crate::ServerError;

/// What a resharding run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReshardReport {
    pub accounts_moved: u64,
    pub devices_moved: u64,
    pub messages_moved: u64,
    pub receipts_moved: u64,
}

async fn connect(url: &str) -> Result<PgPool, ServerError> {
    let options = PgConnectOptions::from_str(url)?.application_name("postern-reshard");
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?)
}

/// Connections of running nodes to this database. A node that was just stopped may take
/// a moment to disappear from `pg_stat_activity`: wait up to 3 s for them to go.
async fn server_connections(pool: &PgPool) -> Result<i64, ServerError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(APPLICATION_NAME)
        .fetch_one(pool)
        .await?;
        if busy == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(busy);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Moves accounts from the shards `from` to the shards `to` (see the module docs).
pub async fn reshard(from: &[String], to: &[String]) -> Result<ReshardReport, ServerError> {
    if from.is_empty() || to.len() <= from.len() || to.len() > MAX_SHARDS {
        return Err(ServerError::Config(format!(
            "--to must list more databases than --database (and at most {MAX_SHARDS})"
        )));
    }
    if to[..from.len()] != *from {
        return Err(ServerError::Config(
            "--to must start with the --database URLs, in the same order, followed by the \
             new databases (existing shards keep their place)"
                .into(),
        ));
    }
    let (old_count, new_count) = (from.len(), to.len());
    let mut pools = Vec::with_capacity(new_count);
    for url in to {
        pools.push(connect(url).await?);
    }
    // The old databases must be what --database says, and no node may be running.
    for (index, pool) in pools.iter().enumerate() {
        let nth = index + 1;
        let busy = server_connections(pool).await?;
        if busy > 0 {
            return Err(ServerError::Config(format!(
                "database {nth} is in use by {busy} server connection(s): stop every \
                 `postern server run` node first"
            )));
        }
        if index < old_count {
            let place: Option<(i64, i64)> =
                sqlx::query_as("SELECT shard_index, shard_count FROM shard")
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten();
            match place {
                Some((i, c))
                    if i == index as i64 && (c == old_count as i64 || c == new_count as i64) => {}
                Some((i, c)) => {
                    return Err(ServerError::Config(format!(
                        "database {nth} is shard {} of {c}, not {nth} of {old_count}: give \
                         --database exactly as the nodes do",
                        i + 1
                    )))
                }
                None => {
                    return Err(ServerError::Config(format!(
                        "database {nth} has not been used by a postern server yet: start \
                         the service on --database once before resharding"
                    )))
                }
            }
        } else {
            sqlx::migrate!("./migrations-postgres").run(pool).await?;
            claim_shard(
                pool,
                Placement {
                    index,
                    count: new_count,
                },
            )
            .await?;
        }
    }

    let mut report = ReshardReport::default();
    for (index, source) in pools.iter().enumerate().take(old_count) {
        let accounts: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, username FROM accounts ORDER BY id")
                .fetch_all(source)
                .await?;
        for (account_id, username) in accounts {
            let target = shard_of(&username, new_count);
            if target == index {
                continue;
            }
            let moved = copy_account(source, &pools[target], account_id).await?;
            sqlx::query("DELETE FROM accounts WHERE id = $1")
                .bind(account_id)
                .execute(source)
                .await?;
            report.accounts_moved += 1;
            report.devices_moved += moved.devices_moved;
            report.messages_moved += moved.messages_moved;
            report.receipts_moved += moved.receipts_moved;
        }
    }
    for pool in &pools {
        recount_queued_bytes(pool).await?;
    }
    for pool in &pools[..old_count] {
        sqlx::query("UPDATE shard SET shard_count = $1")
            .bind(new_count as i64)
            .execute(pool)
            .await?;
    }
    for pool in pools {
        pool.close().await;
    }
    Ok(report)
}

/// Copies one account with everything that belongs to it; rows already there (from an
/// interrupted run) are left as they are.
async fn copy_account(
    source: &PgPool,
    target: &PgPool,
    account_id: i64,
) -> Result<ReshardReport, ServerError> {
    let mut report = ReshardReport::default();
    let account = sqlx::query("SELECT id, username, created_ms FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_one(source)
        .await?;
    let devices = sqlx::query(
        "SELECT id, account_id, noise_key, curve25519, ed25519, created_ms FROM devices
         WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_all(source)
    .await?;
    let device_ids: Vec<i64> = devices.iter().map(|d| d.get(0)).collect();
    let one_time = sqlx::query(
        "SELECT device_id, public_key, signature FROM one_time_keys
         WHERE device_id = ANY($1) ORDER BY id",
    )
    .bind(&device_ids)
    .fetch_all(source)
    .await?;
    let fallback = sqlx::query(
        "SELECT device_id, public_key, signature FROM fallback_keys WHERE device_id = ANY($1)",
    )
    .bind(&device_ids)
    .fetch_all(source)
    .await?;
    let queue = sqlx::query(
        "SELECT recipient_device, message_id, sender_device, sender, server_time_ms, olm_type,
                ciphertext, sender_account
         FROM queue WHERE recipient_device = ANY($1) ORDER BY seq",
    )
    .bind(&device_ids)
    .fetch_all(source)
    .await?;
    let receipts = sqlx::query(
        "SELECT device_id, message_id, recipient, server_time_ms, expired FROM receipts
         WHERE device_id = ANY($1) ORDER BY seq",
    )
    .bind(&device_ids)
    .fetch_all(source)
    .await?;

    let mut tx = target.begin().await?;
    sqlx::query(
        "INSERT INTO accounts (id, username, created_ms) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(account.get::<i64, _>(0))
    .bind(account.get::<String, _>(1))
    .bind(account.get::<i64, _>(2))
    .execute(&mut *tx)
    .await?;
    for d in &devices {
        sqlx::query(
            "INSERT INTO devices (id, account_id, noise_key, curve25519, ed25519, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(d.get::<i64, _>(0))
        .bind(d.get::<i64, _>(1))
        .bind(d.get::<Vec<u8>, _>(2))
        .bind(d.get::<Vec<u8>, _>(3))
        .bind(d.get::<Vec<u8>, _>(4))
        .bind(d.get::<i64, _>(5))
        .execute(&mut *tx)
        .await?;
        report.devices_moved += 1;
    }
    for (table, keys) in [("one_time_keys", &one_time), ("fallback_keys", &fallback)] {
        for k in keys {
            sqlx::query(&format!(
                "INSERT INTO {table} (device_id, public_key, signature) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(k.get::<i64, _>(0))
            .bind(k.get::<Vec<u8>, _>(1))
            .bind(k.get::<Vec<u8>, _>(2))
            .execute(&mut *tx)
            .await?;
        }
    }
    for q in &queue {
        sqlx::query(
            "INSERT INTO queue (recipient_device, message_id, sender_device, sender,
                                server_time_ms, olm_type, ciphertext, sender_account)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(q.get::<i64, _>(0))
        .bind(q.get::<Vec<u8>, _>(1))
        .bind(q.get::<i64, _>(2))
        .bind(q.get::<String, _>(3))
        .bind(q.get::<i64, _>(4))
        .bind(q.get::<i64, _>(5))
        .bind(q.get::<Vec<u8>, _>(6))
        .bind(q.get::<Option<i64>, _>(7))
        .execute(&mut *tx)
        .await?;
        report.messages_moved += 1;
    }
    for r in &receipts {
        sqlx::query(
            "INSERT INTO receipts (device_id, message_id, recipient, server_time_ms, expired)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(r.get::<i64, _>(0))
        .bind(r.get::<Vec<u8>, _>(1))
        .bind(r.get::<String, _>(2))
        .bind(r.get::<i64, _>(3))
        .bind(r.get::<i64, _>(4))
        .execute(&mut *tx)
        .await?;
        report.receipts_moved += 1;
    }
    tx.commit().await?;
    Ok(report)
}

/// Rebuilds the per-sender byte counts from the messages each shard now holds (rows from
/// before migration 0002 name no sending account and are counted through its device).
async fn recount_queued_bytes(pool: &PgPool) -> Result<(), ServerError> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM queued_bytes")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO queued_bytes (account_id, bytes)
         SELECT account, SUM(octet_length(q.ciphertext))::int8 FROM (
             SELECT COALESCE(q.sender_account, d.account_id) AS account, q.ciphertext
             FROM queue q LEFT JOIN devices d ON d.id = q.sender_device
         ) q WHERE account IS NOT NULL GROUP BY account",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::Hub;
    use crate::store::{EnqueueLimits, EnqueueOutcome, OutgoingCiphertext, RegisterOutcome, Store};
    use postern_test_kit::postgres::Postgres;

    async fn open(urls: &[String]) -> Result<Store, ServerError> {
        Store::open_shards(urls, Arc::new(Hub::default())).await
    }

    const NAMES: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

    /// One database with accounts, queued messages and waiting receipts grows to three:
    /// every account ends up where placement puts it, with the same ids, its keys, its
    /// queue and its receipts; nodes then need the new list.
    #[tokio::test]
    async fn growing_from_one_database_to_three_moves_accounts_with_their_queues() {
        let pg = Postgres::shared();
        let first = pg.fresh_database();
        let s = open(std::slice::from_ref(&first)).await.unwrap();
        let mut devices = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let otk = crate::store::SignedKey {
                public_key: vec![i as u8; 32],
                signature: vec![0; 64],
            };
            let RegisterOutcome::Registered(d) = s
                .register(name, &[i as u8 + 1; 32], &[1; 32], &[2; 32], &[otk], None)
                .await
                .unwrap()
            else {
                panic!("{name} registers");
            };
            devices.push(d);
        }
        let limits = EnqueueLimits {
            max_queue: 100,
            max_queued_bytes: 10_000,
        };
        // Everyone sends one message to the next; the first three are delivered (their
        // receipts wait for the senders), the rest stay queued.
        for i in 0..NAMES.len() {
            let (from, to) = (&devices[i], &devices[(i + 1) % NAMES.len()]);
            let ct = [OutgoingCiphertext {
                device_id: to.device_id,
                olm_type: 1,
                body: vec![i as u8; 100],
            }];
            let out = s
                .enqueue(from, &to.username, &[i as u8; 16], &ct, limits)
                .await
                .unwrap();
            assert!(matches!(out, EnqueueOutcome::Accepted { .. }));
        }
        for i in 0..3 {
            let to = &devices[(i + 1) % NAMES.len()];
            assert!(s.ack_message(to, &[i as u8; 16]).await.unwrap().is_some());
        }
        // A running node blocks resharding.
        let (second, third) = (pg.fresh_database(), pg.fresh_database());
        let to = [first.clone(), second.clone(), third.clone()];
        let busy = reshard(std::slice::from_ref(&first), &to)
            .await
            .unwrap_err();
        assert!(busy.to_string().contains("stop every"), "{busy}");
        s.close().await;
        drop(s);
        // Wrong lists are refused before anything moves.
        let e = reshard(std::slice::from_ref(&second), &to)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("same order"), "{e}");

        let report = reshard(std::slice::from_ref(&first), &to).await.unwrap();
        let expected_moves = NAMES.iter().filter(|n| shard_of(n, 3) != 0).count() as u64;
        assert_eq!(report.accounts_moved, expected_moves);
        assert!(expected_moves >= 2, "the test moves accounts");
        // Running it again (as after an interruption) finds nothing left to move.
        assert_eq!(
            reshard(std::slice::from_ref(&first), &to)
                .await
                .unwrap()
                .accounts_moved,
            0
        );

        assert!(
            open(std::slice::from_ref(&first)).await.is_err(),
            "old list refused"
        );
        let s = open(&to).await.unwrap();
        for (i, d) in devices.iter().enumerate() {
            let found = s.device_by_noise_key(&[i as u8 + 1; 32]).await.unwrap();
            assert_eq!(found.as_ref(), Some(d), "{} keeps its ids", d.username);
            let bundle = s.claim_keys(&d.username, true).await.unwrap().unwrap();
            assert_eq!(
                bundle[0].key.as_ref().unwrap().public_key,
                vec![i as u8; 32]
            );
            let prev = (i + NAMES.len() - 1) % NAMES.len();
            let pending = s.pending(d, 0, 10).await.unwrap();
            if prev < 3 {
                assert!(pending.is_empty(), "{} got message {prev}", d.username);
            } else {
                assert_eq!(pending.len(), 1, "{}'s queue moved", d.username);
                assert_eq!(pending[0].message_id, vec![prev as u8; 16]);
                assert_eq!(pending[0].sender, NAMES[prev]);
            }
            let receipts = s.pending_receipts(d, 0, 10).await.unwrap();
            assert_eq!(
                receipts.len(),
                usize::from(i < 3),
                "{}'s receipts",
                d.username
            );
        }
        // Delivery and receipts keep working across the new shards, quotas included.
        let (dave, erin) = (&devices[3], &devices[4]);
        assert_eq!(
            s.ack_message(erin, &[3; 16]).await.unwrap(),
            Some(dave.device_id)
        );
        assert_eq!(s.pending_receipts(dave, 0, 10).await.unwrap().len(), 1);
        // A new account in a new shard gets ids from that shard's range.
        let newcomer = (0..)
            .map(|k| format!("new{k}"))
            .find(|n| shard_of(n, 3) == 2)
            .unwrap();
        let RegisterOutcome::Registered(d) = s
            .register(&newcomer, &[99; 32], &[1; 32], &[2; 32], &[], None)
            .await
            .unwrap()
        else {
            panic!("registers");
        };
        assert!(d.device_id > 2 << 48);
    }
}
