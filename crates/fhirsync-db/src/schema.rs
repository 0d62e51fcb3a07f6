//! The followed tables as the database describes them: columns and their
//! types, the key (`uuid`, else the primary key), foreign keys; read from
//! `information_schema` on both sides.

use std::collections::{BTreeMap, BTreeSet};

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::DbError;

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// `datetime`, `date`, `int`, ... (lower case).
    pub data_type: String,
    /// Allowed values of an ENUM column, in order.
    pub enum_values: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ForeignKey {
    pub column: String,
    pub parent: String,
    pub parent_column: String,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    /// The single-column primary key, if there is one.
    pub pk: Option<String>,
    /// Rows are matched between sites by `uuid` when the table has one
    /// (its primary key is then a local id and is not copied).
    pub has_uuid: bool,
    pub fks: Vec<ForeignKey>,
}

impl Table {
    /// The column rows are matched on between sites.
    pub fn key(&self) -> Option<&str> {
        if self.has_uuid {
            Some("uuid")
        } else {
            self.pk.as_deref()
        }
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Columns written at the receiver: all but a local id.
    pub fn copied(&self, name: &str) -> bool {
        !(self.has_uuid && self.pk.as_deref() == Some(name))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub database: String,
    pub tables: BTreeMap<String, Table>,
}

/// Backquoted identifier.
pub fn q(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

impl Schema {
    /// The tables of `database` named in `only` (empty: all but
    /// fhirsync's own).
    pub async fn load(conn: &mut Conn, database: &str, only: &[String]) -> Result<Schema, DbError> {
        let cols: Vec<(String, String, String, String, String)> = conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, COLUMN_KEY
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?
                 ORDER BY TABLE_NAME, ORDINAL_POSITION",
                (database,),
            )
            .await?;
        let mut tables: BTreeMap<String, Table> = BTreeMap::new();
        let mut pks: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, c, dt, ct, key) in cols {
            if t.starts_with("fhirsync_db_") || (!only.is_empty() && !only.contains(&t)) {
                continue;
            }
            if key == "PRI" {
                pks.entry(t.clone()).or_default().push(c.clone());
            }
            let e = tables.entry(t.clone()).or_insert_with(|| Table {
                name: t.clone(),
                columns: Vec::new(),
                pk: None,
                has_uuid: false,
                fks: Vec::new(),
            });
            if c == "uuid" {
                e.has_uuid = true;
            }
            e.columns.push(Column {
                name: c,
                data_type: dt.to_lowercase(),
                enum_values: enum_values(&ct),
            });
        }
        for t in only {
            if !tables.contains_key(t) {
                return Err(DbError::Schema(format!(
                    "table {database}.{t} does not exist"
                )));
            }
        }
        for (t, cols) in pks {
            if let (Some(tab), [one]) = (tables.get_mut(&t), cols.as_slice()) {
                tab.pk = Some(one.clone());
            }
        }
        let fks: Vec<(String, String, String, String)> = conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME
                 FROM information_schema.KEY_COLUMN_USAGE
                 WHERE TABLE_SCHEMA = ? AND REFERENCED_TABLE_SCHEMA = ?
                   AND REFERENCED_TABLE_NAME IS NOT NULL",
                (database, database),
            )
            .await?;
        for (t, c, parent, pc) in fks {
            if let Some(tab) = tables.get_mut(&t) {
                tab.fks.push(ForeignKey {
                    column: c,
                    parent,
                    parent_column: pc,
                });
            }
        }
        for t in tables.values() {
            if t.key().is_none() {
                return Err(DbError::Schema(format!(
                    "table {database}.{} has neither a uuid column nor a single-column primary key",
                    t.name
                )));
            }
        }
        Ok(Schema {
            database: database.to_string(),
            tables,
        })
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    /// The parent table of a foreign-key column when rows of the parent
    /// are matched by uuid (the column's value must then be mapped).
    pub fn mapped_parent(&self, table: &Table, column: &str) -> Option<&Table> {
        let fk = table.fks.iter().find(|f| f.column == column)?;
        let parent = self.tables.get(&fk.parent)?;
        (parent.has_uuid && parent.pk.as_deref() == Some(fk.parent_column.as_str()))
            .then_some(parent)
    }

    /// Tables with parents before children (a cycle is broken
    /// arbitrarily).
    pub fn dependency_order(&self) -> Vec<String> {
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        fn visit(s: &Schema, t: &str, done: &mut BTreeSet<String>, out: &mut Vec<String>) {
            if !done.insert(t.to_string()) {
                return;
            }
            if let Some(tab) = s.tables.get(t) {
                for fk in &tab.fks {
                    if fk.parent != t {
                        visit(s, &fk.parent, done, out);
                    }
                }
                out.push(t.to_string());
            }
        }
        for t in self.tables.keys() {
            visit(self, t, &mut done, &mut out);
        }
        out
    }
}

/// `enum('a','b')` → `[a, b]`.
fn enum_values(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type
        .strip_prefix("enum(")
        .and_then(|s| s.strip_suffix(')'))
    else {
        return Vec::new();
    };
    inner
        .split(',')
        .map(|v| v.trim().trim_matches('\'').replace("''", "'"))
        .collect()
}
