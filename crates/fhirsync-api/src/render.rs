//! Turning stored versions into HTTP responses and Bundles. Stored JSON is
//! spliced into responses as it is, never re-parsed.

use axum::http::{header, HeaderValue};
use axum::response::Response;
use fhirsync_core::instant::{format_http_date, format_instant};
use fhirsync_store::StoredVersion;
use serde_json::{json, Value};

use crate::error::outcome;
use crate::http::{fhir_json, status_text, with_status, Return};

pub fn etag(v: &StoredVersion) -> String {
    format!("W/\"{}\"", v.vid)
}

/// `ETag` and `Last-Modified` of a version.
pub fn set_version_headers(r: &mut Response, v: &StoredVersion) {
    let h = r.headers_mut();
    if let Ok(e) = HeaderValue::from_str(&etag(v)) {
        h.insert(header::ETAG, e);
    }
    if let Ok(d) = HeaderValue::from_str(&format_http_date(v.last_updated_ms)) {
        h.insert(header::LAST_MODIFIED, d);
    }
}

pub fn version_url(base: &str, v: &StoredVersion) -> String {
    format!("{base}/{}/{}/_history/{}", v.rtype, v.id, v.vid)
}

/// A response for one resource version after a read or write.
pub fn resource_response(
    v: &StoredVersion,
    status: u16,
    base: &str,
    location: bool,
    ret: Return,
    info: &str,
) -> Response {
    let mut r = match (ret, &v.body) {
        (Return::Representation, Some(b)) => fhir_json(b.to_string()),
        (Return::OperationOutcome, _) => {
            fhir_json(outcome("information", "informational", info).to_string())
        }
        _ => Response::new(axum::body::Body::empty()),
    };
    r = with_status(r, status);
    set_version_headers(&mut r, v);
    if location {
        if let Ok(l) = HeaderValue::from_str(&version_url(base, v)) {
            r.headers_mut().insert(header::LOCATION, l);
        }
    }
    r
}

/// Writes a Bundle as text, entry by entry.
pub struct BundleBuilder {
    out: String,
    entries: usize,
}

impl BundleBuilder {
    /// `extension`: Bundle-level extensions (or `Value::Null`).
    pub fn new(
        btype: &str,
        total: Option<u64>,
        links: &[(&str, String)],
        extension: Value,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut head = json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "meta": {"lastUpdated": format_instant(now)},
        });
        if !extension.is_null() {
            head["extension"] = extension;
        }
        head["type"] = json!(btype);
        if let Some(t) = total {
            head["total"] = json!(t);
        }
        if !links.is_empty() {
            head["link"] = links
                .iter()
                .map(|(rel, url)| json!({"relation": rel, "url": url}))
                .collect();
        }
        let mut out = head.to_string();
        out.pop(); // the closing brace
        out.push_str(",\"entry\":[");
        BundleBuilder { out, entries: 0 }
    }

    /// Adds an entry: `fullUrl`, the raw resource JSON, then the members of
    /// `rest` (an object: `search`, `request`, `response`, ...).
    pub fn entry(
        &mut self,
        extension: Option<Value>,
        full_url: Option<&str>,
        resource: Option<&str>,
        rest: Value,
    ) {
        if self.entries > 0 {
            self.out.push(',');
        }
        self.entries += 1;
        self.out.push('{');
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !first {
                out.push(',');
            }
            first = false;
        };
        if let Some(e) = extension {
            sep(&mut self.out);
            self.out.push_str("\"extension\":");
            self.out.push_str(&e.to_string());
        }
        if let Some(u) = full_url {
            sep(&mut self.out);
            self.out.push_str("\"fullUrl\":");
            self.out.push_str(&Value::String(u.to_owned()).to_string());
        }
        if let Some(r) = resource {
            sep(&mut self.out);
            self.out.push_str("\"resource\":");
            self.out.push_str(r);
        }
        if let Value::Object(m) = rest {
            for (k, v) in m {
                sep(&mut self.out);
                self.out.push_str(&Value::String(k).to_string());
                self.out.push(':');
                self.out.push_str(&v.to_string());
            }
        }
        self.out.push('}');
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("]}");
        self.out
    }
}

/// `request` and `response` of a history entry.
pub fn history_rest(v: &StoredVersion) -> Value {
    let url = match v.method {
        fhirsync_store::Method::Post => v.rtype.clone(),
        _ => format!("{}/{}", v.rtype, v.id),
    };
    let status = match (v.deleted, v.vid) {
        (true, _) => 204,
        (false, 1) => 201,
        _ => 200,
    };
    json!({
        "request": {"method": v.method.as_str(), "url": url},
        "response": {
            "status": status_text(status),
            "etag": etag(v),
            "lastModified": format_instant(v.last_updated_ms),
        }
    })
}

pub fn full_url(base: &str, v: &StoredVersion) -> String {
    format!("{base}/{}/{}", v.rtype, v.id)
}
