//! The binlog reader against a real MariaDB started by the test: inserts,
//! updates, deletes and a transaction across tables come out as committed
//! transactions of row changes, in order; resuming at a transaction's end
//! repeats and skips nothing; bad server states are clear errors.

use fhirsync_db::binlog::{current_position, BinlogError, Op, Position, Reader};
use fhirsync_testkit::mariadb::{available, MariaDb};
use mysql_async::prelude::Queryable;
use serde_json::json;

const SCHEMA: &str = "CREATE DATABASE emr;
CREATE TABLE emr.person (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE,
  name VARCHAR(50), birthdate DATE, created DATETIME(3), weight DOUBLE);
CREATE TABLE emr.obs (id INT PRIMARY KEY, uuid CHAR(36) NOT NULL UNIQUE, person_id INT NOT NULL,
  value_text VARCHAR(20), FOREIGN KEY (person_id) REFERENCES emr.person(id));
CREATE TABLE emr.other (x INT);";

async fn position(db: &MariaDb) -> Position {
    let mut c = mysql_async::Conn::from_url(&db.url).await.unwrap();
    let p = current_position(&mut c).await.unwrap();
    c.disconnect().await.unwrap();
    p
}

#[tokio::test]
async fn row_changes_come_out_by_transaction_and_resume_exactly() {
    assert!(
        available(),
        "MariaDB is needed (Debian package mariadb-server)"
    );
    let db = MariaDb::start().unwrap();
    db.sql(SCHEMA);
    let start = position(&db).await;
    db.sql(
        "INSERT INTO emr.person (uuid, name, birthdate, created, weight) VALUES
            ('p-1', 'Amina', '1980-02-01', '2026-01-02 03:04:05.678', 61.5)",
    );
    db.sql("UPDATE emr.person SET name = 'Amina O.' WHERE uuid = 'p-1'");
    db.sql(
        "START TRANSACTION;
            INSERT INTO emr.obs VALUES (1, 'o-1', 1, 'positive');
            UPDATE emr.person SET weight = 62 WHERE uuid = 'p-1';
            COMMIT;",
    );
    db.sql("INSERT INTO emr.other VALUES (7)");
    db.sql("DELETE FROM emr.obs WHERE uuid = 'o-1'");
    // The next change lands in a new binlog file.
    db.sql("FLUSH BINARY LOGS");
    db.sql("INSERT INTO emr.person (uuid, name) VALUES ('p-2', 'Otieno')");

    let tables = vec!["emr.person".to_string(), "emr.obs".to_string()];
    let mut r = Reader::open(&db.url, 901, &start, tables.clone())
        .await
        .unwrap();
    let t1 = r.next().await.unwrap();
    assert_eq!(t1.changes.len(), 1);
    let c = &t1.changes[0];
    assert_eq!((c.table.as_str(), c.op), ("person", Op::Create));
    assert_eq!(c.row["uuid"], "p-1");
    assert_eq!(c.row["name"], "Amina");
    assert_eq!(c.row["birthdate"], "1980-02-01");
    assert_eq!(c.row["created"], "2026-01-02 03:04:05.678000");
    assert_eq!(c.row["weight"], json!(61.5));
    let t2 = r.next().await.unwrap();
    assert_eq!(t2.changes[0].op, Op::Update);
    assert_eq!(t2.changes[0].row["name"], "Amina O.");
    let t3 = r.next().await.unwrap();
    let what: Vec<(&str, Op)> = t3
        .changes
        .iter()
        .map(|c| (c.table.as_str(), c.op))
        .collect();
    assert_eq!(what, [("obs", Op::Create), ("person", Op::Update)]);
    // The insert into the table not followed is left out.
    let t4 = r.next().await.unwrap();
    assert_eq!(t4.changes.len(), 1);
    assert_eq!(
        (t4.changes[0].table.as_str(), t4.changes[0].op),
        ("obs", Op::Delete)
    );
    assert_eq!(t4.changes[0].row["uuid"], "o-1");
    assert!(t1.end < t2.end && t2.end < t3.end && t3.end < t4.end);
    let t5 = r.next().await.unwrap();
    assert_eq!(t5.changes[0].row["uuid"], "p-2");
    assert_eq!(t5.end.file, "binlog.000002");
    // Resuming at the old file's last transaction crosses into the new one.
    let mut across = Reader::open(&db.url, 906, &t4.end, tables.clone())
        .await
        .unwrap();
    let n = across.next().await.unwrap();
    assert_eq!(
        (n.end.clone(), n.changes.clone()),
        (t5.end.clone(), t5.changes.clone())
    );

    // Resuming at t2's end gives t3 next: nothing repeated, nothing skipped.
    let mut again = Reader::open(&db.url, 902, &t2.end, tables.clone())
        .await
        .unwrap();
    let n = again.next().await.unwrap();
    assert_eq!(n.end, t3.end);
    assert_eq!(n.changes, t3.changes);

    // A position whose file is gone is an error, not silence.
    let gone = Position {
        file: "binlog.999999".into(),
        pos: 4,
    };
    let e = Reader::open(&db.url, 903, &gone, tables.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, BinlogError::Purged(_)), "{e}");
    assert!(e.to_string().contains("--snapshot"), "{e}");

    // A user without replication privileges is told which to grant.
    db.sql("CREATE USER 'clerk'@'%' IDENTIFIED BY 'pw'; GRANT SELECT ON emr.* TO 'clerk'@'%';");
    let url = format!("mysql://clerk:pw@127.0.0.1:{}/", db.port);
    let e = Reader::open(&url, 904, &start, tables).await.err().unwrap();
    assert!(matches!(e, BinlogError::Privileges(_)), "{e}");
    assert!(e.to_string().contains("REPLICATION SLAVE"), "{e}");
}

#[tokio::test]
async fn a_statement_binlog_is_refused_with_the_way_out() {
    assert!(
        available(),
        "MariaDB is needed (Debian package mariadb-server)"
    );
    let db = MariaDb::start_with(&["--binlog-format=STATEMENT"]).unwrap();
    let mut c = mysql_async::Conn::from_url(&db.url).await.unwrap();
    let p: Option<(String, u64, String, String)> =
        c.query_first("SHOW MASTER STATUS").await.unwrap();
    let (file, pos, _, _) = p.unwrap();
    let e = Reader::open(&db.url, 905, &Position { file, pos }, Vec::new())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e, BinlogError::NotRow(ref f) if f == "STATEMENT"),
        "{e}"
    );
    assert!(e.to_string().contains("binlog_format=ROW"));
}
