//! A real webhook receiver on 127.0.0.1 for subscription tests: records
//! every request to `/hook` and below (method, path, headers and JSON
//! body) and answers with a settable status.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use axum::Router;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The path, `/hook` or below it (`/hook/Observation/1`).
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    pub at: Instant,
}

#[derive(Clone, Default)]
struct Shared {
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
}

pub struct HookReceiver {
    /// `127.0.0.1:PORT`
    pub addr: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

async fn take(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let code = s.status.load(Ordering::Relaxed);
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    if code.is_success() {
        let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
        let at = Instant::now();
        s.got.lock().expect("lock").push(Received {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers,
            body,
            at,
        });
    }
    code
}

impl HookReceiver {
    pub async fn start() -> HookReceiver {
        let shared = Shared::default();
        shared.status.store(200, Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hook");
        let addr = listener.local_addr().expect("addr").to_string();
        let app = Router::new()
            .route("/hook", any(take))
            .route("/hook/{*rest}", any(take))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HookReceiver { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The status answered from now on (non-2xx: the POST is not recorded).
    pub fn answer(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.got.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for what was received.
    pub async fn wait(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            if Instant::now() > deadline {
                panic!("hook: {what} not seen in {secs}s; got {} posts", got.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The notification type of a notification Bundle (`handshake`,
/// `event-notification`, ...).
pub fn note_type(bundle: &Value) -> String {
    param(bundle, "type")
        .and_then(|p| p["valueCode"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Event numbers a notification Bundle carries.
pub fn event_numbers(bundle: &Value) -> Vec<u64> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "notification-event")
        .filter_map(|p| {
            p["part"]
                .as_array()?
                .iter()
                .find(|x| x["name"] == "event-number")?["valueString"]
                .as_str()?
                .parse()
                .ok()
        })
        .collect()
}

fn param<'a>(bundle: &'a Value, name: &str) -> Option<&'a Value> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}
