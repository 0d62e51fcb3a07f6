//! FHIRPath (normative 2.0 with the FHIR R4 additions) over JSON resources:
//! used by replication filters and subscription topic criteria.
//!
//! Values of the resource are read from its JSON; without the FHIR type
//! model, a primitive's type comes from its JSON form, its choice suffix
//! (`valueQuantity`) or a small table of date elements, and strings are read
//! as dates when compared with one. `docs/fhirpath.md` lists what passes of
//! the official test suite and what does not.

mod eval;
mod funcs;
mod parse;
mod value;

use serde_json::Value;

pub use eval::Env;
pub use eval::{STRING_BYTES_MAX, WORK_MAX};
pub use parse::{Expr, Op, DEPTH_MAX, EXPRESSION_BYTES_MAX, NEST_MAX};
pub use value::{Item, Node, Temporal};

/// Why an expression was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("syntax: {0}")]
    Syntax(String),
    #[error("{0}")]
    Semantic(String),
    #[error("evaluation: {0}")]
    Eval(String),
}

/// Parses an expression (unknown functions are refused here).
pub fn parse(s: &str) -> Result<Expr, Error> {
    parse::parse(s)
}

/// Evaluates on a resource (`%resource`, `%context` and `$this`), with the
/// variables of `env`.
pub fn evaluate<'a>(e: &Expr, resource: &'a Value, env: &Env<'a>) -> Result<Vec<Item<'a>>, Error> {
    let root = vec![Item::node(resource)];
    let work = std::cell::Cell::new(0);
    let cx = eval::Cx {
        env,
        work: &work,
        context: root.clone(),
        this: None,
        index: None,
        total: None,
    };
    eval::eval(e, &root, &cx)
}

/// The result read as a boolean: `Some(true)` only for a single `true` (or a
/// single non-boolean item), `None` for an empty result.
pub fn truth(items: &[Item]) -> Result<Option<bool>, Error> {
    eval::truth(items)
}

/// Evaluates on a resource; the resource passes only when the result is
/// `true` (an empty result or an evaluation error does not pass).
pub fn matches(e: &Expr, resource: &Value) -> bool {
    matches_with(e, resource, &Env::new())
}

/// As [`matches`], with variables (`%current`, `%previous`, …). An
/// arithmetic overflow deep in the evaluation counts as an error, never
/// as a panic of the caller.
pub fn matches_with<'a>(e: &Expr, resource: &'a Value, env: &Env<'a>) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        evaluate(e, resource, env)
            .and_then(|r| eval::truth(&r))
            .is_ok_and(|t| t == Some(true))
    }))
    .unwrap_or(false)
}

#[cfg(test)]
mod tests;
