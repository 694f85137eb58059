//! How much a connection may push before the device acknowledges it.
//!
//! Pushing a whole backlog at once looks fastest, but on a path that a censor freezes after
//! some kilobytes (net4people/bbs issue 490: 15–20 KB) the burst passes the freeze point
//! before the client has acknowledged anything, so its acknowledgements die with the flow
//! and the next connection is sent the same messages again — forever. With a window of
//! unacknowledged bytes smaller than such a freeze, every connection gets at least one
//! window stored and acknowledged: progress is guaranteed. The window then grows with each
//! acknowledged byte (like TCP's slow start, doubling per round trip) up to
//! [`MAX_WINDOW`], so a working path soon runs at full speed.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Unacknowledged envelope bytes a new connection may have in flight.
pub const INITIAL_WINDOW: usize = 4 * 1024;
/// The most a connection may have in flight.
pub const MAX_WINDOW: usize = 512 * 1024;

#[derive(Default)]
struct State {
    /// Message id → bytes, for envelopes pushed and not yet acknowledged.
    in_flight: HashMap<Vec<u8>, usize>,
    bytes: usize,
    window: usize,
}

/// Shared by the connection's pushing loop and its reader task (which applies acks).
pub struct PushWindow {
    state: Mutex<State>,
    freed: Notify,
}

impl Default for PushWindow {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                window: INITIAL_WINDOW,
                ..State::default()
            }),
            freed: Notify::new(),
        }
    }
}

impl PushWindow {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another envelope may be pushed now.
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        s.bytes < s.window
    }

    /// Records an envelope of `size` bytes pushed.
    pub fn pushed(&self, message_id: &[u8], size: usize) {
        let mut s = self.lock();
        if s.in_flight.insert(message_id.to_vec(), size).is_none() {
            s.bytes += size;
        }
    }

    /// Records an acknowledgement (of a message pushed on this connection or not).
    pub fn acked(&self, message_id: &[u8]) {
        let mut s = self.lock();
        if let Some(size) = s.in_flight.remove(message_id) {
            s.bytes -= size;
            s.window = (s.window + size).min(MAX_WINDOW);
            drop(s);
            self.freed.notify_one();
        }
    }

    /// Waits until another envelope may be pushed.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_fills_frees_on_acks_and_grows_like_slow_start() {
        let w = PushWindow::default();
        let mut n = 0u8;
        while w.has_room() {
            w.pushed(&[n], 1000);
            n += 1;
        }
        assert_eq!(n, 5, "4 KiB allow five 1000-byte envelopes to start");
        w.acked(&[0]);
        w.acked(&[0]); // a repeated ack frees nothing more
        w.acked(&[99]); // nor one for a message pushed elsewhere
        assert!(w.has_room());
        for i in 1..n {
            w.acked(&[i]);
        }
        let window = w.lock().window;
        assert_eq!(
            window,
            INITIAL_WINDOW + 5000,
            "grew by what was acknowledged"
        );
        for i in 0..2000u16 {
            w.pushed(&i.to_be_bytes(), 1000);
            w.acked(&i.to_be_bytes());
        }
        assert_eq!(w.lock().window, MAX_WINDOW);
    }

    #[tokio::test]
    async fn a_full_window_waits_for_an_ack() {
        let w = std::sync::Arc::new(PushWindow::default());
        w.pushed(b"a", INITIAL_WINDOW);
        assert!(!w.has_room());
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        w.acked(b"a");
        waiter.await.unwrap();
    }
}
