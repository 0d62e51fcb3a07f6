//! Batches over NATS JetStream: the sender publishes each batch to
//! `<prefix>.db.<site>` (message id: site and position, so a batch sent
//! twice within the duplicate window is stored once) and moves its cursor
//! after the PubAck; the receiver reads one durable consumer with one
//! message in flight, so batches are applied in order, and acks after the
//! commit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream, AckKind};
use futures_util::StreamExt;

use crate::config::NatsLink;
use crate::receiver::Receiver;
use crate::record::Batch;
use crate::DbError;

async fn connect(link: &NatsLink) -> Result<(async_nats::Client, jetstream::Context), DbError> {
    let opts = link
        .auth()
        .apply(async_nats::ConnectOptions::new())
        .await
        .map_err(DbError::Config)?;
    let client = opts
        .connect(link.servers.join(","))
        .await
        .map_err(|e| DbError::Delivery(format!("nats {}: {e}", link.servers.join(","))))?;
    Ok((client.clone(), jetstream::new(client)))
}

async fn stream(js: &jetstream::Context, link: &NatsLink) -> Result<stream::Stream, DbError> {
    js.get_or_create_stream(stream::Config {
        name: link.stream.clone(),
        subjects: vec![format!("{}.db.>", link.subject_prefix)],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| DbError::Delivery(format!("stream {}: {e}", link.stream)))
}

/// Connects and makes sure of the stream, retrying while the server is
/// away or not ready (a bad auth file is an error at once).
async fn open(
    link: &NatsLink,
) -> Result<(async_nats::Client, jetstream::Context, stream::Stream), DbError> {
    crate::retrying("NATS not reachable yet", || async {
        let (c, js) = connect(link).await?;
        let s = stream(&js, link).await?;
        Ok((c, js, s))
    })
    .await
}

pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    subject: String,
}

impl Publisher {
    pub async fn connect(link: &NatsLink, site: &str) -> Result<Publisher, DbError> {
        let (client, js, _) = open(link).await?;
        Ok(Publisher {
            client,
            js,
            subject: link.subject(site),
        })
    }

    /// The server's message limit, less room for headers.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload.saturating_sub(1024)
    }

    /// Returns after the PubAck: the batch is stored in the stream.
    pub async fn publish(&self, batch: &Batch) -> Result<(), DbError> {
        let body = serde_json::to_vec(batch).map_err(|e| DbError::BadRecord(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", batch.message_id().as_str());
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, body.into())
            .await
            .map_err(|e| DbError::Delivery(e.to_string()))?;
        ack.await.map_err(|e| DbError::Delivery(e.to_string()))?;
        Ok(())
    }
}

/// Applies batches from the stream until `stop`; a batch that fails is
/// redelivered (after a pause) before any later one. A lost connection
/// is opened again.
pub async fn receive(
    receiver: Arc<Receiver>,
    link: NatsLink,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DbError> {
    let mut attempt = 0;
    loop {
        match receive_once(&receiver, &link, stop.clone()).await {
            Err(DbError::Delivery(e)) if !*stop.borrow() => {
                let wait = crate::backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?wait, "NATS consumer lost; opening it again");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn receive_once(
    receiver: &Receiver,
    link: &NatsLink,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DbError> {
    let (_client, _js, s) = open(link).await?;
    let consumer = s
        .get_or_create_consumer(
            &link.durable,
            pull::Config {
                durable_name: Some(link.durable.clone()),
                filter_subject: format!("{}.db.>", link.subject_prefix),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| DbError::Delivery(format!("consumer {}: {e}", link.durable)))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| DbError::Delivery(e.to_string()))?;
    tracing::info!(stream = %link.stream, durable = %link.durable, "db-receiver reading NATS");
    let mut failures = 0u32;
    loop {
        let msg = tokio::select! {
            m = messages.next() => m,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(msg) = msg else {
            return Err(DbError::Delivery(
                "the consumer's message stream ended".into(),
            ));
        };
        let msg = msg.map_err(|e| DbError::Delivery(e.to_string()))?;
        let batch: Batch = match serde_json::from_slice(&msg.payload) {
            Ok(b) => b,
            Err(e) => {
                // Not a batch: nothing to apply, ever; say so and move on.
                tracing::error!(subject = %msg.subject, error = %e, "not a batch; terminated");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            }
        };
        match receiver.apply(&batch).await {
            Ok(a) => {
                failures = 0;
                msg.double_ack()
                    .await
                    .map_err(|e| DbError::Delivery(format!("ack: {e}")))?;
                tracing::debug!(site = %batch.site, applied = a.applied, duplicate = a.duplicate, "batch applied");
            }
            Err(e) => {
                let wait = crate::backoff(failures);
                failures += 1;
                tracing::warn!(site = %batch.site, error = %e, retry_in = ?wait, "batch not applied");
                receiver.note_error(&batch.site, &e.to_string()).await;
                let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
            }
        }
    }
}
