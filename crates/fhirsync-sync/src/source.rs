//! Reading resources from a source into a bounded channel, so any size
//! streams through in constant memory: a server's types page by page, a
//! search URL's pages, a list of ids, or a directory's files.

use std::io::{BufRead, BufReader};
use std::path::Path;

use fhirsync_core::resource::is_resource_type;
use serde_json::{Map, Value};
use tokio::sync::mpsc::Sender;

use crate::client::FhirClient;
use crate::files::{collect_files, is_ndjson, split_file, FilePart};
use crate::options::PAGE_COUNT;
use crate::SyncError;

/// One unit of work for a target.
#[derive(Debug, Clone)]
pub enum Item {
    Resource {
        rtype: String,
        id: Option<String>,
        res: Map<String, Value>,
        origin: String,
    },
    /// A Bundle to POST to the base (transaction or batch).
    Bundle {
        res: Map<String, Value>,
        origin: String,
    },
    Delete {
        rtype: String,
        id: String,
        origin: String,
    },
}

impl Item {
    pub fn rtype(&self) -> &str {
        match self {
            Item::Resource { rtype, .. } | Item::Delete { rtype, .. } => rtype,
            Item::Bundle { .. } => "Bundle",
        }
    }
    pub fn origin(&self) -> &str {
        match self {
            Item::Resource { origin, .. }
            | Item::Bundle { origin, .. }
            | Item::Delete { origin, .. } => origin,
        }
    }
    /// `Type/id` when the item names one resource.
    pub fn key(&self) -> Option<String> {
        match self {
            Item::Resource {
                rtype,
                id: Some(id),
                ..
            }
            | Item::Delete { rtype, id, .. } => Some(format!("{rtype}/{id}")),
            _ => None,
        }
    }

    /// A resource read from anywhere; Bundles become transactions when asked.
    pub fn from_resource(
        res: Map<String, Value>,
        origin: String,
        bundles_as_tx: bool,
    ) -> Result<Item, String> {
        let rtype = checked_type(res.get("resourceType").and_then(Value::as_str))?;
        if rtype == "Bundle" && bundles_as_tx {
            let mut res = res;
            res.insert("type".into(), Value::String("transaction".into()));
            return Ok(Item::Bundle { res, origin });
        }
        let id = res.get("id").and_then(Value::as_str).map(str::to_owned);
        Ok(Item::Resource {
            rtype,
            id,
            res,
            origin,
        })
    }
}

/// A resource's `resourceType`, refused when absent or not an R4 type.
pub fn checked_type(t: Option<&str>) -> Result<String, String> {
    match t {
        Some(t) if is_resource_type(t) => Ok(t.to_owned()),
        Some(t) => Err(format!("unknown resourceType '{t}'")),
        None => Err("no resourceType".into()),
    }
}

/// Types that describe servers and terminologies rather than data; not
/// synced unless named with `-r`.
pub const INFRASTRUCTURE: &[&str] = &[
    "CapabilityStatement",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "ExampleScenario",
    "GraphDefinition",
    "ImplementationGuide",
    "MessageDefinition",
    "NamingSystem",
    "OperationDefinition",
    "OperationOutcome",
    "Parameters",
    "SearchParameter",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "TerminologyCapabilities",
    "TestScript",
    "TestReport",
    "ValueSet",
];

/// Whether a resource describes the server rather than data: an
/// infrastructure type, or a `Basic` that stands in for an R5
/// SubscriptionTopic (the R4 Subscriptions Backport). Servers make these
/// themselves; syncing them would fight the server.
pub fn is_infrastructure(res: &Map<String, Value>) -> bool {
    let t = res
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    if INFRASTRUCTURE.contains(&t) {
        return true;
    }
    t == "Basic"
        && ["extension", "modifierExtension"].iter().any(|k| {
            res.get(*k).and_then(Value::as_array).is_some_and(|a| {
                a.iter().any(|e| {
                    e["url"]
                        .as_str()
                        .is_some_and(|u| u.contains("/extension-SubscriptionTopic."))
                })
            })
        })
}

/// Types read first, so that reference targets tend to arrive before the
/// resources that point to them.
pub const FIRST: &[&str] = &[
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "RelatedPerson",
    "Group",
    "Device",
    "Medication",
    "Substance",
    "Encounter",
    "EpisodeOfCare",
];

/// The types to read from a server: `requested` in its order, or all the
/// server supports minus infrastructure, reference targets first.
pub async fn server_types(
    client: &FhirClient,
    requested: &[String],
) -> Result<Vec<String>, SyncError> {
    if !requested.is_empty() {
        return Ok(requested.to_vec());
    }
    let meta = client.get_json("metadata").await?;
    let mut supported: Vec<String> = meta["rest"][0]["resource"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Servers leave types out of their statements; every R4 type is tried
    // (the statement's first), and one the server cannot search is skipped.
    for t in fhirsync_core::resource::RESOURCE_TYPES {
        if !supported.iter().any(|s| s == t) {
            supported.push(t.to_string());
        }
    }
    supported.retain(|t| is_resource_type(t) && !INFRASTRUCTURE.contains(&t.as_str()));
    let mut out: Vec<String> = FIRST
        .iter()
        .filter(|f| supported.iter().any(|s| s == *f))
        .map(|s| s.to_string())
        .collect();
    out.extend(
        supported
            .into_iter()
            .filter(|s| !FIRST.contains(&s.as_str())),
    );
    Ok(out)
}

/// How a search went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Searched {
    Read,
    /// The server refused the first page (400/404/405/501): it does not
    /// search this type.
    NotSupported,
}

/// Pages of one search a reader follows at most: a server whose `next`
/// links never end fails the read here.
pub const SEARCH_PAGES_MAX: u64 = 10_000_000;

/// The `next` links of one search as a reader follows them. A link back to
/// a page already read (the server's paging loops) and a search longer
/// than [`SEARCH_PAGES_MAX`] pages fail the read: ending it quietly would
/// pass a part of the server for the whole (and COMPARE would delete the
/// rest on the target). Loops are found in constant memory (Brent's
/// method: the link is compared with one page kept, which moves on after
/// 1, 2, 4, ... pages), at most twice the loop's length after it starts.
pub struct PageTrail {
    kept: String,
    power: u64,
    steps: u64,
    pages: u64,
    max: u64,
}

impl PageTrail {
    /// A trail that starts with the page at `first`.
    pub fn new(first: &str) -> Self {
        Self::with_max(first, SEARCH_PAGES_MAX)
    }

    fn with_max(first: &str, max: u64) -> Self {
        PageTrail {
            kept: first.to_owned(),
            power: 1,
            steps: 0,
            pages: 1,
            max,
        }
    }

    /// The page to read after the one at `url`, whose `next` link is
    /// `next`; `None` at the end of the search.
    pub fn follow(&mut self, url: &str, next: Option<&str>) -> Result<Option<String>, SyncError> {
        let Some(next) = next else { return Ok(None) };
        let stop = |reason: String| SyncError::Http {
            url: url.to_owned(),
            reason,
        };
        if next == url || next == self.kept {
            return Err(stop(format!(
                "its next link leads back to a page already read ({next}): the server's paging loops"
            )));
        }
        if self.pages >= self.max {
            return Err(stop(format!(
                "the search has more than SEARCH_PAGES_MAX ({}) pages",
                self.max
            )));
        }
        self.pages += 1;
        self.steps += 1;
        if self.steps == self.power {
            next.clone_into(&mut self.kept);
            self.power *= 2;
            self.steps = 0;
        }
        Ok(Some(next.to_owned()))
    }
}

/// Every page of a search, from `first`; resources that matched are sent
/// (server infrastructure is left out, see [`is_infrastructure`]). The next
/// page is requested while this one's resources are handed on, so the
/// server builds it while the reader's consumers work.
pub async fn read_search(
    client: &FhirClient,
    first: &str,
    tx: &Sender<Item>,
    bundles_as_tx: bool,
    mut on_page: impl FnMut(&Item),
) -> Result<Searched, SyncError> {
    let mut url = first.to_owned();
    let mut reply = client.send(reqwest::Method::GET, &url, None).await?;
    let mut trail = PageTrail::new(first);
    let mut first_page = true;
    loop {
        if first_page && matches!(reply.status, 400 | 404 | 405 | 501) {
            return Ok(Searched::NotSupported);
        }
        if !(200..300).contains(&reply.status) {
            return Err(crate::client::status_error(
                &client.url(&url),
                reply.status,
                &reply.body,
            ));
        }
        let mut b = reply.body;
        if b["resourceType"] != "Bundle" {
            return Err(SyncError::Http {
                url,
                reason: "the answer is not a Bundle".into(),
            });
        }
        first_page = false;
        let next = trail.follow(
            &url,
            b["link"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
                .and_then(|l| l["url"].as_str()),
        )?;
        let entries = match b.get_mut("entry").map(Value::take) {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        let hand_on = async {
            for mut e in entries {
                let mode = e["search"]["mode"].as_str().unwrap_or("match");
                if mode != "match" {
                    continue;
                }
                let origin = e["fullUrl"].as_str().unwrap_or(&url).to_owned();
                let Some(Value::Object(res)) = e.get_mut("resource").map(Value::take) else {
                    continue;
                };
                if is_infrastructure(&res) {
                    continue;
                }
                let item = Item::from_resource(res, origin, bundles_as_tx).map_err(|reason| {
                    SyncError::Http {
                        url: url.clone(),
                        reason,
                    }
                })?;
                on_page(&item);
                if tx.send(item).await.is_err() {
                    return Ok(false); // the run is stopping
                }
            }
            Ok::<bool, SyncError>(true)
        };
        let fetch_next = async {
            match &next {
                Some(n) => Some(client.send(reqwest::Method::GET, n, None).await),
                None => None,
            }
        };
        let (handed_on, fetched) = tokio::join!(hand_on, fetch_next);
        match (handed_on?, next, fetched) {
            (true, Some(n), Some(r)) => {
                url = n;
                reply = r?;
            }
            _ => return Ok(Searched::Read),
        }
    }
}

pub fn type_url(rtype: &str) -> String {
    // No total: counting is costly on big servers and not needed here.
    format!("{rtype}?_count={PAGE_COUNT}&_total=none")
}

/// Parses a directory's files into items; `tx` is fed with blocking sends
/// (run this on a blocking thread). An error names the file and line.
pub fn read_directory(
    dir: &Path,
    tx: Option<&Sender<Item>>,
    bundles_as_tx: bool,
) -> Result<u64, SyncError> {
    let files = collect_files(&[dir.to_path_buf()])?;
    if files.is_empty() {
        return Err(SyncError::File {
            path: dir.display().to_string(),
            reason: "no .json or .ndjson files".into(),
        });
    }
    let mut n = 0u64;
    let mut emit = |item: Item| -> bool {
        n += 1;
        match tx {
            Some(tx) => tx.blocking_send(item).is_ok(),
            None => true,
        }
    };
    for f in files {
        let name = f.display().to_string();
        let bad = |line: usize, reason: String| SyncError::File {
            path: format!("{name}:{line}"),
            reason,
        };
        if is_ndjson(&f) {
            let file = std::fs::File::open(&f).map_err(|e| bad(0, e.to_string()))?;
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| bad(i + 1, e.to_string()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let res = parse_object(line.as_bytes()).map_err(|e| bad(i + 1, e))?;
                let item = Item::from_resource(res, format!("{name}:{}", i + 1), bundles_as_tx)
                    .map_err(|e| bad(i + 1, e))?;
                if !emit(item) {
                    return Ok(n);
                }
            }
        } else {
            let bytes = std::fs::read(&f).map_err(|e| bad(0, e.to_string()))?;
            let res = parse_object(&bytes).map_err(|e| bad(1, e))?;
            for item in file_items(res, &name, bundles_as_tx).map_err(|e| bad(1, e))? {
                if !emit(item) {
                    return Ok(n);
                }
            }
        }
    }
    Ok(n)
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// The items of a `.json` file (see [`crate::files::split_file`]).
fn file_items(
    res: Map<String, Value>,
    name: &str,
    bundles_as_tx: bool,
) -> Result<Vec<Item>, String> {
    split_file(res, bundles_as_tx)?
        .into_iter()
        .map(|part| match part {
            FilePart::Bundle(res) => Ok(Item::Bundle {
                res,
                origin: name.to_owned(),
            }),
            FilePart::Resource { res, entry: None } => {
                Item::from_resource(res, name.to_owned(), bundles_as_tx)
            }
            FilePart::Resource {
                res,
                entry: Some(i),
            } => Item::from_resource(res, format!("{name} entry {i}"), false)
                .map_err(|m| format!("entry {i}: {m}")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::PageTrail;

    /// Follows `links` (page → its next link) from page 0 until the end or
    /// a refusal; returns the pages read and the refusal.
    fn walk(links: &[Option<usize>], max: u64) -> (Vec<usize>, Option<String>) {
        let name = |i: usize| format!("http://server/page{i}");
        let mut trail = PageTrail::with_max(&name(0), max);
        let (mut read, mut at) = (vec![0], 0);
        loop {
            let next = links[at].map(name);
            match trail.follow(&name(at), next.as_deref()) {
                Ok(None) => return (read, None),
                Ok(Some(n)) => {
                    at = n.trim_start_matches("http://server/page").parse().unwrap();
                    read.push(at);
                }
                Err(e) => return (read, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn a_search_ends_where_its_links_end() {
        let links: Vec<Option<usize>> = (1..=50).map(Some).chain([None]).collect();
        assert_eq!(walk(&links, 1000), ((0..=50).collect(), None));
    }

    #[test]
    fn links_that_loop_fail_the_read_soon_after_the_loop_starts() {
        // A page that names itself, and loops of 2 and 7 pages after 3 good ones.
        let (read, e) = walk(&[Some(1), Some(1)], 1000);
        assert_eq!(read, [0, 1]);
        assert!(e.unwrap().contains("the server's paging loops"));
        for len in [2, 7] {
            let mut links: Vec<Option<usize>> = (1..3 + len).map(Some).collect();
            links.push(Some(3));
            let (read, e) = walk(&links, 1000);
            assert!(e.unwrap().contains("leads back to a page already read"));
            assert!(read.len() <= 3 + 2 * len + 2, "{len}: {read:?}");
        }
    }

    #[test]
    fn a_search_longer_than_its_page_limit_fails() {
        let links: Vec<Option<usize>> = (1..=50).map(Some).chain([None]).collect();
        let (read, e) = walk(&links, 10);
        assert_eq!(read.len(), 10);
        assert!(e.unwrap().contains("more than SEARCH_PAGES_MAX (10) pages"));
    }
}
