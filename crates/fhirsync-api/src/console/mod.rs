//! The web console: server-rendered pages on their own listener (loopback
//! unless configured otherwise) for people watching a node: overview with
//! lag and throughput plots, edges, children, conflicts (side-by-side diff,
//! resolve), dead letters (retry), the audit trail, subscriptions, and a
//! db-receiver's sites and conflicts.
//! Users come from the users file (argon2); sessions are random cookies
//! (HttpOnly, SameSite=Strict, Secure over HTTPS); every form carries the
//! session's CSRF token; repeated failed logins lock the user name out.

pub mod db;
mod pages;
mod plot;
pub mod users;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Form, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
use fhirsync_store::{SyncWrite, WriteRequest};

use crate::AppState;
pub use users::Role;

/// The `[console]` settings.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub users_file: PathBuf,
    /// Set the `Secure` cookie attribute (the console is served over HTTPS).
    pub secure_cookies: bool,
    /// A session ends after this long without a request.
    pub session_idle_s: u64,
    /// Failed logins of one user name, within `lockout_s`, that lock it.
    pub lockout_failures: u32,
    /// How long a lock-out lasts, and the window failures are counted in.
    pub lockout_s: u64,
    /// Seconds between two samples of the plots.
    pub sample_s: u64,
    /// A db-receiver whose sites and conflicts the console shows.
    pub db_receiver: Option<db::DbReceiverLink>,
}

impl ConsoleConfig {
    pub fn new(users_file: PathBuf) -> Self {
        ConsoleConfig {
            users_file,
            secure_cookies: false,
            session_idle_s: 1800,
            lockout_failures: 5,
            lockout_s: 900,
            sample_s: 5,
            db_receiver: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    last_ms: u64,
}

#[derive(Debug, Default)]
struct Failures {
    count: u32,
    first_ms: u64,
    locked_until_ms: u64,
}

/// One sample for the plots.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u64,
    pub last_seq: u64,
    /// Per edge direction (`edge/direction`): lag, records carried so far.
    pub edges: Vec<(String, u64, u64)>,
}

/// Samples kept (an hour at 5 s).
const SAMPLES_MAX: usize = 720;

pub struct Console {
    pub app: AppState,
    pub cfg: ConsoleConfig,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, Failures>>,
    samples: Mutex<std::collections::VecDeque<Sample>>,
}

pub(super) type Shared = Arc<Console>;

pub const SESSION_COOKIE: &str = "fhirsync_session";
const LOGIN_COOKIE: &str = "fhirsync_login";

fn now_ms(c: &Console) -> u64 {
    c.app.cfg.auth.clock.now_ms()
}

impl Console {
    /// The console over a node's state; starts its plot sampler.
    pub fn start(app: AppState, cfg: ConsoleConfig) -> Arc<Console> {
        let c = Arc::new(Console {
            app,
            cfg,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            samples: Mutex::new(Default::default()),
        });
        let weak = Arc::downgrade(&c);
        let every = Duration::from_secs(c.cfg.sample_s.max(1));
        let mut stop = c.app.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                c.sample();
                drop(c);
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|v| *v) => return,
                }
            }
        });
        c
    }

    fn sample(&self) {
        let edges = self
            .app
            .agents
            .iter()
            .flat_map(|a| a.counters())
            .map(|e| (format!("{}/{}", e.edge, e.direction), e.lag, e.applied))
            .collect();
        let s = Sample {
            at_ms: now_ms(self),
            last_seq: self.app.store.last_seq(),
            edges,
        };
        let mut q = self.samples.lock().expect("samples");
        if q.len() == SAMPLES_MAX {
            q.pop_front();
        }
        q.push_back(s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("samples")
            .iter()
            .cloned()
            .collect()
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let now = now_ms(self);
        let mut all = self.sessions.lock().expect("sessions");
        let key = crate::auth::token_hash(&id);
        match all.get_mut(&key) {
            Some(s) if now.saturating_sub(s.last_ms) < self.cfg.session_idle_s * 1000 => {
                s.last_ms = now;
                Some(s.clone())
            }
            Some(_) => {
                all.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Records a console action in the audit trail.
    pub(super) async fn audit(
        &self,
        who: &str,
        subtype: &str,
        outcome: u8,
        entity: Option<String>,
    ) {
        self.audit_why(who, subtype, outcome, entity, None).await
    }

    /// A failed login, with its reason (`outcomeDesc`).
    async fn login_failed(&self, who: &str, why: &str) {
        self.audit_why(who, "login", 4, None, Some(why)).await
    }

    async fn audit_why(
        &self,
        who: &str,
        subtype: &str,
        outcome: u8,
        entity: Option<String>,
        why: Option<&str>,
    ) {
        let mut r = AuditRecord::rest(
            now_ms(self),
            subtype,
            if outcome == 0 { 200 } else { 401 },
            Who::User(who.to_owned()),
            self.app.store.node_id(),
        );
        r.kind = AuditKind::Login;
        r.subtype = subtype.to_owned();
        r.action = if subtype == "resolve" { 'U' } else { 'E' };
        r.outcome = outcome;
        r.outcome_desc = why.map(str::to_owned);
        if let Some(e) = entity {
            if e.starts_with("Patient/") {
                r.patients.push(e.clone());
            }
            r.entities.push(e);
        }
        if !self.app.auditor.record(r).await {
            tracing::error!("cannot record a console audit event");
        }
    }
}

/// A cookie's value from the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(c: &Console, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut s = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(a) = max_age {
        s.push_str(&format!("; Max-Age={a}"));
    }
    if c.cfg.secure_cookies {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).expect("cookie header")
}

pub(super) fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")),
    );
    r
}

/// An HTML page with the console's headers.
pub fn html(status: u16, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// Security headers on every console response.
async fn harden(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The signed-in user of a page request, or the way to the login page.
pub struct Viewer(pub Session);

impl axum::extract::FromRequestParts<Shared> for Viewer {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Shared,
    ) -> Result<Self, Self::Rejection> {
        c.session(&parts.headers).map(Viewer).ok_or_else(|| {
            if parts.method == axum::http::Method::GET {
                redirect("/login")
            } else {
                pages::message(403, "Signed out", "Your session has ended; sign in again.")
            }
        })
    }
}

/// Checks a form's CSRF token against the session's.
/// The refusal when a form's CSRF token is not the session's.
pub(super) fn bad_csrf(s: &Session, form: &HashMap<String, String>) -> Option<Response> {
    match form.get("csrf") {
        Some(t) if crate::peers::same(t, &s.csrf) => None,
        _ => Some(pages::message(
            403,
            "Refused",
            "The form's CSRF token is missing or wrong; reload the page and try again.",
        )),
    }
}

/// The refusal when the user is not an admin.
pub(super) fn not_admin(s: &Session) -> Option<Response> {
    if s.role == Role::Admin {
        None
    } else {
        Some(pages::message(
            403,
            "Not allowed",
            &format!("{} is a viewer; only admins may change anything.", s.user),
        ))
    }
}

async fn login_page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    if c.session(&headers).is_some() {
        return redirect("/");
    }
    let token = crate::auth::new_token();
    let mut r = pages::login(&token, None, c.users_count());
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&c, LOGIN_COOKIE, &token, None),
    );
    r
}

impl Console {
    fn users_count(&self) -> usize {
        users::load(&self.cfg.users_file)
            .map(|u| u.len())
            .unwrap_or(0)
    }
}

async fn login(
    State(c): State<Shared>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let pre = cookie(&headers, LOGIN_COOKIE);
    let ok_csrf = matches!((&pre, f.get("csrf")), (Some(a), Some(b)) if crate::peers::same(a, b));
    if !ok_csrf {
        let name = f.get("user").map(|n| n.trim()).unwrap_or("");
        c.login_failed(name, "the login form's CSRF token is missing or wrong")
            .await;
        return pages::message(
            403,
            "Refused",
            "The login form's CSRF token is missing or wrong; reload the page and try again.",
        );
    }
    let name = f
        .get("user")
        .map(String::as_str)
        .unwrap_or("")
        .trim()
        .to_owned();
    let password = f.get("password").map(String::as_str).unwrap_or("");
    let now = now_ms(&c);
    let again = |why: &str, status: u16| {
        let token = crate::auth::new_token();
        let mut r = pages::login(&token, Some(why), c.users_count());
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
        r.headers_mut().insert(
            header::SET_COOKIE,
            set_cookie(&c, LOGIN_COOKIE, &token, None),
        );
        r
    };
    let locked = c
        .failures
        .lock()
        .expect("failures")
        .get(&name)
        .is_some_and(|x| x.locked_until_ms > now);
    if locked {
        c.login_failed(&name, "the user name is locked after failed logins")
            .await;
        return again(
            "Too many failed attempts: this user name is locked for a while.",
            429,
        );
    }
    let users = match users::load(&c.cfg.users_file) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the console users file");
            return again("The users file cannot be read; see the server log.", 500);
        }
    };
    let user = users.iter().find(|u| u.name == name).cloned();
    let pw = password.to_owned();
    let verified = tokio::task::spawn_blocking(move || match &user {
        Some(u) => users::verify(&u.hash, &pw).then(|| u.clone()),
        None => {
            // The same work for an unknown name, so timing does not tell.
            static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let _ = users::verify(DUMMY.get_or_init(|| users::hash_password("-")), &pw);
            None
        }
    })
    .await
    .ok()
    .flatten();
    let Some(u) = verified else {
        let locked = {
            let mut all = c.failures.lock().expect("failures");
            // Forget names whose window and lock-out are over (bounded memory).
            let window = c.cfg.lockout_s * 1000;
            all.retain(|_, f| now.saturating_sub(f.first_ms) <= window || f.locked_until_ms > now);
            let e = all.entry(name.clone()).or_default();
            if now.saturating_sub(e.first_ms) > c.cfg.lockout_s * 1000 {
                *e = Failures {
                    count: 0,
                    first_ms: now,
                    locked_until_ms: 0,
                };
            }
            e.count += 1;
            if e.count >= c.cfg.lockout_failures {
                e.locked_until_ms = now + c.cfg.lockout_s * 1000;
                tracing::warn!(user = %name, "console user name locked after failed logins");
                true
            } else {
                false
            }
        };
        c.login_failed(&name, "wrong user name or password").await;
        return if locked {
            again(
                "Too many failed attempts: this user name is locked for a while.",
                429,
            )
        } else {
            again("Wrong user name or password.", 401)
        };
    };
    c.failures.lock().expect("failures").remove(&name);
    let id = crate::auth::new_token();
    {
        let idle = c.cfg.session_idle_s * 1000;
        let mut sessions = c.sessions.lock().expect("sessions");
        sessions.retain(|_, s| now.saturating_sub(s.last_ms) < idle);
        sessions.insert(
            crate::auth::token_hash(&id),
            Session {
                user: u.name.clone(),
                role: u.role,
                csrf: crate::auth::new_token(),
                last_ms: now,
            },
        );
    }
    c.audit(&u.name, "login", 0, None).await;
    let mut r = redirect("/");
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&c, SESSION_COOKIE, &id, None),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&c, LOGIN_COOKIE, "", Some(0)),
    );
    r
}

async fn logout(
    State(c): State<Shared>,
    Viewer(s): Viewer,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_csrf(&s, &f) {
        return r;
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        c.sessions
            .lock()
            .expect("sessions")
            .remove(&crate::auth::token_hash(&id));
    }
    c.audit(&s.user, "logout", 0, None).await;
    let mut r = redirect("/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&c, SESSION_COOKIE, "", Some(0)),
    );
    r
}

async fn resolve(
    State(c): State<Shared>,
    Viewer(s): Viewer,
    axum::extract::Path(id): axum::extract::Path<u64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_csrf(&s, &f).or_else(|| not_admin(&s)) {
        return r;
    }
    let how = match f.get("keep").map(String::as_str) {
        Some("local") => fhirsync_store::Resolution::KeepLocal,
        Some("remote") => fhirsync_store::Resolution::TakeRemote,
        _ => return pages::message(400, "Refused", "Choose the local or the remote version."),
    };
    conflict_write(
        &c,
        &s.user,
        id,
        "resolve",
        SyncWrite::Resolve { conflict: id, how },
    )
    .await
}

/// Undoes a merge (any automatic settlement) into an open conflict.
async fn reopen(
    State(c): State<Shared>,
    Viewer(s): Viewer,
    axum::extract::Path(id): axum::extract::Path<u64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_csrf(&s, &f).or_else(|| not_admin(&s)) {
        return r;
    }
    conflict_write(
        &c,
        &s.user,
        id,
        "reopen",
        SyncWrite::Reopen { conflict: id },
    )
    .await
}

/// Writes `w` on conflict `id` for `user` (audited as `action` on the
/// conflict's resource); back to the conflict's page, or why not.
async fn conflict_write(c: &Shared, user: &str, id: u64, action: &str, w: SyncWrite) -> Response {
    let entity = c
        .app
        .store
        .conflict(id)
        .await
        .ok()
        .flatten()
        .map(|x| format!("{}/{}", x.rtype, x.rid));
    match c.app.store.write(WriteRequest::Sync(w)).await {
        Ok(_) => {
            c.audit(user, action, 0, entity).await;
            redirect(&format!("/conflicts/{id}"))
        }
        Err(e) => {
            c.audit(user, action, 4, entity).await;
            pages::message(
                e.status(),
                "Not done",
                &format!("Conflict {id}: {action} failed: {e}"),
            )
        }
    }
}

async fn retry(
    State(c): State<Shared>,
    Viewer(s): Viewer,
    axum::extract::Path(id): axum::extract::Path<u64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_csrf(&s, &f).or_else(|| not_admin(&s)) {
        return r;
    }
    let r = crate::admin::retry_one(&c.app, id).await;
    c.audit(&s.user, "retry", if r.is_ok() { 0 } else { 4 }, None)
        .await;
    match r {
        Ok(()) => redirect("/deadletters"),
        Err(e) => pages::message(
            e.status.as_u16(),
            "Retry failed",
            &format!("Dead letter {id}: {}", e.diagnostics),
        ),
    }
}

/// The console's routes.
pub fn router(c: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(pages::overview))
        .route("/edges", get(pages::edges))
        .route("/children", get(pages::children))
        .route("/conflicts", get(pages::conflicts))
        .route("/conflicts/{id}", get(pages::conflict))
        .route("/conflicts/{id}/resolve", post(resolve))
        .route("/conflicts/{id}/reopen", post(reopen))
        .route("/deadletters", get(pages::dead_letters))
        .route("/deadletters/{id}/retry", post(retry))
        .route("/audit", get(pages::audit))
        .route("/subscriptions", get(pages::subscriptions))
        .route("/db", get(db::overview))
        .route("/db/conflicts/{id}", get(db::conflict))
        .route("/db/conflicts/{id}/resolve", post(db::resolve))
        .fallback(|| async { pages::message(404, "Not found", "There is no such page.") })
        .layer(axum::middleware::from_fn(harden))
        .with_state(c)
}
