//! Reading a store's active `SearchParameter` resources and putting them in
//! force as custom search parameters (at open and after one is written).

use fhirsync_core::index::custom::{self, Definition};
use serde_json::Value;

use super::{all, Db};
use crate::StoreError;

/// Reads the current `SearchParameter`s of the store and sets them as the
/// custom parameters of `source`. A definition that cannot be served is
/// logged and left out; it never stops the store.
pub fn load(db: &dyn Db, source: &str) {
    let defs = match read(db) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the stored SearchParameters");
            return;
        }
    };
    let n = defs.len();
    for problem in custom::set(source, defs) {
        tracing::warn!(%problem, "a custom search parameter is not in force");
    }
    if n > 0 {
        tracing::info!(parameters = n, "custom search parameters in force");
    }
}

/// Takes the parameters of a store that closed out of force.
pub fn forget(source: &str) {
    custom::set(source, Vec::new());
}

fn read(db: &dyn Db) -> Result<Vec<Definition>, StoreError> {
    let rows = all(
        db,
        "SELECT id, body FROM versions
         WHERE type = 'SearchParameter' AND superseded IS NULL AND body IS NOT NULL",
        &[],
        |r| Ok((r.text(0)?, r.text(1)?)),
    )?;
    let mut defs = Vec::new();
    for (id, body) in rows {
        let Ok(v) = serde_json::from_str::<Value>(&body) else {
            continue;
        };
        match Definition::from_resource(&v) {
            Ok(Some(d)) => defs.push(d),
            Ok(None) => {}
            Err(problem) => {
                tracing::warn!(id, %problem, "a stored SearchParameter cannot be served")
            }
        }
    }
    Ok(defs)
}
