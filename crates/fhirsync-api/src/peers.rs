//! Children registered with this node (the parent side of an edge): who may
//! pull and push, with which token, and what this node knows about each.
//! A child sends `Authorization: Bearer <its token>` and
//! `X-Fhirsync-Node: <its node id>`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use crate::push_order::PushOrder;
use crate::ApiError;

/// Header carrying the calling child's node id.
pub const NODE_HEADER: &str = "x-fhirsync-node";

/// Least time between two persisted contact records of one child.
pub const CONTACT_WRITE_INTERVAL_MS: u64 = 2_000;

/// A registered child.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    pub node_id: String,
    pub token: String,
    /// May read this node's change feed.
    pub pull: bool,
    /// May send versions to `$apply`.
    pub push: bool,
    /// Resource types it may push; empty: all.
    pub push_types: Vec<String>,
}

/// The registry, with in-memory contact state.
#[derive(Debug, Default)]
pub struct Children {
    list: Vec<ChildConfig>,
    last_write: Mutex<HashMap<String, Instant>>,
    /// The order of each child's pipelined pushes.
    pub(crate) push_order: Arc<PushOrder>,
}

/// What a child asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

/// Equal-time comparison, so a token cannot be guessed byte by byte.
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

impl Children {
    pub fn new(list: Vec<ChildConfig>) -> Self {
        Children {
            list,
            last_write: Mutex::new(HashMap::new()),
            push_order: Arc::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn list(&self) -> &[ChildConfig] {
        &self.list
    }

    /// The child a request comes from, or why it is refused: 401 without a
    /// known token, 403 when the token is another node's or the access is
    /// not allowed.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        want: Access,
    ) -> Result<&ChildConfig, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err(unauthorized("a child node must send its bearer token"));
        };
        let mut found = None;
        for c in &self.list {
            if same(&c.token, token) {
                found = Some(c);
            }
        }
        let Some(child) = found else {
            return Err(unauthorized("unknown token: this node has no such child"));
        };
        let node = headers.get(NODE_HEADER).and_then(|v| v.to_str().ok());
        if node != Some(child.node_id.as_str()) {
            return Err(ApiError::new(
                403,
                "forbidden",
                format!(
                    "the token belongs to child '{}', not to '{}'",
                    child.node_id,
                    node.unwrap_or("")
                ),
            ));
        }
        let allowed = match want {
            Access::Pull => child.pull,
            Access::Push => child.push,
        };
        if !allowed {
            let what = if want == Access::Pull {
                "pull from"
            } else {
                "push to"
            };
            return Err(ApiError::new(
                403,
                "forbidden",
                format!("child '{}' may not {what} this node", child.node_id),
            ));
        }
        Ok(child)
    }

    /// Whether a contact of `node_id` should be written now (at most one
    /// write per child per [`CONTACT_WRITE_INTERVAL_MS`]).
    pub fn contact_due(&self, node_id: &str) -> bool {
        let Ok(mut m) = self.last_write.lock() else {
            return true;
        };
        let now = Instant::now();
        match m.get(node_id) {
            Some(t)
                if now.duration_since(*t) < Duration::from_millis(CONTACT_WRITE_INTERVAL_MS) =>
            {
                false
            }
            _ => {
                m.insert(node_id.to_owned(), now);
                true
            }
        }
    }
}

fn unauthorized(d: &str) -> ApiError {
    ApiError::new(401, "login", d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}
