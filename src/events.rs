//! The live side of state: a broadcast of persisted transitions and a
//! per-process "output changed" signal for followers.
//!
//! The supervisor publishes a [`Change`] only after its synced write, in
//! sequence order; the API subscribes. Subscribers are bounded: a
//! `broadcast` receiver that falls more than `capacity` events behind gets
//! `Lagged`, and the API then closes that client's stream (it resumes from
//! its last id, losing nothing because every event is also in the store).
//! Publishing never waits for a subscriber. An optional [`Observer`] (the
//! metrics) sees every change synchronously, before the broadcast, so it can
//! never lag. Knows nothing of HTTP or RocksDB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::model::{Change, ProcessId};

/// Sees every published change, in sequence order, on the publisher's
/// thread: it must be quick and must not block.
pub trait Observer: Send + Sync {
    fn observe(&self, change: &Change);
}

pub struct Hub {
    changes: broadcast::Sender<Arc<Change>>,
    observer: Option<Arc<dyn Observer>>,
    /// Only processes someone follows have an entry.
    output: Mutex<HashMap<ProcessId, watch::Sender<u64>>>,
    closing: watch::Sender<bool>,
}

impl Hub {
    /// `capacity`: how many events a subscriber may fall behind before its
    /// stream is closed.
    pub fn new(capacity: usize) -> Hub {
        Hub::with_observer(capacity, None)
    }

    /// [`Hub::new`], with an observer that sees every change first.
    pub fn with_observer(capacity: usize, observer: Option<Arc<dyn Observer>>) -> Hub {
        Hub {
            changes: broadcast::channel(capacity.max(1)).0,
            observer,
            output: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
        }
    }

    /// Publishes a durable transition (and wakes the process's followers).
    pub fn publish(&self, change: Change) {
        let id = change.record.id;
        if let Some(o) = &self.observer {
            o.observe(&change);
        }
        let _ = self.changes.send(Arc::new(change));
        self.output_changed(id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Live subscribers of the change broadcast (event streams).
    pub fn subscribers(&self) -> usize {
        self.changes.receiver_count()
    }

    /// New output bytes of `id` are in the store.
    pub fn output_changed(&self, id: ProcessId) {
        let map = self.output.lock().expect("output map");
        if let Some(tx) = map.get(&id) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Subscribes to output changes of `id` until the guard is dropped.
    pub fn watch_output(self: &Arc<Self>, id: ProcessId) -> OutputWatch {
        let rx = self
            .output
            .lock()
            .expect("output map")
            .entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        OutputWatch {
            hub: self.clone(),
            id,
            rx: Some(rx),
        }
    }

    /// Tells every live stream to end (graceful shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Hub::close`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A follower's subscription to one process's output changes.
pub struct OutputWatch {
    hub: Arc<Hub>,
    id: ProcessId,
    rx: Option<watch::Receiver<u64>>,
}

impl OutputWatch {
    /// Waits for the next change notification.
    pub async fn changed(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for OutputWatch {
    fn drop(&mut self) {
        self.rx.take();
        let mut map = self.hub.output.lock().expect("output map");
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeKind, Record, State};

    fn change(seq: u64, id: u64) -> Change {
        Change {
            seq,
            kind: ChangeKind::Entered(State::Queued),
            record: Record::new(ProcessId(id), None, 0),
        }
    }

    #[tokio::test]
    async fn slow_subscribers_lag_instead_of_blocking() {
        let hub = Hub::new(2);
        let mut rx = hub.subscribe();
        for seq in 1..=5 {
            hub.publish(change(seq, 1));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
    }

    #[tokio::test]
    async fn the_observer_sees_every_change_and_is_no_subscriber() {
        struct Seen(Mutex<Vec<u64>>);
        impl Observer for Seen {
            fn observe(&self, change: &Change) {
                self.0.lock().unwrap().push(change.seq);
            }
        }
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        let hub = Hub::with_observer(1, Some(seen.clone()));
        assert_eq!(hub.subscribers(), 0);
        let rx = hub.subscribe();
        assert_eq!(hub.subscribers(), 1);
        for seq in 1..=3 {
            hub.publish(change(seq, 1));
        }
        assert_eq!(*seen.0.lock().unwrap(), vec![1, 2, 3]);
        drop(rx);
        assert_eq!(hub.subscribers(), 0);
    }

    #[tokio::test]
    async fn output_watches_wake_and_clean_up() {
        let hub = Arc::new(Hub::new(8));
        let mut w = hub.watch_output(ProcessId(7));
        hub.output_changed(ProcessId(8)); // someone else's
        hub.output_changed(ProcessId(7));
        w.changed().await;
        drop(w);
        assert!(hub.output.lock().unwrap().is_empty());
    }
}
