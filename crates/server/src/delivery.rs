//! What is delivered to a device: the envelopes queued for it and the receipts for what it
//! sent. The store keeps them; the hub may carry them from the store's writer straight to
//! the device's connections (see `hub::Mailbox`).

/// A queued envelope waiting for its recipient device.
#[derive(Debug, Clone)]
pub struct QueuedEnvelope {
    pub seq: i64,
    pub message_id: Vec<u8>,
    pub sender: String,
    pub sender_device: i64,
    pub server_time_ms: u64,
    pub olm_type: u32,
    pub ciphertext: Vec<u8>,
}

/// A delivery receipt waiting for the sending device.
#[derive(Debug, Clone)]
pub struct QueuedReceipt {
    pub seq: i64,
    pub message_id: Vec<u8>,
    pub recipient: String,
    pub server_time_ms: u64,
    /// The message was deleted undelivered (queue time-to-live), not delivered.
    pub expired: bool,
}
