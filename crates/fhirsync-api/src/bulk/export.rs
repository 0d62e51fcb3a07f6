//! `$export` at system, `Patient` and `Group/[id]` level: the kick-off's
//! parameters, and the job that writes each type's current resources at
//! one cut of the change log (its `transactionTime`) into NDJSON files,
//! streaming the stored JSON as it is.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::Extension;
use fhirsync_core::instant::{format_instant, parse_range};
use fhirsync_core::resource::{is_resource_type, is_valid_id, RESOURCE_TYPES};
use fhirsync_core::search::{Clause, SearchQuery, TotalMode};
use fhirsync_core::spec;
use fhirsync_store::{DeletedQuery, LogMark};
use serde_json::{json, Value};

use super::{jobs, owner_of, Failure, Jobs, Live, Output};
use crate::auth::{Principal, R};
use crate::http::{base_url, prefer, query_pairs};
use crate::{ApiError, AppState};

/// Resources read from the store per page.
pub const PAGE: usize = 1000;
/// `_typeFilter` queries one kick-off may carry.
pub const TYPE_FILTERS_MAX: usize = 64;
/// Patients a `patient` parameter (or a Group) may name.
pub const PATIENTS_MAX: usize = 100_000;

/// Which resources an export covers.
#[derive(Debug, Clone)]
pub enum Level {
    System,
    /// The Patient compartments: of every patient (`None`) or of these.
    Patients(Option<Vec<String>>),
}

/// A checked kick-off.
#[derive(Debug, Clone)]
pub struct Spec {
    pub level: Level,
    pub types: Vec<String>,
    pub since_ms: Option<u64>,
    /// `_typeFilter`: per type, the searches a resource must satisfy one of.
    pub filters: Vec<(String, SearchQuery)>,
}

/// `[base]/$export`.
pub async fn system(
    State(state): State<AppState>,
    method: Method,
    uri: axum::http::Uri,
    RawQuery(q): RawQuery,
    p: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kick_off(&state, &method, &uri, q, p.as_deref(), &headers, body, None).await
}

/// `[base]/Patient/$export`.
pub async fn patients(
    State(state): State<AppState>,
    method: Method,
    uri: axum::http::Uri,
    RawQuery(q): RawQuery,
    p: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kick_off(
        &state,
        &method,
        &uri,
        q,
        p.as_deref(),
        &headers,
        body,
        Some(None),
    )
    .await
}

/// `[base]/Group/[id]/$export`: the compartments of the Group's members.
#[allow(clippy::too_many_arguments)]
pub async fn group(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    method: Method,
    uri: axum::http::Uri,
    RawQuery(q): RawQuery,
    p: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !is_valid_id(&id) {
        return Err(ApiError::bad_request(format!("'{id}' is not a valid id")));
    }
    kick_off(
        &state,
        &method,
        &uri,
        q,
        p.as_deref(),
        &headers,
        body,
        Some(Some(id)),
    )
    .await
}

/// The parameters of a kick-off, from the query or a `Parameters` body.
async fn params(
    state: &AppState,
    method: &Method,
    q: Option<String>,
    body: Body,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs = query_pairs(q.as_deref());
    if method == Method::POST {
        let bytes = axum::body::to_bytes(body, state.cfg.body_bytes_max)
            .await
            .map_err(|_| ApiError::new(413, "too-costly", "the request body is too large"))?;
        if !bytes.is_empty() {
            pairs.extend(parameters(&bytes)?);
        }
    }
    Ok(pairs)
}

/// A `Parameters` resource as name/value pairs (strings, instants,
/// references).
pub fn parameters(bytes: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request(
            "the body must be a Parameters resource",
        ));
    }
    let mut out = Vec::new();
    for p in v["parameter"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let value = [
            "valueString",
            "valueInstant",
            "valueDateTime",
            "valueCode",
            "valueUri",
            "valueUrl",
        ]
        .iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
        .map(str::to_owned)
        .or_else(|| {
            p.pointer("/valueReference/reference")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        match value {
            Some(v) => out.push((name, v)),
            None => {
                return Err(ApiError::bad_request(format!(
                    "parameter '{name}' has no value this operation takes"
                )))
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn kick_off(
    state: &AppState,
    method: &Method,
    uri: &axum::http::Uri,
    q: Option<String>,
    p: Option<&Principal>,
    headers: &HeaderMap,
    body: Body,
    patients: Option<Option<String>>,
) -> Result<Response, ApiError> {
    let jobs = jobs(state)?.clone();
    if !prefer(headers).respond_async {
        return Err(ApiError::bad_request(
            "$export runs asynchronously: send 'Prefer: respond-async'",
        ));
    }
    let pairs = params(state, method, q, body).await?;
    let base = base_url(state, headers);
    let readable = |t: &str| p.is_none_or(|p| p.scopes.allows(t, R));
    let mut level = match &patients {
        None => Level::System,
        Some(_) => Level::Patients(None),
    };
    if let Some(Some(gid)) = &patients {
        if !readable("Group") {
            return Err(ApiError::new(
                403,
                "forbidden",
                "exporting a Group needs scope system/Group.r",
            ));
        }
        let g = state
            .store
            .read("Group", gid)
            .await?
            .filter(|v| !v.deleted)
            .ok_or_else(|| ApiError::not_found(format!("Group/{gid} is not known")))?;
        level = Level::Patients(Some(group_members(g.body.as_deref().unwrap_or("{}"))?));
    }
    let spec = check(&pairs, level, &readable)?;
    let owner = owner_of(p);
    let request = format!("{base}{uri}");
    jobs.submit("export", &owner, request, &base, move |jobs, live, dir| {
        run(jobs, live, dir, &spec)
    })
}

/// The patients a Group names (`member.entity` references to Patients).
fn group_members(body: &str) -> Result<Vec<String>, ApiError> {
    let g: Value = serde_json::from_str(body).unwrap_or_default();
    let ids: Vec<String> = g["member"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.pointer("/entity/reference").and_then(Value::as_str))
        .filter_map(|r| r.strip_prefix("Patient/"))
        .map(str::to_owned)
        .collect();
    if ids.len() > PATIENTS_MAX {
        return Err(ApiError::new(
            400,
            "too-costly",
            format!(
                "the Group has {} members, more than PATIENTS_MAX ({PATIENTS_MAX})",
                ids.len()
            ),
        ));
    }
    Ok(ids)
}

/// Checks a kick-off's parameters; `readable` says which types the caller
/// may read (a type it may not is refused when asked for, left out when
/// not).
pub fn check(
    pairs: &[(String, String)],
    mut level: Level,
    readable: &dyn Fn(&str) -> bool,
) -> Result<Spec, ApiError> {
    let mut asked: Option<Vec<String>> = None;
    let mut since_ms = None;
    let mut raw_filters = Vec::new();
    let mut named_patients: Vec<String> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "_outputFormat" => {
                if !matches!(
                    v.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(ApiError::bad_request(format!(
                        "_outputFormat '{v}' is not served: use application/fhir+ndjson"
                    )));
                }
            }
            "_since" => {
                let (lo, _) = parse_range(v).filter(|(lo, _)| *lo >= 0).ok_or_else(|| {
                    ApiError::bad_request(format!("_since '{v}' is not an instant"))
                })?;
                since_ms = Some(lo as u64);
            }
            "_type" => {
                for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !is_resource_type(t) {
                        return Err(ApiError::bad_request(format!(
                            "_type '{t}' is not a resource type"
                        )));
                    }
                    asked.get_or_insert_with(Vec::new).push(t.to_owned());
                }
            }
            "_typeFilter" => {
                // several filters come as repeated parameters or comma-separated
                for f in v.split(',').filter(|f| !f.is_empty()) {
                    raw_filters.push(f.to_owned());
                }
            }
            "patient" => {
                if matches!(level, Level::System) {
                    return Err(ApiError::bad_request(
                        "'patient' is a parameter of Patient/$export and Group/[id]/$export",
                    ));
                }
                let id = v
                    .strip_prefix("Patient/")
                    .filter(|i| is_valid_id(i))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "patient '{v}' is not a reference Patient/[id]"
                        ))
                    })?;
                named_patients.push(id.to_owned());
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    "not-supported",
                    format!("$export has no parameter '{k}' here"),
                ))
            }
        }
    }
    if !named_patients.is_empty() {
        if named_patients.len() > PATIENTS_MAX {
            return Err(ApiError::new(
                400,
                "too-costly",
                format!("more than PATIENTS_MAX ({PATIENTS_MAX}) patients"),
            ));
        }
        level = match level {
            // within a Group: the named members only
            Level::Patients(Some(members)) => Level::Patients(Some(
                members
                    .into_iter()
                    .filter(|m| named_patients.contains(m))
                    .collect(),
            )),
            _ => Level::Patients(Some(named_patients)),
        };
    }
    let scope: Vec<&str> = match &level {
        Level::System => RESOURCE_TYPES.to_vec(),
        Level::Patients(_) => std::iter::once("Patient")
            .chain(spec::compartment_members("Patient").filter(|t| *t != "Patient"))
            .collect(),
    };
    let types: Vec<String> = match asked {
        Some(list) => {
            for t in &list {
                if !scope.contains(&t.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "{t} is not in the Patient compartment"
                    )));
                }
                if !readable(t) {
                    return Err(ApiError::new(
                        403,
                        "forbidden",
                        format!("exporting {t} needs scope system/{t}.r"),
                    ));
                }
            }
            list
        }
        None => scope
            .into_iter()
            .filter(|t| readable(t))
            .map(str::to_owned)
            .collect(),
    };
    if types.is_empty() {
        return Err(ApiError::new(
            403,
            "forbidden",
            "the caller may read no type to export",
        ));
    }
    if raw_filters.len() > TYPE_FILTERS_MAX {
        return Err(ApiError::new(
            400,
            "too-costly",
            format!("more than TYPE_FILTERS_MAX ({TYPE_FILTERS_MAX}) _typeFilter queries"),
        ));
    }
    let mut filters = Vec::new();
    for f in raw_filters {
        let (t, query) = f
            .split_once('?')
            .ok_or_else(|| ApiError::bad_request(format!("_typeFilter '{f}' is not Type?query")))?;
        if !types.iter().any(|x| x == t) {
            return Err(ApiError::bad_request(format!(
                "_typeFilter '{f}' names {t}, which this export does not include"
            )));
        }
        let q = SearchQuery::parse(Some(t), &query_pairs(Some(query)))
            .map_err(|e| ApiError::bad_request(format!("_typeFilter '{f}': {e}")))?;
        if !q.unsupported.is_empty() {
            return Err(ApiError::bad_request(format!(
                "_typeFilter '{f}': unsupported parameters {}",
                q.unsupported.join(", ")
            )));
        }
        if !q.includes.is_empty() || !q.revincludes.is_empty() || !q.sort.is_empty() {
            return Err(ApiError::bad_request(format!(
                "_typeFilter '{f}': _include, _revinclude and _sort do not apply to an export"
            )));
        }
        filters.push((t.to_owned(), q));
    }
    Ok(Spec {
        level,
        types,
        since_ms,
        filters,
    })
}

/// The compartment clause of one type at this level.
fn compartment(level: &Level, rtype: &str) -> Option<Clause> {
    let Level::Patients(ids) = level else {
        return None;
    };
    let params = spec::compartment_params("Patient", rtype).unwrap_or(&[]);
    Some(Clause::Compartment {
        target: ("Patient".into(), ids.clone().unwrap_or_default()),
        members: vec![(
            rtype.to_owned(),
            params.iter().map(|p| (*p).to_owned()).collect(),
        )],
        include_self: rtype == "Patient",
    })
}

/// One type's files: split at the configured size, each written as
/// `.part` and renamed when whole.
struct Files<'a> {
    dir: &'a Path,
    rtype: String,
    kind: &'a str,
    bytes_max: u64,
    open: Option<(BufWriter<File>, PathBuf, u64, u64)>,
    done: Vec<Output>,
}

impl Files<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.open.is_none() {
            let name = format!("{}{}-{}.ndjson", self.rtype, self.kind, self.done.len() + 1);
            let f = File::create(self.dir.join(format!("{name}.part")))?;
            self.open = Some((
                BufWriter::with_capacity(1 << 20, f),
                PathBuf::from(name),
                0,
                0,
            ));
        }
        let Some((w, _, bytes, count)) = self.open.as_mut() else {
            return Ok(());
        };
        w.write_all(line)?;
        w.write_all(b"\n")?;
        *bytes += line.len() as u64 + 1;
        *count += 1;
        if *bytes >= self.bytes_max {
            self.close()?;
        }
        Ok(())
    }

    /// Makes the open file whole: flushed, synced, renamed.
    fn close(&mut self) -> std::io::Result<()> {
        if let Some((w, name, _, count)) = self.open.take() {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let name = name.to_string_lossy().into_owned();
            std::fs::rename(self.dir.join(format!("{name}.part")), self.dir.join(&name))?;
            self.done.push(Output {
                rtype: if self.kind.is_empty() {
                    self.rtype.clone()
                } else {
                    "Bundle".into()
                },
                file: Some(name),
                count,
                input_url: None,
            });
        }
        Ok(())
    }
}

fn cancelled(live: &Live) -> Result<(), Failure> {
    if live.cancelled() {
        return Err(Failure(499, "cancelled".into()));
    }
    Ok(())
}

/// The export job: every type's current resources at the log cut, then
/// (with `_since`) what was deleted since.
pub fn run(jobs: &Jobs, live: &Live, dir: &Path, spec: &Spec) -> Result<(), Failure> {
    let rt = tokio::runtime::Handle::current();
    let store = jobs.store.clone();
    let mark: LogMark = rt.block_on(store.mark())?;
    live.update(|j| j.transaction_ms = Some(mark.at_ms));
    let mut exported: u64 = 0;
    for (n, rtype) in spec.types.iter().enumerate() {
        cancelled(live)?;
        live.update(|j| {
            j.progress = format!(
                "{rtype} ({} of {} types), {exported} resources so far",
                n + 1,
                spec.types.len()
            )
        });
        let mut files = Files {
            dir,
            rtype: rtype.clone(),
            kind: "",
            bytes_max: jobs.cfg.file_bytes_max,
            open: None,
            done: Vec::new(),
        };
        let filters: Vec<&SearchQuery> = spec
            .filters
            .iter()
            .filter(|(t, _)| t == rtype)
            .map(|(_, q)| q)
            .collect();
        let queries: Vec<SearchQuery> = if filters.is_empty() {
            vec![base_query(rtype, spec, mark, None)]
        } else {
            filters
                .iter()
                .map(|f| base_query(rtype, spec, mark, Some(f)))
                .collect()
        };
        for k in 0..queries.len() {
            let mut q = queries[k].clone();
            loop {
                cancelled(live)?;
                let page = rt.block_on(store.search(q.clone()))?;
                for v in &page.items {
                    // a resource several filters match is written once: by the first
                    let mut earlier = false;
                    for e in &queries[..k] {
                        if rt.block_on(store.version_matches(e.clone(), v.seq))? {
                            earlier = true;
                            break;
                        }
                    }
                    if earlier {
                        continue;
                    }
                    if let Some(b) = &v.body {
                        files.write(b.as_bytes())?;
                        exported += 1;
                    }
                }
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
        }
        files.close()?;
        let done = std::mem::take(&mut files.done);
        live.update(|j| j.output.extend(done));
        if let Some(since) = spec.since_ms {
            deleted(jobs, live, dir, spec, rtype, mark, since)?;
        }
    }
    live.update(|j| j.progress = format!("{exported} resources"));
    tracing::info!(resources = exported, snapshot = mark.seq, "export written");
    Ok(())
}

/// A type's deletions since `since` as Bundles of one DELETE entry each.
fn deleted(
    jobs: &Jobs,
    live: &Live,
    dir: &Path,
    spec: &Spec,
    rtype: &str,
    mark: LogMark,
    since: u64,
) -> Result<(), Failure> {
    let rt = tokio::runtime::Handle::current();
    let mut files = Files {
        dir,
        rtype: rtype.to_owned(),
        kind: "-deleted",
        bytes_max: jobs.cfg.file_bytes_max,
        open: None,
        done: Vec::new(),
    };
    let mut q = DeletedQuery {
        rtype: rtype.to_owned(),
        snapshot: mark.seq,
        since_ms: since,
        after: 0,
        count: PAGE,
        compartment: compartment(&spec.level, rtype),
    };
    loop {
        cancelled(live)?;
        let page = rt.block_on(jobs.store.deleted(q.clone()))?;
        for (t, id, _) in &page {
            let b = json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"request": {"method": "DELETE", "url": format!("{t}/{id}")}}]
            });
            files.write(b.to_string().as_bytes())?;
        }
        match page.last() {
            Some((_, _, seq)) if page.len() == PAGE => q.after = *seq,
            _ => break,
        }
    }
    files.close()?;
    let done = files.done;
    live.update(|j| j.deleted.extend(done));
    Ok(())
}

/// The search of one type's resources at the cut, in change-log order.
fn base_query(
    rtype: &str,
    spec: &Spec,
    mark: LogMark,
    filter: Option<&SearchQuery>,
) -> SearchQuery {
    let mut pairs = Vec::new();
    if let Some(s) = spec.since_ms {
        pairs.push((
            "_lastUpdated".to_owned(),
            format!("ge{}", format_instant(s)),
        ));
    }
    let mut q = SearchQuery::parse(Some(rtype), &pairs)
        .unwrap_or_else(|_| SearchQuery::parse(Some(rtype), &[]).expect("an empty search parses"));
    if let Some(f) = filter {
        q.clauses.extend(f.clauses.iter().cloned());
    }
    q.clauses.extend(compartment(&spec.level, rtype));
    q.count = PAGE;
    q.snapshot = Some(mark.seq);
    q.total = TotalMode::None;
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_of_a_kick_off_are_refused_by_name() {
        let all = |_: &str| true;
        let many: Vec<(String, String)> = (0..=TYPE_FILTERS_MAX)
            .map(|_| ("_typeFilter".to_owned(), "Patient?gender=female".to_owned()))
            .collect();
        let e = check(&many, Level::System, &all).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(
            e.diagnostics.contains("TYPE_FILTERS_MAX"),
            "{}",
            e.diagnostics
        );
        let patients: Vec<(String, String)> = (0..=PATIENTS_MAX)
            .map(|i| ("patient".to_owned(), format!("Patient/p{i}")))
            .collect();
        let e = check(&patients, Level::Patients(None), &all).unwrap_err();
        assert!(e.diagnostics.contains("PATIENTS_MAX"), "{}", e.diagnostics);
        let body = json!({"resourceType": "Group", "member": (0..=PATIENTS_MAX)
            .map(|i| json!({"entity": {"reference": format!("Patient/p{i}")}})).collect::<Vec<_>>()});
        let e = group_members(&body.to_string()).unwrap_err();
        assert!(e.diagnostics.contains("PATIENTS_MAX"), "{}", e.diagnostics);
        // within limits: the filters parse, the types follow the scopes
        let ok = check(
            &pairs(&[
                ("_typeFilter", "Observation?status=final"),
                ("_since", "2026-01-01"),
            ]),
            Level::System,
            &|t| t != "Condition",
        )
        .unwrap();
        assert_eq!(ok.filters.len(), 1);
        assert!(!ok.types.iter().any(|t| t == "Condition"));
        assert!(ok.since_ms.is_some());
    }
}
