//! The console's database-sync pages: the sites and open conflicts of a
//! `fhirsync db-receiver`, read through its admin API, with a
//! column-by-column diff of each conflict and resolve buttons (admins,
//! CSRF) that call the same API.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use axum::extract::{Form, Path, State};
use axum::response::Response;
use serde_json::Value;

use super::pages::{diff_rows, esc, message, page, table};
use super::{bad_csrf, html, not_admin, redirect, Shared, Viewer};

/// Where the console finds a db-receiver's admin API.
#[derive(Debug, Clone)]
pub struct DbReceiverLink {
    /// `http(s)://host:port` of the receiver's `listen`.
    pub url: String,
    pub admin_token: String,
}

fn client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("an HTTP client")
    })
}

/// Calls the receiver's admin API; an error is a line for the page.
async fn call(link: &DbReceiverLink, post: bool, path: &str) -> Result<Value, String> {
    let url = format!("{}{path}", link.url.trim_end_matches('/'));
    let rb = if post {
        client().post(&url)
    } else {
        client().get(&url)
    };
    let r = rb
        .bearer_auth(&link.admin_token)
        .send()
        .await
        .map_err(|e| format!("the db-receiver at {} does not answer: {e}", link.url))?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(v)
    } else {
        Err(v["issue"][0]["diagnostics"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("the db-receiver answered {status}")))
    }
}

fn unlinked() -> Response {
    message(
        404,
        "Database sync",
        "No db-receiver is linked to this console: set [console] db_receiver_url and db_receiver_admin_token.",
    )
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn overview(State(c): State<Shared>, Viewer(s): Viewer) -> Response {
    let Some(link) = &c.cfg.db_receiver else {
        return unlinked();
    };
    let (sites, conflicts) = match (
        call(link, false, "/db/sites").await,
        call(link, false, "/db/conflicts").await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return message(502, "Database sync", &e),
    };
    let empty = Vec::new();
    let site_rows = sites
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|x| {
            let err = x["last_error"]
                .as_str()
                .map(|e| format!("<span class=\"bad\">{}</span>", esc(e)));
            vec![
                esc(&text(&x["site"])),
                esc(&text(&x["position"])),
                esc(&text(&x["last_received_at"])),
                esc(&text(&x["records"])),
                esc(&text(&x["open_conflicts"])),
                err.unwrap_or_else(|| "—".into()),
            ]
        })
        .collect();
    let conflict_rows = conflicts
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|x| {
            let id = text(&x["id"]);
            vec![
                format!("<a href=\"/db/conflicts/{}\">{}</a>", esc(&id), esc(&id)),
                esc(&text(&x["site"])),
                esc(&format!("{} {}", text(&x["table"]), text(&x["key"]))),
                esc(&text(&x["held"])),
                esc(&text(&x["created_at"])),
            ]
        })
        .collect();
    let body = format!(
        "<h2>Sites</h2>{}<h2>Open conflicts</h2>{}",
        table(
            &[
                "site",
                "binlog position",
                "last batch (UTC)",
                "records",
                "conflicts",
                "last error"
            ],
            site_rows,
            "db-sites"
        ),
        table(
            &["id", "site", "row", "changes held", "since (UTC)"],
            conflict_rows,
            "db-conflicts"
        ),
    );
    html(200, page("Database sync", Some(&s), "/db", &body))
}

pub async fn conflict(State(c): State<Shared>, Viewer(s): Viewer, Path(id): Path<i64>) -> Response {
    let Some(link) = &c.cfg.db_receiver else {
        return unlinked();
    };
    let all = match call(link, false, "/db/conflicts?all=true").await {
        Ok(v) => v,
        Err(e) => return message(502, "Database sync", &e),
    };
    let Some(x) = all
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"].as_i64() == Some(id)))
    else {
        return message(
            404,
            "Not found",
            &format!("Database conflict {id} is not known."),
        );
    };
    c.audit(
        &s.user,
        "conflict-view",
        0,
        Some(format!("db/{}/{}", text(&x["table"]), text(&x["key"]))),
    )
    .await;
    let change = &x["incoming"]["change"];
    let cols = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), esc(&text(v)))).collect())
            .unwrap_or_default()
    };
    let (rows, changed) = diff_rows(&cols(&change["row"]), &cols(&x["local"]), |_| true);
    let actions = if let Some(r) = x["resolution"].as_str() {
        format!(
            "<p id=\"outcome\" class=\"ok\">resolved: kept {} at {}</p>",
            esc(r),
            esc(&text(&x["resolved_at"]))
        )
    } else if s.role == super::Role::Admin {
        let form = |keep: &str, label: &str| {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/db/conflicts/{id}/resolve\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"keep\" value=\"{keep}\"><button id=\"keep-{keep}\">{label}</button></form>",
                esc(&s.csrf)
            )
        };
        format!(
            "{} {}",
            form("incoming", "Take incoming"),
            form("local", "Keep central")
        )
    } else {
        "<p>Viewers cannot resolve conflicts.</p>".into()
    };
    let body = format!(
        "<p>{} {} from site {} ({}) · since {} · {} change(s) held · <span id=\"changed\">{changed}</span> column(s) differ</p>{actions}\
         <p id=\"zone\">Both versions are shown in the receiver's time zone, {} (the site's is {}).</p>\
         <table class=\"diff\" id=\"diff\"><tr><th>column</th><th>incoming (site)</th><th>central</th></tr>{rows}</table>",
        esc(&text(&x["table"])),
        esc(&text(&x["key"])),
        esc(&text(&x["site"])),
        esc(&text(&change["op"])),
        esc(&text(&x["created_at"])),
        esc(&text(&x["held"])),
        esc(&text(&x["time_zone"])),
        esc(&text(&x["incoming"]["site_time_zone"])),
    );
    html(
        200,
        page(&format!("Database conflict {id}"), Some(&s), "/db", &body),
    )
}

pub async fn resolve(
    State(c): State<Shared>,
    Viewer(s): Viewer,
    Path(id): Path<i64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_csrf(&s, &f).or_else(|| not_admin(&s)) {
        return r;
    }
    let Some(link) = &c.cfg.db_receiver else {
        return unlinked();
    };
    let keep = match f.get("keep").map(String::as_str) {
        Some(k @ ("incoming" | "local")) => k,
        _ => {
            return message(
                400,
                "Refused",
                "Choose the incoming or the central version.",
            )
        }
    };
    let r = call(
        link,
        true,
        &format!("/db/conflicts/{id}/resolve?keep={keep}"),
    )
    .await;
    let entity = Some(format!("db/conflict/{id}"));
    c.audit(&s.user, "resolve", if r.is_ok() { 0 } else { 4 }, entity)
        .await;
    match r {
        Ok(_) => redirect(&format!("/db/conflicts/{id}")),
        Err(e) => message(
            502,
            "Not resolved",
            &format!("Database conflict {id} was not resolved: {e}"),
        ),
    }
}
