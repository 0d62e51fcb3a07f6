//! The outbox: this node's change log, published to JetStream in order.
//! Each version goes to `<prefix>.<node>.<Type>` with `Nats-Msg-Id =
//! <node>:<seq>` (JetStream drops a repeat within its duplicate window,
//! and subscribers skip any later repeat by version vector). The cursor
//! moves only after the PubAcks of everything before it arrived; only
//! committed versions are in the log, so a rolled-back write publishes
//! nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use fhirsync_replica::edge::DirStats;
use fhirsync_store::{change_entry_text, ChangesQuery, Store, SyncWrite, WriteRequest};
use fhirsync_sync::retry::backoff;
use tokio::sync::watch;

use crate::config::NatsConfig;
use crate::{OUTBOX_CURSOR, VIA_NATS};

/// Where the outbox publishes.
#[derive(Clone)]
pub enum Publisher {
    /// With a PubAck per message.
    JetStream(Context),
    /// Core NATS, best effort: "sent" once the client flushed.
    Core(async_nats::Client),
}

/// How often the outbox's state and lag are refreshed from the client's
/// connection and the log while it waits (for PubAcks, for a retry): a
/// dead server shows within this, not when a PubAck times out.
pub const WATCH_MS: u64 = 200;

/// State of the publish edge that says the connection is down.
const DISCONNECTED: &str = "disconnected";

pub async fn run(
    store: Arc<dyn Store>,
    publisher: Publisher,
    client: async_nats::Client,
    cfg: NatsConfig,
    stats: Arc<DirStats>,
    stop: watch::Receiver<bool>,
) {
    let watcher = tokio::spawn(watch_connection(store.clone(), client, stats.clone()));
    publish_loop(store, publisher, cfg, stats, stop).await;
    watcher.abort();
}

/// Keeps `stats` true while the publish loop waits: the lag from the log
/// and the cursor, and `disconnected` while the client has no connection
/// (back to `ok` when it has one again and nothing else went wrong).
async fn watch_connection(store: Arc<dyn Store>, client: async_nats::Client, stats: Arc<DirStats>) {
    use async_nats::connection::State;
    loop {
        tokio::time::sleep(Duration::from_millis(WATCH_MS)).await;
        let lag = store
            .last_seq()
            .saturating_sub(stats.cursor.load(Ordering::Relaxed));
        stats.lag.store(lag, Ordering::Relaxed);
        let now = stats.state.lock().map(|g| g.0.clone()).unwrap_or_default();
        match client.connection_state() {
            State::Connected if now == DISCONNECTED => stats.set_state("ok", None),
            State::Connected => {}
            State::Disconnected | State::Pending
                if matches!(now.as_str(), "ok" | "starting" | DISCONNECTED) =>
            {
                stats.set_state(
                    DISCONNECTED,
                    Some(format!(
                        "no connection to the NATS server: {lag} change(s) wait"
                    )),
                );
            }
            _ => {}
        }
    }
}

async fn publish_loop(
    store: Arc<dyn Store>,
    publisher: Publisher,
    cfg: NatsConfig,
    stats: Arc<DirStats>,
    mut stop: watch::Receiver<bool>,
) {
    let node = store.node_id().to_owned();
    let mut attempt = 0u32;
    stats.set_state("starting", None);
    let mut cursor = loop {
        match store.cursor(OUTBOX_CURSOR).await {
            Ok(c) => break c.unwrap_or(0),
            Err(e) => {
                stats.set_state("retrying", Some(e.to_string()));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    return;
                }
                attempt += 1;
            }
        }
    };
    let mut seq_rx = store.watch_seq();
    while !*stop.borrow() {
        let upper = *seq_rx.borrow_and_update();
        let rows = match store
            .changes(ChangesQuery {
                since: cursor,
                count: cfg.batch_size_max,
                types: Vec::new(),
                exclude_via: Some(VIA_NATS.into()),
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                stats.set_state("retrying", Some(e.to_string()));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    break;
                }
                attempt += 1;
                continue;
            }
        };
        stats.cursor.store(cursor, Ordering::Relaxed);
        stats
            .lag
            .store(store.last_seq().saturating_sub(cursor), Ordering::Relaxed);
        if rows.is_empty() {
            cursor = cursor.max(upper);
            stats
                .lag
                .store(store.last_seq().saturating_sub(cursor), Ordering::Relaxed);
            tokio::select! {
                r = seq_rx.changed() => if r.is_err() { break },
                _ = stop.changed() => break,
            }
            continue;
        }
        // Send the whole batch, then collect the acks: one round trip per
        // batch, not per message.
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        for v in &rows {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{node}:{}", v.seq).as_str());
            let payload = change_entry_text(None, v);
            let subject = cfg.subject(&node, &v.rtype);
            let sent = match &publisher {
                Publisher::JetStream(js) => js
                    .publish_with_headers(subject, h, payload.into())
                    .await
                    .map(|ack| pending.push((v.seq, ack)))
                    .map_err(|e| e.to_string()),
                Publisher::Core(c) => c
                    .publish_with_headers(subject, h, payload.into())
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = sent {
                failure = Some(format!("publish failed: {e}"));
                break;
            }
        }
        let mut acked = None;
        let mut published = 0u64;
        if let (Publisher::Core(c), None) = (&publisher, &failure) {
            match c.flush().await {
                Ok(()) => {
                    acked = rows.last().map(|v| v.seq);
                    published = rows.len() as u64;
                }
                Err(e) => failure = Some(format!("flush failed: {e}")),
            }
        }
        for (seq, ack) in pending {
            match ack.await {
                Ok(a) => {
                    acked = Some(seq);
                    if !a.duplicate {
                        published += 1;
                    } else {
                        stats.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    failure.get_or_insert(format!("no PubAck: {e}"));
                    break;
                }
            }
        }
        stats.stored.fetch_add(published, Ordering::Relaxed);
        if let Some(to) = acked {
            let w = SyncWrite::SetCursor {
                key: OUTBOX_CURSOR.into(),
                seq: to,
                audit: None,
            };
            match store.write(WriteRequest::Sync(w)).await {
                Ok(_) => cursor = to,
                Err(e) => {
                    failure.get_or_insert(format!("cannot store the outbox cursor: {e}"));
                }
            }
        }
        stats.cursor.store(cursor, Ordering::Relaxed);
        stats
            .lag
            .store(store.last_seq().saturating_sub(cursor), Ordering::Relaxed);
        match failure {
            None => {
                attempt = 0;
                stats.set_state("ok", None);
            }
            Some(why) => {
                // Everything after `cursor` is sent again; JetStream and the
                // subscribers' vectors drop what already arrived.
                tracing::warn!(cursor, "outbox: {why}");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(why));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    break;
                }
                attempt += 1;
            }
        }
    }
    tracing::debug!("outbox stopped");
}

/// Waits `d`; `true` when the task should stop instead.
pub(crate) async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}
