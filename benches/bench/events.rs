//! The /events stream, with the receive time of every event.

use crate::*;

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) at: Instant,
    pub(crate) pid: Option<i32>,
    pub(crate) exit_state: Option<String>,
}

#[derive(Default)]
pub(crate) struct EvState {
    /// First sighting of (process id, event name).
    pub(crate) seen: HashMap<(u64, String), Seen>,
    pub(crate) counts: HashMap<String, u64>,
    pub(crate) last_seq: u64,
    /// Streams that ended and were resumed with `Last-Event-ID`.
    pub(crate) reconnects: u64,
}

pub(crate) struct EvShared {
    pub(crate) st: Mutex<EvState>,
    pub(crate) notify: Notify,
}

/// A subscriber of `GET /events` that resumes with `Last-Event-ID` when the
/// daemon closes the stream (e.g. because it lagged), so nothing is missed.
pub(crate) struct Events {
    pub(crate) shared: Arc<EvShared>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Events {
    /// Returns once the stream's response headers arrived, i.e. once the
    /// daemon has subscribed this client to live events.
    pub(crate) async fn open(addr: SocketAddr) -> Events {
        let shared = Arc::new(EvShared {
            st: Mutex::new(EvState::default()),
            notify: Notify::new(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(events_task(addr, shared.clone(), ready_tx));
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("event stream did not open in 10 s")
            .expect("event stream task ended");
        Events { shared, task }
    }

    /// Waits until `f` finds what it looks for in the events so far.
    pub(crate) async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&EvState) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = f(&self.shared.st.lock().expect("events lock")) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out after {limit:?} waiting for {what}");
            }
        }
    }

    pub(crate) async fn seen(&self, id: u64, event: &str) -> Seen {
        let key = (id, event.to_string());
        self.wait(
            &format!("event `{event}` of process {id}"),
            Duration::from_secs(30),
            |s| s.seen.get(&key).cloned(),
        )
        .await
    }

    pub(crate) fn count(&self, event: &str) -> u64 {
        let st = self.shared.st.lock().expect("events lock");
        st.counts.get(event).copied().unwrap_or(0)
    }

    pub(crate) async fn wait_count(&self, event: &str, n: u64, limit: Duration) -> Instant {
        self.wait(&format!("{n} `{event}` events"), limit, |s| {
            (s.counts.get(event).copied().unwrap_or(0) >= n).then(Instant::now)
        })
        .await
    }

    pub(crate) fn reconnects(&self) -> u64 {
        self.shared.st.lock().expect("events lock").reconnects
    }

    /// How many of `ids` did not settle with `exitState: success` (or were
    /// not seen idle at all).
    pub(crate) fn not_success(&self, ids: &[u64]) -> usize {
        let st = self.shared.st.lock().expect("events lock");
        ids.iter()
            .filter(|id| {
                st.seen
                    .get(&(**id, "idle".to_string()))
                    .is_none_or(|s| s.exit_state.as_deref() != Some("success"))
            })
            .count()
    }

    /// Forgets per-process sightings (keeps memory flat across sections).
    pub(crate) fn clear_seen(&self) {
        self.shared.st.lock().expect("events lock").seen.clear();
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn events_task(
    addr: SocketAddr,
    shared: Arc<EvShared>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        let res: Res<()> = async {
            let mut http = Http::connect(addr).await?;
            let last = shared.st.lock().expect("events lock").last_seq;
            http.tx.ready().await?;
            let mut req = Request::get("/events").header(HOST, "127.0.0.1");
            if last > 0 {
                req = req.header("last-event-id", last.to_string());
            }
            let resp = http
                .tx
                .send_request(req.body(Full::new(Bytes::new()))?)
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(format!("GET /events: {}", resp.status()).into());
            }
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let at = Instant::now();
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                let mut start = 0;
                let mut any = false;
                while let Some(pos) = find(&buf[start..], b"\n\n") {
                    any |= record_event(&shared, &buf[start..start + pos], at);
                    start += pos + 2;
                }
                buf.drain(..start);
                if any {
                    shared.notify.notify_waiters();
                }
            }
            Ok(())
        }
        .await;
        shared.st.lock().expect("events lock").reconnects += 1;
        if let Err(e) = res {
            progress!("event stream: {e}; reconnecting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn record_event(shared: &EvShared, block: &[u8], at: Instant) -> bool {
    let (mut seq, mut name, mut data) = (None, None, None);
    for line in block.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"id: ") {
            seq = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
        } else if let Some(v) = line.strip_prefix(b"event: ") {
            name = Some(String::from_utf8_lossy(v).into_owned());
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            data = Some(v);
        }
    }
    let (Some(seq), Some(name)) = (seq, name) else {
        return false; // a comment (keep-alive)
    };
    let mut st = shared.st.lock().expect("events lock");
    st.last_seq = st.last_seq.max(seq);
    *st.counts.entry(name.clone()).or_default() += 1;
    if let Some(p) = data.and_then(|d| serde_json::from_slice::<ProcessJson>(d).ok()) {
        st.seen.entry((p.id, name)).or_insert(Seen {
            at,
            pid: p.pid,
            exit_state: p.exit_state.map(|e| e.into_owned()),
        });
    }
    true
}
