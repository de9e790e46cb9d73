//! `POST /api/query`: read-only SQL over the pipeline's tables, answered as JSON, CSV or
//! Arrow IPC, with a row limit and a time limit.
//!
//! What may run is decided twice. The statement must parse as one query (`SELECT`, `WITH`,
//! `VALUES`; no `EXPLAIN ANALYZE`, no DDL, DML, `COPY` or `SET`), checked on DataFusion's own
//! parser so the message names what was refused; and the plan is made with DDL, DML and
//! statements switched off ([`SQLOptions`]). What a query can read is only what the session
//! registers: the pipeline's tables, through the same merged views `shardlake query` uses.
//! URL tables (`SELECT * FROM 'file.parquet'`) are off in a DataFusion session unless enabled,
//! and this one does not enable them; it registers no file-reading table function and no
//! `information_schema`, so neither the local file system nor another bucket can be named.

use std::time::Duration;

use arrow::array::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;

/// Why a query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement is not a read-only query (HTTP 403).
    #[error("{0}")]
    Refused(String),
    /// DataFusion could not parse or plan it: unknown table or column, syntax (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// It ran longer than the time limit and was cancelled (HTTP 503).
    #[error(
        "the query ran longer than {0:?} and was cancelled; narrow it (a time range, fewer columns) or raise the limit"
    )]
    TimedOut(Duration),
    #[error("running the query: {0}")]
    Failed(String),
}

/// The rows of an answered query.
pub struct Answer {
    pub batches: Vec<RecordBatch>,
    /// Rows were cut at the row limit.
    pub truncated: bool,
}

/// Checks that `sql` is one read-only query; the message says what was refused and why.
pub fn check_read_only(sql: &str) -> Result<(), QueryError> {
    let statements = DFParser::parse_sql(sql).map_err(|e| QueryError::Invalid(e.to_string()))?;
    if statements.len() != 1 {
        return Err(QueryError::Refused(format!(
            "send one statement at a time (got {})",
            statements.len()
        )));
    }
    let what = match &statements[0] {
        DfStatement::Statement(s) => match s.as_ref() {
            Statement::Query(_) => return Ok(()),
            Statement::Insert(_)
            | Statement::Update { .. }
            | Statement::Delete(_)
            | Statement::Merge { .. } => "writes (INSERT, UPDATE, DELETE, MERGE)",
            Statement::Copy { .. } => "COPY",
            Statement::Explain { .. } | Statement::ExplainTable { .. } => "EXPLAIN",
            Statement::CreateTable(_)
            | Statement::CreateView { .. }
            | Statement::CreateSchema { .. }
            | Statement::CreateDatabase { .. }
            | Statement::CreateFunction(_)
            | Statement::Drop { .. }
            | Statement::AlterTable { .. }
            | Statement::Truncate { .. } => "DDL (CREATE, DROP, ALTER, TRUNCATE)",
            _ => "this statement",
        },
        DfStatement::CopyTo(_) => "COPY",
        DfStatement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE (it reads files)",
        DfStatement::Explain(_) => "EXPLAIN",
        _ => "this statement",
    };
    Err(QueryError::Refused(format!(
        "{what} is not allowed here: the console runs read-only queries (SELECT or WITH) over the pipeline's tables"
    )))
}

/// Runs `sql` on `ctx` with `limit` rows at most and `timeout`.
pub async fn run(
    ctx: &SessionContext,
    sql: &str,
    limit: usize,
    timeout: Duration,
) -> Result<Answer, QueryError> {
    check_read_only(sql)?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let work = async {
        let df = ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| QueryError::Invalid(e.strip_backtrace()))?;
        // One row more than allowed tells whether there were more.
        let df = df
            .limit(0, Some(limit + 1))
            .map_err(|e| QueryError::Invalid(e.strip_backtrace()))?;
        df.collect()
            .await
            .map_err(|e| QueryError::Failed(e.strip_backtrace()))
    };
    // Dropping the future on the deadline cancels the plan's streams.
    let batches = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| QueryError::TimedOut(timeout))??;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let truncated = rows > limit;
    let batches = if truncated {
        let mut left = limit;
        batches
            .into_iter()
            .filter_map(|b| {
                let take = b.num_rows().min(left);
                left -= take;
                (take > 0).then(|| b.slice(0, take))
            })
            .collect()
    } else {
        batches
    };
    Ok(Answer { batches, truncated })
}

/// The answer's rows as a JSON array of objects.
pub fn to_json(batches: &[RecordBatch]) -> Result<Vec<u8>, QueryError> {
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    for b in batches {
        w.write(b).map_err(|e| QueryError::Failed(e.to_string()))?;
    }
    w.finish().map_err(|e| QueryError::Failed(e.to_string()))?;
    let out = w.into_inner();
    Ok(if out.is_empty() { b"[]".to_vec() } else { out })
}

pub fn to_csv(batches: &[RecordBatch]) -> Result<Vec<u8>, QueryError> {
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(Vec::new());
    for b in batches {
        w.write(b).map_err(|e| QueryError::Failed(e.to_string()))?;
    }
    Ok(w.into_inner())
}

pub fn to_arrow(
    batches: &[RecordBatch],
    schema: &arrow::datatypes::Schema,
) -> Result<Vec<u8>, QueryError> {
    let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
        .map_err(|e| QueryError::Failed(e.to_string()))?;
    for b in batches {
        w.write(b).map_err(|e| QueryError::Failed(e.to_string()))?;
    }
    w.finish().map_err(|e| QueryError::Failed(e.to_string()))?;
    w.into_inner()
        .map_err(|e| QueryError::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_queries_pass() {
        for ok in [
            "SELECT 1",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "select * from readings -- a comment\n",
        ] {
            check_read_only(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (sql, says) in [
            ("INSERT INTO readings VALUES (1)", "writes"),
            ("DELETE FROM readings", "writes"),
            ("COPY readings TO '/tmp/x.csv'", "COPY"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
                "CREATE EXTERNAL TABLE",
            ),
            ("CREATE TABLE t AS SELECT 1", "DDL"),
            ("DROP TABLE readings", "DDL"),
            ("SET datafusion.execution.batch_size = 1", "this statement"),
            ("EXPLAIN SELECT 1", "EXPLAIN"),
            ("SELECT 1; SELECT 2", "one statement"),
        ] {
            let e = check_read_only(sql).unwrap_err();
            assert!(matches!(e, QueryError::Refused(_)), "{sql}: {e}");
            assert!(e.to_string().contains(says), "{sql}: {e}");
        }
        assert!(matches!(
            check_read_only("SELEC 1"),
            Err(QueryError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn limits_rows_and_time_and_names_unknown_tables() {
        let ctx = SessionContext::new();
        let a = run(
            &ctx,
            "SELECT * FROM generate_series(1, 100)",
            10,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| e.to_string())
        .unwrap();
        assert!(a.truncated);
        assert_eq!(a.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
        let e = run(&ctx, "SELECT * FROM nowhere", 10, Duration::from_secs(10))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("nowhere"), "{e}");
        let e = run(
            &ctx,
            "SELECT * FROM '/etc/passwd'",
            10,
            Duration::from_secs(10),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, QueryError::Invalid(_)), "{e}");
        let slow = "SELECT count(*) FROM generate_series(1, 2000000000) a";
        let e = run(&ctx, slow, 10, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QueryError::TimedOut(_)), "{e}");
    }
}
