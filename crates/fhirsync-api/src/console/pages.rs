//! The console's pages, rendered as HTML strings: one layout, tables, the
//! side-by-side conflict diff, and forms that carry the session's CSRF
//! token. Every value from data is escaped.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use fhirsync_store::{AuditQuery, ConflictState, ListQuery};
use serde_json::Value;

use super::plot::{svg, Series};
use super::{html, Console, Role, Session, Viewer};

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}\
header{background:#24292f;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}\
header a{color:#fff;text-decoration:none}header a.on{text-decoration:underline}\
header .me{margin-left:auto}main{padding:16px;max-width:1200px}\
table{border-collapse:collapse;background:#fff;margin:8px 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#eaeef2}.diff td{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}\
tr.changed td{background:#fff8c5}tr.changed td.side{background:#ffebe9}.bad{color:#d1242f}.ok{color:#1a7f37}\
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #d0d7de;padding:8px 16px;min-width:140px}\
.card b{font-size:22px;display:block}button{padding:4px 12px;cursor:pointer}form.inline{display:inline}\
figure.plot{background:#fff;border:1px solid #d0d7de;padding:8px;margin:8px 0;display:inline-block}\
.msg{background:#fff;border:1px solid #d0d7de;padding:16px;max-width:520px}input{padding:4px}";

pub(super) fn page(title: &str, s: Option<&Session>, active: &str, body: &str) -> String {
    let nav = match s {
        Some(s) => {
            let links = [
                ("/", "Overview"),
                ("/edges", "Edges"),
                ("/children", "Children"),
                ("/conflicts", "Conflicts"),
                ("/deadletters", "Dead letters"),
                ("/audit", "Audit"),
                ("/subscriptions", "Subscriptions"),
                ("/db", "Database sync"),
            ];
            let l: String = links
                .iter()
                .map(|(h, t)| {
                    let on = if *h == active { " class=\"on\"" } else { "" };
                    format!("<a href=\"{h}\"{on}>{t}</a>")
                })
                .collect();
            format!(
                "{l}<span class=\"me\">{} ({})</span><form class=\"inline\" method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form>",
                esc(&s.user),
                s.role.as_str(),
                esc(&s.csrf)
            )
        }
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · fhirsync</title><style>{STYLE}</style></head>\
         <body><header><strong>fhirsync</strong>{nav}</header><main><h1>{}</h1>{body}</main></body></html>",
        esc(title),
        esc(title)
    )
}

/// A short page with one message.
pub fn message(status: u16, title: &str, text: &str) -> Response {
    html(
        status,
        page(
            title,
            None,
            "",
            &format!(
                "<p class=\"msg\" id=\"message\">{}</p><p><a href=\"/\">Back</a></p>",
                esc(text)
            ),
        ),
    )
}

pub fn login(csrf: &str, error: Option<&str>, users: usize) -> Response {
    let err = error
        .map(|e| format!("<p class=\"bad\" id=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    let none = if users == 0 {
        "<p class=\"bad\">No console users yet: add one with <code>fhirsync user add NAME --role admin</code>.</p>"
    } else {
        ""
    };
    html(
        200,
        page(
            "Sign in",
            None,
            "",
            &format!(
                "{none}{err}<form class=\"msg\" method=\"post\" action=\"/login\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <p><label>User <input name=\"user\" id=\"user\" autocomplete=\"username\" required></label></p>\
                 <p><label>Password <input name=\"password\" id=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
                 <p><button id=\"signin\">Sign in</button></p></form>",
                esc(csrf)
            ),
        ),
    )
}

pub(super) fn table(head: &[&str], rows: Vec<Vec<String>>, id: &str) -> String {
    if rows.is_empty() {
        return format!("<p id=\"{id}\">None.</p>");
    }
    let h: String = head.iter().map(|h| format!("<th>{h}</th>")).collect();
    let r: String = rows
        .into_iter()
        .map(|r| {
            format!(
                "<tr>{}</tr>",
                r.into_iter()
                    .map(|c| format!("<td>{c}</td>"))
                    .collect::<String>()
            )
        })
        .collect();
    format!("<table id=\"{id}\"><tr>{h}</tr>{r}</table>")
}

fn when(ms: u64) -> String {
    if ms == 0 {
        "—".into()
    } else {
        fhirsync_core::instant::format_instant(ms)
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => "—".into(),
        other => esc(&other.to_string()),
    }
}

/// An edge (its JSON) as a table of fields, nested objects flattened.
fn fields(v: &Value) -> String {
    let mut flat = BTreeMap::new();
    flatten("", v, &mut flat);
    let rows = flat.into_iter().map(|(k, v)| vec![esc(&k), v]).collect();
    table(&["field", "value"], rows, "fields")
}

/// The rows of a side-by-side diff of (escaped) values by field, changed
/// ones marked; `counted` says which fields count. Answers the rows and
/// how many counted fields differ.
pub(super) fn diff_rows(
    l: &BTreeMap<String, String>,
    r: &BTreeMap<String, String>,
    counted: impl Fn(&str) -> bool,
) -> (String, usize) {
    let mut keys: Vec<&String> = l.keys().chain(r.keys()).collect();
    keys.sort();
    keys.dedup();
    let dash = "—".to_string();
    let mut changed = 0;
    let rows = keys
        .iter()
        .map(|k| {
            let (a, b) = (l.get(*k).unwrap_or(&dash), r.get(*k).unwrap_or(&dash));
            let cls = if a != b && counted(k) {
                changed += 1;
                " class=\"changed\""
            } else {
                ""
            };
            format!(
                "<tr{cls}><td>{}</td><td class=\"side\">{a}</td><td class=\"side\">{b}</td></tr>",
                esc(k)
            )
        })
        .collect();
    (rows, changed)
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), scalar(other));
        }
    }
}

fn lag_and_rate(samples: &[super::Sample], now_ms: u64) -> (Vec<Series>, Vec<Series>) {
    let x = |ms: u64| -((now_ms.saturating_sub(ms)) as f64) / 1000.0;
    let mut names: Vec<String> = samples
        .iter()
        .flat_map(|s| s.edges.iter().map(|e| e.0.clone()))
        .collect();
    names.sort();
    names.dedup();
    let lag = names
        .iter()
        .map(|n| Series {
            name: n.clone(),
            points: samples
                .iter()
                .filter_map(|s| {
                    s.edges
                        .iter()
                        .find(|e| &e.0 == n)
                        .map(|e| (x(s.at_ms), e.1 as f64))
                })
                .collect(),
        })
        .collect();
    let per_s = |a: &super::Sample, b: &super::Sample, va: u64, vb: u64| {
        let dt = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
        if dt <= 0.0 {
            0.0
        } else {
            vb.saturating_sub(va) as f64 / dt
        }
    };
    let mut rate = vec![Series {
        name: "written to the log".into(),
        points: samples
            .windows(2)
            .map(|w| {
                (
                    x(w[1].at_ms),
                    per_s(&w[0], &w[1], w[0].last_seq, w[1].last_seq),
                )
            })
            .collect(),
    }];
    for n in &names {
        rate.push(Series {
            name: format!("{n} carried"),
            points: samples
                .windows(2)
                .filter_map(|w| {
                    let a = w[0].edges.iter().find(|e| &e.0 == n)?;
                    let b = w[1].edges.iter().find(|e| &e.0 == n)?;
                    Some((x(w[1].at_ms), per_s(&w[0], &w[1], a.2, b.2)))
                })
                .collect(),
        });
    }
    (lag, rate)
}

type C = State<Arc<Console>>;

pub async fn overview(State(c): C, Viewer(s): Viewer) -> Response {
    let st = &c.app.store;
    let (open, dead) = crate::admin::open_counts(&c.app).await.unwrap_or_default();
    let counters: Vec<_> = c.app.agents.iter().flat_map(|a| a.counters()).collect();
    let errors: u64 = counters.iter().map(|e| e.errors).sum();
    let samples = c.samples();
    let now = super::now_ms(&c);
    let (lag, rate) = lag_and_rate(&samples, now);
    let rows = counters
        .iter()
        .map(|e| {
            vec![
                esc(&e.edge),
                esc(&e.direction),
                e.lag.to_string(),
                e.applied.to_string(),
                e.conflicts.to_string(),
                e.dead_letters.to_string(),
                if e.errors > 0 {
                    format!("<span class=\"bad\">{}</span>", e.errors)
                } else {
                    "0".into()
                },
            ]
        })
        .collect();
    let card = |label: &str, v: String, id: &str| {
        format!("<div class=\"card\" id=\"{id}\"><b>{v}</b>{label}</div>")
    };
    let body = format!(
        "<div class=\"cards\">{}{}{}{}{}</div>{}{}<h2>Edges</h2>{}",
        card("node", esc(st.node_id()), "node"),
        card("changes in the log", st.last_seq().to_string(), "last-seq"),
        card(
            "open conflicts",
            format!("<a href=\"/conflicts\">{open}</a>"),
            "open-conflicts"
        ),
        card(
            "dead letters",
            format!("<a href=\"/deadletters\">{dead}</a>"),
            "dead-letters"
        ),
        card("edge errors", errors.to_string(), "edge-errors"),
        svg("Lag: changes not carried yet, by edge", "", &lag),
        svg("Throughput: changes per second", "/s", &rate),
        table(
            &[
                "edge",
                "direction",
                "lag",
                "carried",
                "conflicts",
                "dead letters",
                "errors"
            ],
            rows,
            "edges"
        ),
    );
    html(200, page("Overview", Some(&s), "/", &body))
}

pub async fn edges(State(c): C, Viewer(s): Viewer) -> Response {
    let all = crate::admin::all_edges(&c.app).await;
    let body: String = if all.is_empty() {
        "<p>This node has no parent edge, NATS transport or subscriptions.</p>".into()
    } else {
        all.iter()
            .map(|e| {
                let name = e
                    .get("name")
                    .or(e.get("edge"))
                    .map(scalar)
                    .unwrap_or_default();
                format!("<h2>{name}</h2>{}", fields(e))
            })
            .collect()
    };
    html(200, page("Edges", Some(&s), "/edges", &body))
}

pub async fn children(State(c): C, Viewer(s): Viewer) -> Response {
    let body = match crate::admin::children_json(&c.app).await {
        Ok(list) => table(
            &[
                "child",
                "pull",
                "push",
                "first contact",
                "last contact",
                "sent up to",
                "received up to",
                "lag",
            ],
            list.iter()
                .map(|x| {
                    [
                        "nodeId",
                        "pull",
                        "push",
                        "firstContact",
                        "lastContact",
                        "lastSeqSent",
                        "lastSeqReceived",
                        "lagSeq",
                    ]
                    .iter()
                    .map(|k| scalar(&x[*k]))
                    .collect()
                })
                .collect(),
            "children",
        ),
        Err(e) => format!("<p class=\"bad\">{}</p>", esc(&e.diagnostics)),
    };
    html(200, page("Children", Some(&s), "/children", &body))
}

#[derive(serde::Deserialize, Default)]
pub struct StateFilter {
    state: Option<String>,
}

pub async fn conflicts(State(c): C, Viewer(s): Viewer, Query(f): Query<StateFilter>) -> Response {
    let state = f.state.unwrap_or_else(|| "open".into());
    let list = c
        .app
        .store
        .conflicts(ListQuery {
            state: (state != "all").then(|| state.clone()),
            count: 200,
            ..ListQuery::default()
        })
        .await
        .unwrap_or_default();
    let rows = list
        .iter()
        .map(|x| {
            vec![
                format!("<a href=\"/conflicts/{}\">{}</a>", x.id, x.id),
                esc(&format!("{}/{}", x.rtype, x.rid)),
                esc(&x.edge),
                x.state.as_str().into(),
                when(x.created_ms),
            ]
        })
        .collect();
    let tabs: String = ["open", "resolved", "auto", "all"]
        .iter()
        .map(|t| format!("<a href=\"/conflicts?state={t}\">{t}</a> "))
        .collect();
    let body = format!(
        "<p>Show: {tabs}</p>{}",
        table(
            &["id", "resource", "edge", "state", "since"],
            rows,
            "conflicts"
        )
    );
    html(
        200,
        page(
            &format!("Conflicts ({state})"),
            Some(&s),
            "/conflicts",
            &body,
        ),
    )
}

/// Lines of a resource as `path = value`, for the diff.
fn lines(body: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match body.and_then(|b| serde_json::from_str::<Value>(b).ok()) {
        Some(v) => flatten("", &v, &mut out),
        None => {
            out.insert("(deleted)".into(), "tombstone".into());
        }
    }
    out
}

pub async fn conflict(State(c): C, Viewer(s): Viewer, Path(id): Path<u64>) -> Response {
    let Ok(Some(x)) = c.app.store.conflict(id).await else {
        return super::pages::message(404, "Not found", &format!("Conflict {id} is not known."));
    };
    c.audit(
        &s.user,
        "conflict-view",
        0,
        Some(format!("{}/{}", x.rtype, x.rid)),
    )
    .await;
    let (l, r) = (
        lines(x.local.body.as_deref()),
        lines(x.remote.body.as_deref()),
    );
    // Version bookkeeping always differs; it is shown, not counted.
    let (rows, changed) = diff_rows(&l, &r, |k| k != "meta.versionId" && k != "meta.lastUpdated");
    let side = |sd: &fhirsync_store::ConflictSide| {
        format!(
            "origin {} · vector {}",
            esc(&sd.origin),
            esc(&serde_json::to_string(&sd.vv).unwrap_or_default())
        )
    };
    let actions = if x.state != ConflictState::Open {
        // An automatic settlement (a merge) can be undone by an admin.
        let undo = if x.state == ConflictState::Auto && s.role == Role::Admin {
            format!(
                " <form class=\"inline\" method=\"post\" action=\"/conflicts/{id}/reopen\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"reopen\">Undo: make it a manual conflict</button></form>",
                esc(&s.csrf)
            )
        } else {
            String::new()
        };
        // An automatic settlement names its policy (`merge`, `hlc-lww`…).
        let by = if x.state == ConflictState::Auto {
            format!(" ({})", esc(&x.policy))
        } else {
            String::new()
        };
        format!(
            "<p id=\"outcome\" class=\"ok\">{}{by} — resolution: {}, {}{undo}</p>",
            x.state.as_str(),
            esc(x.resolution.as_deref().unwrap_or("—")),
            x.closed_ms.map(when).unwrap_or_default()
        )
    } else if s.role == Role::Admin {
        format!(
            "<form class=\"inline\" method=\"post\" action=\"/conflicts/{id}/resolve\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"keep\" value=\"local\"><button id=\"keep-local\">Keep local</button></form> \
             <form class=\"inline\" method=\"post\" action=\"/conflicts/{id}/resolve\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"keep\" value=\"remote\"><button id=\"keep-remote\">Take remote</button></form>",
            csrf = esc(&s.csrf)
        )
    } else {
        "<p>Viewers cannot resolve conflicts.</p>".into()
    };
    let body = format!(
        "<p>{} on edge {} · {} · since {} · <span id=\"changed\">{changed}</span> field(s) differ</p>{actions}\
         <table class=\"diff\" id=\"diff\"><tr><th>field</th><th>local ({})</th><th>remote ({})</th></tr>{rows}</table>",
        esc(&format!("{}/{}", x.rtype, x.rid)),
        esc(&x.edge),
        x.state.as_str(),
        when(x.created_ms),
        side(&x.local),
        side(&x.remote),
    );
    html(
        200,
        page(&format!("Conflict {id}"), Some(&s), "/conflicts", &body),
    )
}

pub async fn dead_letters(State(c): C, Viewer(s): Viewer) -> Response {
    let list = c
        .app
        .store
        .dead_letters(ListQuery {
            count: 200,
            ..ListQuery::default()
        })
        .await
        .unwrap_or_default();
    let rows = list
        .iter()
        .map(|d| {
            let l = &d.letter;
            let retry = if s.role == Role::Admin {
                format!(
                    "<form class=\"inline\" method=\"post\" action=\"/deadletters/{}/retry\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Retry</button></form>",
                    d.id,
                    esc(&s.csrf)
                )
            } else {
                String::new()
            };
            vec![
                d.id.to_string(),
                esc(&l.edge),
                l.direction.as_str().into(),
                esc(&format!("{}/{}", l.rtype, l.rid)),
                l.seq.to_string(),
                format!("<span class=\"bad\">{}</span>", esc(&l.error)),
                l.attempts.to_string(),
                when(d.created_ms),
                retry,
            ]
        })
        .collect();
    let body = table(
        &[
            "id",
            "edge",
            "direction",
            "resource",
            "seq",
            "error",
            "attempts",
            "since",
            "",
        ],
        rows,
        "deadletters",
    );
    html(200, page("Dead letters", Some(&s), "/deadletters", &body))
}

#[derive(serde::Deserialize, Default)]
pub struct AuditFilter {
    patient: Option<String>,
    agent: Option<String>,
    subtype: Option<String>,
    outcome: Option<String>,
}

pub async fn audit(State(c): C, Viewer(s): Viewer, Query(f): Query<AuditFilter>) -> Response {
    let some = |v: &Option<String>| v.clone().filter(|x| !x.trim().is_empty());
    let q = AuditQuery {
        patient: some(&f.patient).map(|p| {
            if p.contains('/') {
                p
            } else {
                format!("Patient/{p}")
            }
        }),
        agent: some(&f.agent),
        subtype: some(&f.subtype),
        outcome: some(&f.outcome).and_then(|o| o.parse().ok()),
        count: 200,
        ..AuditQuery::default()
    };
    let (list, total) = c.app.store.audit_events(q).await.unwrap_or_default();
    let rows = list
        .iter()
        .map(|e| {
            let ents: Vec<String> = e["entity"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["what"]["reference"].as_str().map(esc))
                .collect();
            vec![
                scalar(&e["id"]),
                scalar(&e["recorded"]),
                scalar(&e["agent"][0]["who"]["display"]),
                scalar(&e["subtype"][0]["code"]),
                scalar(&e["action"]),
                if e["outcome"] == "0" {
                    "ok".into()
                } else {
                    format!("<span class=\"bad\">{}</span>", scalar(&e["outcome"]))
                },
                ents.join("<br>"),
                scalar(&e["agent"][0]["network"]["address"]),
            ]
        })
        .collect();
    let input = |n: &str, v: &Option<String>| {
        format!(
            "<label>{n} <input name=\"{n}\" value=\"{}\"></label> ",
            esc(v.as_deref().unwrap_or(""))
        )
    };
    let body = format!(
        "<form method=\"get\" action=\"/audit\">{}{}{}{}<button>Search</button></form><p id=\"total\">{total} event(s); newest 200 shown.</p>{}",
        input("patient", &f.patient),
        input("agent", &f.agent),
        input("subtype", &f.subtype),
        input("outcome", &f.outcome),
        table(&["id", "recorded", "who", "what", "action", "outcome", "entities", "address"], rows, "audit")
    );
    html(200, page("Audit trail", Some(&s), "/audit", &body))
}

pub async fn subscriptions(State(c): C, Viewer(s): Viewer) -> Response {
    let all = crate::admin::all_edges(&c.app).await;
    let rows = all
        .iter()
        .filter(|e| {
            e["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("subscription:"))
        })
        .map(|e| {
            [
                "name",
                "status",
                "topic",
                "events",
                "sent",
                "delivered",
                "errors",
                "lastError",
            ]
            .iter()
            .map(|k| scalar(&e[*k]))
            .collect()
        })
        .collect();
    let body = table(
        &[
            "subscription",
            "status",
            "topic",
            "events",
            "sent",
            "delivered",
            "errors",
            "last error",
        ],
        rows,
        "subscriptions",
    );
    html(
        200,
        page("Subscriptions", Some(&s), "/subscriptions", &body),
    )
}
