//! The entry points of fhirsync's fuzz targets (`fuzz/`), one function per
//! parser of outside input. Each takes arbitrary bytes and must return
//! without panicking, overflowing its stack or running away: a refusal is
//! an ordinary outcome. The regression test replays every input kept in
//! `fuzz/regressions/<target>/` through the same functions, so a crash a
//! fuzzer found stays fixed in the normal suite.

use std::sync::OnceLock;

use fhirsync_core::fhirpath::{self, Env};
use fhirsync_core::resource::{check_resource, parse_client_resource, parse_resource};
use fhirsync_core::search::SearchQuery;
use fhirsync_db::binlog::Position;
use fhirsync_db::display;
use fhirsync_db::record::Batch;
use fhirsync_db::schema::{Column, Table};
use fhirsync_db::tz::{convert, epoch_to_utc, Zone};
use fhirsync_store::sqlite::{SqliteConfig, SqliteStore, SyncMode};
use fhirsync_store::{Prepared, RemoteVersion, Store, WriteRequest};
use serde_json::{json, Value};

/// A target: arbitrary bytes in, nothing out (a crash is the finding).
pub type Target = fn(&[u8]);

/// The targets, by the name of their folder in `fuzz/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("fhirpath", fhirpath_eval),
    ("ingest", ingest),
    ("bundle", bundle),
    ("search", search),
    ("change_record", change_record),
    ("db_batch", db_batch),
    ("bulk_params", bulk_params),
    ("merge", merge),
    ("sync_page", sync_page),
];

/// The resource FHIRPath expressions are evaluated on.
fn patient() -> &'static Value {
    static P: OnceLock<Value> = OnceLock::new();
    P.get_or_init(|| {
        json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
               "birthDate": "1980-05-01", "deceasedBoolean": false,
               "meta": {"versionId": "3", "lastUpdated": "2026-01-02T03:04:05.678Z"},
               "identifier": [{"system": "urn:oid:1.2.3", "value": "12345"}],
               "name": [{"use": "official", "family": "Otieno", "given": ["Akinyi", "B"]},
                        {"text": "Aki", "_given": [{"extension": [{"url": "x", "valueString": "y"}]}]}],
               "telecom": [{"system": "phone", "value": "+254 700 000000", "rank": 1}],
               "address": [{"city": "Kisumu", "line": ["1 Oginga Odinga St"], "period": {"start": "2020-01-01"}},
                           {"city": "Nairobi"}],
               "multipleBirthInteger": 2,
               "extension": [{"url": "http://example.org/weight",
                              "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}],
               "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}]}]})
    })
}

/// FHIRPath text: parsed (with its limits), then evaluated on a patient,
/// with `%current`/`%previous` as subscription topics have them.
pub fn fhirpath_eval(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(e) = fhirpath::parse(text) else {
        return;
    };
    let p = patient();
    let mut env = Env::new();
    env.set("current", Some(p)).set("previous", Some(p));
    if let Ok(r) = fhirpath::evaluate(&e, p, &env) {
        let _ = fhirpath::truth(&r);
    }
}

/// A client's resource as a create or update takes it: JSON → FHIR's
/// JSON rules → type and id checks → structural validation (its report
/// bounded) → the stored form, indexed.
pub fn ingest(data: &[u8]) {
    let Ok(res) = parse_client_resource(data) else {
        return;
    };
    let Ok(rtype) = check_resource(&res, None) else {
        return;
    };
    let issues = fhirsync_core::validate::validate_object(&res);
    assert!(issues.len() <= fhirsync_core::validate::ISSUES_MAX);
    let p = Prepared::new(rtype, res);
    let body = p.body(
        p.body_id().unwrap_or("new-id"),
        1,
        "2026-01-02T03:04:05.678Z",
    );
    let back = parse_resource(body.as_bytes()).expect("the stored form is JSON");
    check_resource(&back, None).expect("the stored form is a resource");
}

struct Node {
    rt: tokio::runtime::Runtime,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

/// One store for all inputs of a run (opening one per input would be all
/// the fuzzer measures).
fn node() -> &'static Node {
    static N: OnceLock<Node> = OnceLock::new();
    N.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = SqliteConfig::new(SqliteStore::db_path(dir.path()));
        cfg.node_id = Some("fuzz".into());
        cfg.sync = SyncMode::Normal;
        let store = SqliteStore::open(cfg).expect("open the store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Node {
            rt,
            store,
            _dir: dir,
        }
    })
}

/// A transaction or batch Bundle, as `POST /fhir` runs it, against a
/// SQLite store in a temporary directory.
pub fn bundle(data: &[u8]) {
    let Ok(res) = parse_client_resource(data) else {
        return;
    };
    if check_resource(&res, Some("Bundle")).is_err() {
        return;
    }
    let n = node();
    let Ok(planned) = fhirsync_store::bundle::plan(res) else {
        return;
    };
    let _ = n.rt.block_on(n.store.write(WriteRequest::Bundle(planned)));
}

/// A search's query string, for a type and for the whole system; what is
/// accepted renders a query string that parses again.
pub fn search(data: &[u8]) {
    let Ok(qs) = std::str::from_utf8(data) else {
        return;
    };
    for rtype in [Some("Patient"), None] {
        if let Ok(q) = SearchQuery::parse_query_string(rtype, qs) {
            let again = q.to_query_string();
            SearchQuery::parse_query_string(rtype, &again).expect("a rendered query parses");
        }
    }
}

/// A change record as `$apply` and NATS carry it (a Bundle entry with the
/// sync-metadata extension), and the resource it holds as the replica
/// stores it; read from its text and from its tree, the same record.
pub fn change_record(data: &[u8]) {
    // as a NATS subscriber reads a message
    let strict = fhirsync_core::validate::Mode::Strict;
    let read = RemoteVersion::from_payloads(&[data], strict);
    let Some(Ok(v)) = read.into_iter().next() else {
        return;
    };
    // as anti-entropy and a dead letter's retry read it (a tree): where
    // both read the record, they read the same one
    if let Ok(tree) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(t) = RemoteVersion::from_entry(&tree, strict) {
            assert_eq!(
                (&t.rtype, &t.id, t.seq, &t.origin),
                (&v.rtype, &v.id, v.seq, &v.origin)
            );
            assert_eq!(
                (t.vv.to_json(), t.hlc, t.hash()),
                (v.vv.to_json(), v.hlc, v.hash())
            );
        }
    }
    if let Some(p) = &v.res {
        let body = p.body(&v.id, 1, "2026-01-02T03:04:05.678Z");
        parse_resource(body.as_bytes()).expect("the stored form is JSON");
    }
}

/// A db-sender batch as the receiver decodes it (HTTP body or NATS
/// message): zones, positions, and every value through the conversions a
/// column type asks for.
pub fn db_batch(data: &[u8]) {
    let Ok(b) = serde_json::from_slice::<Batch>(data) else {
        return;
    };
    let from = Zone::parse(&b.time_zone).unwrap_or(Zone::UTC);
    let to = Zone::parse("Africa/Nairobi").expect("a zone");
    let _ = Position::parse(&b.end);
    let columns: Vec<Column> = [
        "datetime",
        "timestamp",
        "int",
        "bigint",
        "double",
        "enum",
        "date",
        "varchar",
    ]
    .iter()
    .map(|t| Column {
        name: (*t).into(),
        data_type: (*t).into(),
        enum_values: if *t == "enum" {
            vec!["a".into(), "b".into()]
        } else {
            Vec::new()
        },
    })
    .collect();
    let table = Table {
        name: "t".into(),
        columns: columns.clone(),
        pk: Some("id".into()),
        has_uuid: true,
        fks: Vec::new(),
    };
    for c in &b.changes {
        let _ = c.at.as_deref().map(Position::parse);
        let _ = display::row(&table, &c.row, from, to);
        for v in c.row.values() {
            if let Some(s) = v.as_str() {
                let _ = convert(s, from, to);
                let _ = epoch_to_utc(s);
            }
            for col in &columns {
                let _ = display::value(col, v, from, to);
            }
        }
    }
}

/// The parameters of bulk data: an `$export` kick-off's query at each
/// level (with a caller that may not read Observations), and a
/// `Parameters` body as `$export` (POST) and `$import` read it.
pub fn bulk_params(data: &[u8]) {
    use fhirsync_api::bulk::{export, import};
    if let Ok(qs) = std::str::from_utf8(data) {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(qs.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        for level in [
            export::Level::System,
            export::Level::Patients(None),
            export::Level::Patients(Some(vec!["p1".into()])),
        ] {
            let _ = export::check(&pairs, level, &|t| t != "Observation");
        }
    }
    let _ = export::parameters(data);
    let _ = import::parse(data);
}

/// The three-way merge of a conflict's sides as peers send them: a JSON
/// array `[ancestor, local, remote]` of objects. Merging either way round
/// gives the same result (the same bytes, or a clash at the same path).
pub fn merge(data: &[u8]) {
    let Ok(Value::Array(sides)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let [Value::Object(o), Value::Object(a), Value::Object(b)] = sides.as_slice() else {
        return;
    };
    let ab = fhirsync_core::merge::merge3(o.clone(), a.clone(), b.clone());
    let ba = fhirsync_core::merge::merge3(o.clone(), b.clone(), a.clone());
    match (ab, ba) {
        (Ok(x), Ok(y)) => assert_eq!(
            Value::Object(x.resource).to_string(),
            Value::Object(y.resource).to_string(),
            "a merge is symmetric"
        ),
        (Err(x), Err(y)) => assert_eq!(x.path, y.path, "a clash is found either way"),
        (x, y) => panic!("merged one way only: {x:?} / {y:?}"),
    }
}

/// What `fhirsync sync -m COMPARE` reads from a server as text: a search
/// page (its entries' resources hashed without being parsed into values)
/// and one resource's canonical hash. Any JSON object has a hash.
pub fn sync_page(data: &[u8]) {
    let _ = fhirsync_sync::compare::page_keys(data);
    let hashed = fhirsync_sync::canonical::hash_text(data);
    if let Ok(Value::Object(_)) = serde_json::from_slice::<Value>(data) {
        hashed.expect("a JSON object has a canonical hash");
    }
}
