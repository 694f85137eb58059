-- The three writes every message makes, as functions: queueing a message, acknowledging it
-- and acknowledging its receipt each become one round trip to PostgreSQL instead of three to
-- twelve (each statement, and the savepoint around each write, was its own round trip, and
-- the node's writer waited for each; docs/benchmarks.md, issue 16). They do what
-- store/postgres.rs did statement by statement, in the same order. The advisory-lock keys
-- (device * 4 for a queue, device * 4 + 1 for its receipts, account * 4 + 2 for a quota; ids
-- are below 2^57, so keys never collide) and the two steps the rarer writes share with them
-- (postern_queue_receipt, postern_release_bytes) exist only here: store/postgres.rs calls
-- these functions too.
--
-- Each is all or nothing by itself: its body runs in a block with an EXCEPTION clause (a
-- subtransaction inside PostgreSQL), so a failure undoes only this write and is answered, not
-- raised, and the rest of the node's batch goes on without a SAVEPOINT round trip around
-- every write. o_outcome 'contended': a lock it needs is held by another batch (or it lost a
-- deadlock); the node submits it again to a later batch. 'failed': o_error says why.

-- Takes an advisory lock without waiting. When another node's open batch holds it, raises
-- lock_not_available (55P03): the node rolls this write back to its savepoint and submits it
-- again to a later batch (waiting instead deadlocked nodes' batches).
CREATE FUNCTION postern_try_lock(p_key BIGINT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(p_key) THEN
        RAISE EXCEPTION 'advisory lock % is held by another batch', p_key
            USING ERRCODE = 'lock_not_available';
    END IF;
END
$$;

-- Queues one message for every device of p_recipient (p_devices[i] gets p_olm_types[i] and
-- p_bodies[i]); idempotent per message id. o_outcome: 'accepted', 'unknown' (no such user),
-- 'changed' (the ciphertexts do not address exactly the account's devices), 'over_quota',
-- 'queue_full', or 'contended' / 'failed' as above. o_devices: the account's devices,
-- ascending.
CREATE FUNCTION postern_enqueue(
    p_recipient TEXT,
    p_message_id BYTEA,
    p_sender_device BIGINT,
    p_sender_account BIGINT,
    p_sender TEXT,
    p_now BIGINT,
    p_devices BIGINT[],
    p_olm_types BIGINT[],
    p_bodies BYTEA[],
    p_max_queue BIGINT,
    p_max_queued_bytes BIGINT,
    OUT o_outcome TEXT,
    OUT o_devices BIGINT[],
    OUT o_error TEXT
)
LANGUAGE plpgsql AS $$
DECLARE
    v_device BIGINT;
    v_waiting BIGINT;
    v_inserted BIGINT;
BEGIN
    BEGIN
        SELECT COALESCE(array_agg(d.id ORDER BY d.id), '{}')
          INTO o_devices
          FROM devices d JOIN accounts a ON a.id = d.account_id
         WHERE a.username = p_recipient;
        IF cardinality(o_devices) = 0 THEN
            o_outcome := 'unknown';
            RETURN;
        END IF;
        IF cardinality(p_devices) <> cardinality(o_devices)
           OR (SELECT array_agg(x ORDER BY x) FROM (SELECT DISTINCT unnest(p_devices) AS x) s)
              IS DISTINCT FROM o_devices THEN
            o_outcome := 'changed';
            RETURN;
        END IF;
        -- In device order, so two nodes queueing for the same devices never wait on each other.
        FOREACH v_device IN ARRAY o_devices LOOP
            PERFORM postern_try_lock(v_device * 4);
        END LOOP;
        PERFORM postern_try_lock(p_sender_account * 4 + 2);
        -- A retry of a message already queued has its bytes counted already.
        IF NOT EXISTS (SELECT 1 FROM queue
                        WHERE recipient_device = o_devices[1] AND message_id = p_message_id) THEN
            SELECT COALESCE((SELECT bytes FROM queued_bytes WHERE account_id = p_sender_account), 0)
              INTO v_waiting;
            IF GREATEST(v_waiting, 0)
               + (SELECT COALESCE(SUM(octet_length(b)), 0) FROM unnest(p_bodies) AS b)
               > p_max_queued_bytes THEN
                o_outcome := 'over_quota';
                RETURN;
            END IF;
        END IF;
        FOR i IN 1 .. cardinality(p_devices) LOOP
            -- Full when a row exists at position max_queue: reads at most that many index
            -- entries, never the whole queue (COUNT(*) did).
            IF EXISTS (SELECT 1 FROM queue WHERE recipient_device = p_devices[i]
                        ORDER BY seq OFFSET p_max_queue - 1 LIMIT 1) THEN
                o_outcome := 'queue_full';
                RETURN;
            END IF;
            INSERT INTO queue (recipient_device, message_id, sender_device, sender, server_time_ms,
                               olm_type, ciphertext, sender_account)
            VALUES (p_devices[i], p_message_id, p_sender_device, p_sender, p_now,
                    p_olm_types[i], p_bodies[i], p_sender_account)
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS v_inserted = ROW_COUNT;
            IF v_inserted > 0 THEN
                INSERT INTO queued_bytes (account_id, bytes)
                VALUES (p_sender_account, octet_length(p_bodies[i]))
                ON CONFLICT (account_id) DO UPDATE SET bytes = queued_bytes.bytes + excluded.bytes;
            END IF;
        END LOOP;
        o_outcome := 'accepted';
    EXCEPTION
        WHEN lock_not_available OR deadlock_detected THEN
            o_outcome := 'contended';
        WHEN OTHERS THEN
            o_outcome := 'failed';
            o_error := SQLSTATE || ' ' || SQLERRM;
    END;
END
$$;

-- A message of p_bytes sent by p_sender_device left a queue: release it from the sending
-- account's quota. Rows queued before migration 0002 do not name the account (NULL): it is
-- looked up.
CREATE FUNCTION postern_release_bytes(p_account BIGINT, p_sender_device BIGINT, p_bytes BIGINT)
RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    v_account BIGINT := p_account;
BEGIN
    IF v_account IS NULL THEN
        SELECT account_id INTO v_account FROM devices WHERE id = p_sender_device;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    PERFORM postern_try_lock(v_account * 4 + 2);
    UPDATE queued_bytes SET bytes = GREATEST(0, bytes - p_bytes) WHERE account_id = v_account;
END
$$;

-- Queues a receipt (delivered, or p_expired = 1) for p_sender_device, a device of this
-- database, under its receipts' lock; returns whether it is new. The sending device may have
-- been deleted since: then there is no one to tell (false).
CREATE FUNCTION postern_queue_receipt(
    p_sender_device BIGINT,
    p_message_id BYTEA,
    p_recipient TEXT,
    p_now BIGINT,
    p_expired BIGINT
)
RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_queued BIGINT;
BEGIN
    PERFORM postern_try_lock(p_sender_device * 4 + 1);
    INSERT INTO receipts (device_id, message_id, recipient, server_time_ms, expired)
    SELECT id, p_message_id, p_recipient, p_now, p_expired FROM devices WHERE id = p_sender_device
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    RETURN v_queued > 0;
END
$$;

-- The recipient p_device (of account p_recipient) stored the message: delete it, release its
-- bytes and queue a receipt for the sending device. o_outcome 'acked' with o_sender_device,
-- the device to wake; 'nothing' if there was nothing to delete (a repeated acknowledgement)
-- or the sending device is gone; or 'contended' / 'failed' as above. Only for a sender whose
-- account is in this database.
CREATE FUNCTION postern_ack_message(
    p_device BIGINT,
    p_message_id BYTEA,
    p_recipient TEXT,
    p_now BIGINT,
    OUT o_outcome TEXT,
    OUT o_sender_device BIGINT,
    OUT o_error TEXT
)
LANGUAGE plpgsql AS $$
DECLARE
    v_sender_device BIGINT;
    v_bytes BIGINT;
    v_account BIGINT;
BEGIN
    o_outcome := 'nothing';
    BEGIN
        DELETE FROM queue WHERE recipient_device = p_device AND message_id = p_message_id
        RETURNING sender_device, octet_length(ciphertext)::int8, sender_account
             INTO v_sender_device, v_bytes, v_account;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        PERFORM postern_release_bytes(v_account, v_sender_device, v_bytes);
        IF postern_queue_receipt(v_sender_device, p_message_id, p_recipient, p_now, 0) THEN
            o_outcome := 'acked';
            o_sender_device := v_sender_device;
        END IF;
    EXCEPTION
        WHEN lock_not_available OR deadlock_detected THEN
            o_outcome := 'contended';
        WHEN OTHERS THEN
            o_outcome := 'failed';
            o_error := SQLSTATE || ' ' || SQLERRM;
    END;
END
$$;

-- The sending device p_device got the receipt for p_message_id: it leaves the receipts.
-- o_outcome 'done', or 'failed' as above.
CREATE FUNCTION postern_ack_receipt(
    p_device BIGINT,
    p_message_id BYTEA,
    OUT o_outcome TEXT,
    OUT o_error TEXT
)
LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        DELETE FROM receipts WHERE device_id = p_device AND message_id = p_message_id;
        o_outcome := 'done';
    EXCEPTION
        WHEN OTHERS THEN
            o_outcome := 'failed';
            o_error := SQLSTATE || ' ' || SQLERRM;
    END;
END
$$;
