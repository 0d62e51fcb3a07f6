//! Sending one notification over a subscription's channel: an HTTP POST
//! (REST hook), a core NATS publish, or a JetStream publish with its ack.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use fhirsync_core::subscription::Channel;

use crate::config::NatsConnection;

/// A NATS connection shared by the subscriptions that name it, with the
/// subjects the server refused to let it publish to.
struct NatsConn {
    client: async_nats::Client,
    js: jetstream::Context,
    denied: Arc<Mutex<HashMap<String, String>>>,
}

/// The channels of all subscriptions of a node.
pub struct Channels {
    http: reqwest::Client,
    nats: Vec<NatsConnection>,
    conns: tokio::sync::Mutex<HashMap<String, Arc<NatsConn>>>,
}

/// The subject of a server's "Permissions Violation for Publish to "x"".
fn denied_subject(msg: &str) -> Option<String> {
    let lower = msg.to_ascii_lowercase();
    let at = lower.find("permissions violation for publish to")?;
    let rest = &msg[at..];
    let start = rest.find('"')? + 1;
    let end = rest[start..].find('"')? + start;
    Some(rest[start..end].to_owned())
}

impl Channels {
    /// `nats`: the named connections; the one named "" is the default.
    pub fn new(nats: Vec<NatsConnection>) -> Channels {
        Channels {
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            nats,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether a connection of this name is configured.
    pub fn has_connection(&self, name: Option<&str>) -> bool {
        let n = name.unwrap_or("");
        self.nats.iter().any(|c| c.name == n)
    }

    async fn conn(&self, name: Option<&str>) -> Result<Arc<NatsConn>, String> {
        let n = name.unwrap_or("");
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(n) {
            return Ok(c.clone());
        }
        let cfg = self
            .nats
            .iter()
            .find(|c| c.name == n)
            .ok_or_else(|| match name {
                Some(x) => format!("no NATS connection named '{x}' in [[subscriptions.nats]]"),
                None => "no NATS connection: configure [nats] or name one with nats-connection"
                    .to_owned(),
            })?;
        let denied: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let seen = denied.clone();
        let o = async_nats::ConnectOptions::new()
            .name("fhirsync-subscriptions")
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |ev| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = &ev {
                        let text = e.to_string();
                        tracing::warn!(error = %text, "NATS server error (subscriptions)");
                        if let Some(s) = denied_subject(&text) {
                            if let Ok(mut m) = seen.lock() {
                                m.insert(s, text);
                            }
                        }
                    }
                }
            });
        let o = cfg.auth().apply(o).await?;
        let client = o
            .connect(cfg.servers.clone())
            .await
            .map_err(|e| format!("cannot connect to NATS ({}): {e}", cfg.servers.join(",")))?;
        let js = jetstream::new(client.clone());
        let c = Arc::new(NatsConn { client, js, denied });
        conns.insert(n.to_owned(), c.clone());
        Ok(c)
    }

    /// One HTTP request of a REST hook (`body` as FHIR JSON, or none); a
    /// 2xx answer confirms it.
    pub async fn rest(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(String, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut rq = self.http.request(method.clone(), url).timeout(timeout);
        if let Some(b) = body {
            rq = rq.header("content-type", "application/fhir+json").body(b);
        }
        for (k, v) in headers {
            rq = rq.header(k.as_str(), v.as_str());
        }
        let r = rq
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("{method} {url}: HTTP {}", r.status()))
        }
    }

    /// Sends one notification; `Err` carries the reason shown in the
    /// subscription's status.
    pub async fn send(
        &self,
        ch: &Channel,
        body: Vec<u8>,
        msg_id: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        match ch {
            Channel::RestHook { endpoint, headers } => {
                self.rest(
                    reqwest::Method::POST,
                    endpoint,
                    headers,
                    Some(body),
                    timeout,
                )
                .await
            }
            Channel::Nats {
                subject,
                connection,
                jetstream,
            } => {
                let c = self.conn(connection.as_deref()).await?;
                let denied =
                    |c: &NatsConn| c.denied.lock().ok().and_then(|m| m.get(subject).cloned());
                if let Ok(mut m) = c.denied.lock() {
                    m.remove(subject);
                }
                if *jetstream {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", msg_id);
                    let ack = tokio::time::timeout(timeout, async {
                        c.js.publish_with_headers(subject.clone(), h, body.into())
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|_| "no JetStream ack in time".to_owned())
                    .and_then(|r| r);
                    match ack {
                        Ok(_) => Ok(()),
                        Err(e) => Err(match denied(&c) {
                            Some(d) => format!("publish to '{subject}' denied: {d}"),
                            None if e.contains("no responders") => {
                                format!("no JetStream stream takes subject '{subject}'")
                            }
                            None => format!("JetStream publish to '{subject}': {e}"),
                        }),
                    }
                } else {
                    c.client
                        .publish(subject.clone(), body.into())
                        .await
                        .map_err(|e| format!("publish to '{subject}': {e}"))?;
                    tokio::time::timeout(timeout, c.client.flush())
                        .await
                        .map_err(|_| "NATS flush timed out".to_owned())?
                        .map_err(|e| format!("NATS flush: {e}"))?;
                    // the server's refusal arrives before the flush's PONG;
                    // its event may be handed over a moment later
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    match denied(&c) {
                        Some(d) => Err(format!("publish to '{subject}' denied: {d}")),
                        None => Ok(()),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_denied_subject() {
        assert_eq!(
            super::denied_subject("Permissions Violation for Publish to \"pam.message\"")
                .as_deref(),
            Some("pam.message")
        );
        assert_eq!(super::denied_subject("authorization violation"), None);
    }
}
