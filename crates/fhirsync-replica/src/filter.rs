//! A direction's filter: resource types and a FHIRPath boolean expression.

use fhirsync_core::fhirpath::{self, Expr};
use fhirsync_core::resource::is_resource_type;
use serde_json::Value;

use crate::config::FilterConfig;

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub types: Vec<String>,
    expr: Option<Expr>,
}

impl Filter {
    pub fn new(c: &FilterConfig) -> Result<Filter, String> {
        for t in &c.types {
            if !is_resource_type(t) {
                return Err(format!("filter type '{t}' is not a resource type"));
            }
        }
        let expr = c
            .fhirpath
            .as_deref()
            .map(|e| fhirpath::parse(e).map_err(|why| format!("filter '{e}': {why}")))
            .transpose()?;
        Ok(Filter {
            types: c.types.clone(),
            expr,
        })
    }

    /// Whether a record of `rtype` with this body (`None`: a tombstone) passes.
    pub fn passes(&self, rtype: &str, body: Option<&Value>) -> bool {
        if !self.types.is_empty() && !self.types.iter().any(|t| t == rtype) {
            return false;
        }
        match (&self.expr, body) {
            (Some(e), Some(b)) => fhirpath::matches(e, b),
            _ => true,
        }
    }

    pub fn has_expr(&self) -> bool {
        self.expr.is_some()
    }
}
