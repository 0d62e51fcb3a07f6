//! Pure core of fhirsync: the data model (version vectors, HLC, resource
//! identity), FHIR validation, search-query parsing, index extraction and
//! reference rewriting. Nothing here does I/O or reads the wall clock
//! directly; time comes in through [`clock::Clock`].

pub mod audit;
pub mod clock;
pub mod fhirpath;
pub mod hlc;
pub mod index;
pub mod instant;
pub mod json_rules;
pub mod merge;
pub mod meta;
pub mod refs;
pub mod replicate;
pub mod resource;
pub mod search;
pub mod spec;
pub mod subscription;
pub mod summary;
pub mod validate;
pub mod vv;

pub use hlc::Hlc;
pub use resource::{ResourceKey, ValidationError};
pub use vv::{Causality, VersionVector};
