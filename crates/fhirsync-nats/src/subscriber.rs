//! Following one node through a durable JetStream pull consumer. Messages
//! are applied in batches through the same path as the HTTP edges
//! (vectors, conflicts, filters) and acked only after the local commit, so
//! a crash between the two redelivers them and the vectors skip them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::AckKind;
use fhirsync_core::validate::Mode as ValidationMode;
use fhirsync_replica::edge::DirStats;
use fhirsync_store::{
    entry_seq, ApplyRequest, Direction, NewDeadLetter, RemoteVersion, Store, WriteOutcome,
    WriteRequest,
};
use fhirsync_sync::retry::backoff;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::{Follow, NatsConfig};
use crate::outbox::pause;
use crate::{edge_name, VIA_NATS};

pub async fn run(
    store: Arc<dyn Store>,
    stream: Stream,
    cfg: NatsConfig,
    follow: Follow,
    stats: Arc<DirStats>,
    mut stop: watch::Receiver<bool>,
) {
    let edge = edge_name(&follow.node);
    let durable = format!("fhirsync-{}-{}", store.node_id(), follow.node);
    let mut attempt = 0u32;
    stats.set_state("starting", None);
    while !*stop.borrow() {
        let consumer = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: format!("{}.{}.>", cfg.subject_prefix, follow.node),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: cfg.ack_wait(),
                    max_ack_pending: (cfg.batch_size_max * 4) as i64,
                    ..Default::default()
                },
            )
            .await;
        let messages = match consumer {
            Ok(c) => c.messages().await,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(format!("consumer {durable}: {e}")));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    break;
                }
                attempt += 1;
                continue;
            }
        };
        let messages = match messages {
            Ok(m) => m,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(format!("consumer {durable}: {e}")));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    break;
                }
                attempt += 1;
                continue;
            }
        };
        // A pump task owns the message stream (its `next()` is never
        // cancelled half-way); a cutter task cuts batches from its channel
        // and parses them, so the next batch is read while one is stored.
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.batch_size_max * 2);
        let pump = tokio::spawn(async move {
            let mut messages = messages;
            while let Some(m) = messages.next().await {
                let end = m.is_err();
                if tx.send(m).await.is_err() || end {
                    break;
                }
            }
        });
        let (btx, mut brx) = tokio::sync::mpsc::channel(1);
        let cutter = tokio::spawn(cut_batches(rx, btx, cfg.batch_size_max, cfg.validation));
        stats.set_state("ok", None);
        loop {
            let next = tokio::select! {
                b = brx.recv() => b,
                _ = stop.changed() => {
                    pump.abort();
                    cutter.abort();
                    return;
                }
            };
            let (batch, parsed) = match next {
                Some(Ok(b)) => b,
                Some(Err(why)) => {
                    // Heartbeats missed, server gone: make the consumer again.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.set_state("retrying", Some(why));
                    break;
                }
                None => break,
            };
            attempt = 0;
            if let Err(why) = apply_batch(&store, &cfg, &follow, &edge, &stats, batch, parsed).await
            {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(why));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    pump.abort();
                    cutter.abort();
                    return;
                }
            } else {
                stats.set_state("ok", None);
            }
        }
        cutter.abort();
        pump.abort();
        if pause(backoff(attempt, 0.5), &mut stop).await {
            break;
        }
        attempt += 1;
    }
    tracing::debug!(edge, "subscriber stopped");
}

/// Applies a batch in one transaction, then acks what was committed; a
/// message that failed is redelivered later (NAK with a delay), and after
/// `retry_max` deliveries becomes a dead letter.
async fn apply_batch(
    store: &Arc<dyn Store>,
    cfg: &NatsConfig,
    follow: &Follow,
    edge: &str,
    stats: &DirStats,
    batch: Vec<async_nats::jetstream::Message>,
    parsed: Vec<Result<RemoteVersion, String>>,
) -> Result<(), String> {
    let mut versions = Vec::with_capacity(batch.len());
    // Index in `batch` of each version; messages acked without applying.
    let mut at = Vec::with_capacity(batch.len());
    let mut ack_now = Vec::new();
    let mut letters = Vec::new();
    let mut nak = Vec::new();
    for (i, (m, read)) in batch.iter().zip(parsed).enumerate() {
        match read {
            Ok(v) if !follow.types.is_empty() && !follow.types.contains(&v.rtype) => {
                stats.filtered.fetch_add(1, Ordering::Relaxed);
                ack_now.push(i);
            }
            Ok(v) => {
                versions.push(v);
                at.push(i);
            }
            Err(why) => {
                if delivered(m) >= cfg.retry_max as i64 {
                    letters.push(letter(edge, m, why));
                    ack_now.push(i);
                } else {
                    nak.push(i);
                }
            }
        }
    }
    let first_seq = versions.first().map(|v| v.seq);
    let out = store
        .write(WriteRequest::Apply(Box::new(ApplyRequest {
            edge: edge.to_owned(),
            direction: Direction::Pull,
            peer: VIA_NATS.into(),
            policy: cfg.conflict_policy,
            versions,
            cursor: None,
            dead_letters: letters.clone(),
            record_peer: false,
        })))
        .await
        .map_err(|e| format!("cannot store received changes (seq {first_seq:?}): {e}"))?;
    let WriteOutcome::Applied(rep) = out else {
        return Err("unexpected write outcome".into());
    };
    stats.stored.fetch_add(rep.stored, Ordering::Relaxed);
    stats.skipped.fetch_add(rep.skipped, Ordering::Relaxed);
    stats.conflicts.fetch_add(rep.conflicts, Ordering::Relaxed);
    stats
        .dead_letters
        .fetch_add(letters.len() as u64, Ordering::Relaxed);
    let done = rep.results.len() - usize::from(rep.failed().is_some());
    ack_now.extend(at.iter().take(done));
    if let Some((i, status, why)) = rep.failed() {
        let m = &batch[at[i]];
        if delivered(m) >= cfg.retry_max as i64 {
            let l = letter(edge, m, format!("{status}: {why}"));
            store
                .write(WriteRequest::Sync(fhirsync_store::SyncWrite::DeadLetters {
                    letters: vec![l],
                    cursor: None,
                }))
                .await
                .map_err(|e| format!("cannot store a dead letter: {e}"))?;
            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
            ack_now.push(at[i]);
        } else {
            nak.push(at[i]);
        }
        nak.extend(at.iter().skip(i + 1));
    }
    for i in ack_now {
        // A lost ack only means a redelivery, which the vectors skip.
        if let Err(e) = batch[i].ack().await {
            tracing::warn!(edge, error = %e, "ack failed");
        }
    }
    for i in nak {
        let delay = backoff(delivered(&batch[i]) as u32, 0.5);
        let _ = batch[i].ack_with(AckKind::Nak(Some(delay))).await;
    }
    Ok(())
}

/// A message of the consumer, or why none came.
type Received =
    Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::pull::MessagesError>;

/// A batch of messages and what each holds.
type Cut = (
    Vec<async_nats::jetstream::Message>,
    Vec<Result<RemoteVersion, String>>,
);

/// Cuts batches from the messages received: the first one waited for,
/// then what queued up meanwhile (nothing waits for more, so a lone write
/// is applied at once and a burst in one commit), up to `max`. Each is
/// parsed in parallel off the runtime and handed on; a consumer error ends
/// the cutting.
async fn cut_batches(
    mut rx: tokio::sync::mpsc::Receiver<Received>,
    out: tokio::sync::mpsc::Sender<Result<Cut, String>>,
    max: usize,
    validation: ValidationMode,
) {
    loop {
        let mut batch = Vec::with_capacity(max);
        match rx.recv().await {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                let _ = out.send(Err(e.to_string())).await;
                return;
            }
            None => return,
        }
        while batch.len() < max {
            match rx.try_recv() {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "consumer stream error after a message");
                    break;
                }
                Err(_) => break,
            }
        }
        let parsed = parse_all(batch.iter().map(|m| m.payload.clone()), validation).await;
        if out.send(Ok((batch, parsed))).await.is_err() {
            return;
        }
    }
}

/// What each payload holds, read in parallel off the runtime. Should
/// that fail (a bug), each message fails with the reason, as an unreadable
/// one does.
async fn parse_all(
    payloads: impl Iterator<Item = bytes::Bytes>,
    validation: ValidationMode,
) -> Vec<Result<RemoteVersion, String>> {
    let payloads: Vec<bytes::Bytes> = payloads.collect();
    let n = payloads.len();
    tokio::task::spawn_blocking(move || RemoteVersion::from_payloads(&payloads, validation))
        .await
        .unwrap_or_else(|e| vec![Err(format!("parsing messages failed: {e}")); n])
}

/// Best-effort following over core NATS: live messages only, applied in
/// batches as they come; a message that cannot be applied becomes a dead
/// letter at once (core NATS does not redeliver).
pub async fn run_core(
    store: Arc<dyn Store>,
    client: async_nats::Client,
    cfg: NatsConfig,
    follow: Follow,
    stats: Arc<DirStats>,
    mut stop: watch::Receiver<bool>,
) {
    let edge = edge_name(&follow.node);
    let subject = format!("{}.{}.>", cfg.subject_prefix, follow.node);
    let mut attempt = 0u32;
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(format!("subscribe {subject}: {e}")));
                if pause(backoff(attempt, 0.5), &mut stop).await {
                    return;
                }
                attempt += 1;
            }
        }
    };
    stats.set_state("ok", None);
    loop {
        let first = tokio::select! {
            m = sub.next() => m,
            _ = stop.changed() => return,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < cfg.batch_size_max {
            match futures::FutureExt::now_or_never(sub.next()) {
                Some(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        let parsed = parse_all(batch.iter().map(|m| m.payload.clone()), cfg.validation).await;
        let mut versions = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        for (m, read) in batch.iter().zip(parsed) {
            match read {
                Ok(v) if !follow.types.is_empty() && !follow.types.contains(&v.rtype) => {
                    stats.filtered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(v) => versions.push(v),
                Err(why) => letters.push(letter_of(&edge, &m.payload, why, 1)),
            }
        }
        stats
            .dead_letters
            .fetch_add(letters.len() as u64, Ordering::Relaxed);
        let out = store
            .write(WriteRequest::Apply(Box::new(ApplyRequest {
                edge: edge.clone(),
                direction: Direction::Pull,
                peer: VIA_NATS.into(),
                policy: cfg.conflict_policy,
                versions,
                cursor: None,
                dead_letters: letters,
                record_peer: false,
            })))
            .await;
        match out {
            Ok(WriteOutcome::Applied(rep)) => {
                stats.stored.fetch_add(rep.stored, Ordering::Relaxed);
                stats.skipped.fetch_add(rep.skipped, Ordering::Relaxed);
                stats.conflicts.fetch_add(rep.conflicts, Ordering::Relaxed);
                if let Some((i, status, why)) = rep.failed() {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.set_state(
                        "ok",
                        Some(format!("entry {i} not applied ({status}): {why}")),
                    );
                } else {
                    stats.set_state("ok", None);
                }
            }
            Ok(_) => {}
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.set_state("retrying", Some(format!("cannot store live changes: {e}")));
            }
        }
    }
}

fn delivered(m: &async_nats::jetstream::Message) -> i64 {
    m.info().map(|i| i.delivered).unwrap_or(1)
}

fn letter(edge: &str, m: &async_nats::jetstream::Message, error: String) -> NewDeadLetter {
    letter_of(edge, &m.payload, error, delivered(m) as u32)
}

fn letter_of(edge: &str, payload: &[u8], error: String, attempts: u32) -> NewDeadLetter {
    let text = String::from_utf8_lossy(payload).into_owned();
    let entry: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let url = entry
        .pointer("/request/url")
        .and_then(Value::as_str)
        .unwrap_or("?/?")
        .to_owned();
    let (t, id) = url.split_once('/').unwrap_or((&url, ""));
    NewDeadLetter {
        edge: edge.to_owned(),
        direction: Direction::Pull,
        rtype: t.to_owned(),
        rid: id.to_owned(),
        seq: entry_seq(&entry).unwrap_or(0),
        record: text,
        error,
        attempts,
    }
}
