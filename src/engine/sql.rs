//! Everything DataFusion plans once per pipeline: the output schema of each aggregation's SQL,
//! the alert predicates, compiled to physical expressions that are evaluated on each chunk,
//! and the aggregations' queries, planned once ([`Prepared`]) and run on every emit and fold
//! over whatever batches they are given: planning a query costs more than running it over a
//! chunk's windows.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::MemTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Volatility};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr, collect};
use datafusion::prelude::SessionContext;

use crate::columns;
use crate::config::{Check, ConfigError, Pipeline, Problem};
use crate::decode::{SEQ_COL, SHARD_COL, record_schema};
use crate::engine::merge::{self, Mergeable};

pub const WINDOW_START: &str = columns::WINDOW_START;
pub const WINDOW_END: &str = columns::WINDOW_END;
/// The table name aggregation SQL reads.
pub const RECORDS_TABLE: &str = "records";

pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A compiled alert predicate.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub expr: Arc<dyn PhysicalExpr>,
}

/// What the engine needs from the pipeline's SQL.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub records: SchemaRef,
    /// `records` plus `window_start` and `window_end`: what aggregation SQL reads.
    pub agg_input: SchemaRef,
    /// What each aggregation stores: its parts (see [`merge`](super::merge)) when its SELECT
    /// can be merged, else the SELECT's rows.
    pub agg_outputs: Vec<SchemaRef>,
    /// The SELECT's own result, which window alerts read.
    pub agg_finals: Vec<SchemaRef>,
    /// Per aggregation: how its parts are computed and merged, if they can be.
    pub agg_merge: Vec<Option<Mergeable>>,
    pub record_rules: Vec<Rule>,
    /// Per aggregation.
    pub window_rules: Vec<Vec<Rule>>,
    /// The `detect:` rules, in file order.
    pub detectors: Vec<DetectRule>,
}

/// A compiled `detect:` rule: its value and filter as expressions over the records.
#[derive(Debug, Clone)]
pub struct DetectRule {
    pub name: String,
    pub detector: crate::config::Detector,
    /// Evaluates to Float64; `None` for `silent`.
    pub value: Option<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// Dead-letter table columns.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(columns::ARRIVAL_TIME, ts_type(), false),
        Field::new(SHARD_COL, DataType::Utf8, false),
        Field::new(SEQ_COL, DataType::Utf8, false),
        Field::new(columns::ERROR, DataType::Utf8, false),
        Field::new(columns::REASON, DataType::Utf8, false),
        Field::new(columns::RAW, DataType::Binary, false),
    ]))
}

/// Alerts table columns. `event_time` is the record's event time, or a window's start.
pub fn alerts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(columns::RULE, DataType::Utf8, false),
        Field::new(columns::KIND, DataType::Utf8, false),
        Field::new(columns::EVENT_TIME, ts_type(), false),
        Field::new(columns::KEY, DataType::Utf8, true),
        Field::new(columns::DETAIL, DataType::Utf8, false),
    ]))
}

/// Late table columns: the aggregation the record was late for, then the record.
pub fn late_schema(records: &Schema) -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new(
        columns::AGGREGATION,
        DataType::Utf8,
        false,
    ))];
    fields.extend(records.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}

/// Loads a pipeline and plans its SQL: every problem of the file, its schema and its SQL,
/// at once.
pub async fn load(
    path: &std::path::Path,
    env: crate::config::Env<'_>,
) -> Result<Pipeline, ConfigError> {
    let (pipeline, mut problems) = crate::config::load_pipeline_partial(path, env);
    if let Some(p) = &pipeline
        && let Err(e) = compile(p, &session()).await
    {
        problems.extend(e.problems);
    }
    match pipeline {
        Some(p) if problems.is_empty() => Ok(p),
        _ => Err(ConfigError { problems }),
    }
}

/// Plans the pipeline's SQL; every problem is reported with its file, line and field.
pub async fn compile(p: &Pipeline, ctx: &SessionContext) -> Result<Compiled, ConfigError> {
    let records = record_schema(p);
    let mut input_fields: Vec<Arc<Field>> = records.fields().iter().cloned().collect();
    input_fields.push(Arc::new(Field::new(WINDOW_START, ts_type(), false)));
    input_fields.push(Arc::new(Field::new(WINDOW_END, ts_type(), false)));
    let agg_input: SchemaRef = Arc::new(Schema::new(input_fields));
    let mut problems: Vec<Problem> = Vec::new();

    let mut agg_outputs = Vec::new();
    let mut agg_finals = Vec::new();
    let mut agg_merge = Vec::new();
    let leases = matches!(p.checkpoints, crate::config::Checkpoints::Dynamodb(_));
    for (i, a) in p.outputs.aggregations.iter().enumerate() {
        let at = format!("outputs.aggregations[{i}].sql");
        match plan_output(ctx, &agg_input, &a.sql).await {
            Ok(schema) => {
                match mergeable(ctx, &agg_input, &a.sql, &schema).await {
                    Ok((m, parts)) => {
                        agg_outputs.push(parts);
                        agg_merge.push(Some(m));
                    }
                    Err(why) => {
                        if leases {
                            problems.push(p.problem(
                                &at,
                                format!(
                                    "with DynamoDB leases several workers each compute part of a window, and this SELECT cannot be merged: {why}"
                                ),
                                "select GROUP BY columns and count, sum, min, max, avg, count(DISTINCT …), stddev or variance of an expression, each with an alias; compute other expressions when querying the table",
                            ));
                        }
                        agg_outputs.push(schema.clone());
                        agg_merge.push(None);
                    }
                }
                agg_finals.push(schema.clone());
                problems.extend(result_problems(p, &at, &schema));
            }
            Err(e) => {
                problems.push(p.problem(
                    &at,
                    format!("the SQL does not plan: {}", first_line(&e)),
                    format!(
                        "write a SELECT over `records`, whose columns are: {}",
                        columns(&agg_input)
                    ),
                ));
                agg_outputs.push(Arc::new(Schema::empty()));
                agg_finals.push(Arc::new(Schema::empty()));
                agg_merge.push(None);
            }
        }
    }

    let (record_rules, window_rules) = compile_rules(p, ctx, &records, &agg_finals, &mut problems);
    let detectors = compile_detectors(p, ctx, &records, &mut problems);
    if problems.is_empty() {
        Ok(Compiled {
            records,
            agg_input,
            agg_outputs,
            agg_finals,
            agg_merge,
            record_rules,
            window_rules,
            detectors,
        })
    } else {
        Err(ConfigError { problems })
    }
}

/// What is wrong with an aggregation's result columns: `window_start` (the partition
/// column) must be there as a timestamp, and every column needs a plain unique name.
fn result_problems(p: &Pipeline, at: &str, schema: &Schema) -> Vec<Problem> {
    let mut problems = Vec::new();
    match schema.field_with_name(WINDOW_START) {
        Ok(f) if f.data_type() == &ts_type() => {}
        Ok(f) => problems.push(p.problem(
            at,
            format!("`{WINDOW_START}` has type {} in the result", f.data_type()),
            format!("select `{WINDOW_START}` itself, not an expression over it"),
        )),
        Err(_) => problems.push(p.problem(
            at,
            format!("the result has no `{WINDOW_START}` column; the table is partitioned by it"),
            format!("add `{WINDOW_START}` to the SELECT list and to GROUP BY"),
        )),
    }
    let mut seen = std::collections::HashSet::new();
    for f in schema.fields() {
        if !crate::config::is_ident(f.name()) || !seen.insert(f.name().clone()) {
            problems.push(p.problem(
                at,
                format!("result column `{}` is not a plain unique name", f.name()),
                "give every expression an alias: `avg(pressure_psi) AS pressure_avg`",
            ));
        }
    }
    problems
}

/// The alert rules' predicates, planned over the records or over their aggregation's result.
fn compile_rules(
    p: &Pipeline,
    ctx: &SessionContext,
    records: &SchemaRef,
    agg_finals: &[SchemaRef],
    problems: &mut Vec<Problem>,
) -> (Vec<Rule>, Vec<Vec<Rule>>) {
    let mut record_rules = Vec::new();
    let mut window_rules = vec![Vec::new(); p.outputs.aggregations.len()];
    for r in &p.alerts {
        let Check::When(when) = &r.check else {
            continue;
        };
        let schema = match r.aggregation {
            Some(a) => agg_finals[a].clone(),
            None => records.clone(),
        };
        match predicate(ctx, &schema, when) {
            Ok(expr) => {
                let rule = Rule {
                    name: r.name.clone(),
                    expr,
                };
                match r.aggregation {
                    Some(a) => window_rules[a].push(rule),
                    None => record_rules.push(rule),
                }
            }
            Err(e) => problems.push(p.problem(
                &format!("alerts[{}].when", r.index),
                e,
                format!(
                    "write a SQL condition over these columns: {}",
                    columns(&schema)
                ),
            )),
        }
    }
    (record_rules, window_rules)
}

/// The `detect:` rules' value and `where` expressions, planned over the records.
fn compile_detectors(
    p: &Pipeline,
    ctx: &SessionContext,
    records: &SchemaRef,
    problems: &mut Vec<Problem>,
) -> Vec<DetectRule> {
    let mut out = Vec::new();
    for r in &p.alerts {
        let Check::Detect(d) = &r.check else {
            continue;
        };
        let at = |f: &str| format!("alerts[{}].detect.{f}", r.index);
        let value = d
            .value
            .as_ref()
            .and_then(|v| match numeric(ctx, records, v) {
                Ok(e) => Some(e),
                Err(e) => {
                    problems.push(p.problem(
                        &at("value"),
                        e,
                        format!(
                            "write a numeric SQL expression over these columns: {}",
                            columns(records)
                        ),
                    ));
                    None
                }
            });
        let filter = d
            .filter
            .as_ref()
            .and_then(|f| match predicate(ctx, records, f) {
                Ok(e) => Some(e),
                Err(e) => {
                    problems.push(p.problem(
                        &at("where"),
                        e,
                        format!(
                            "write a SQL condition over these columns: {}",
                            columns(records)
                        ),
                    ));
                    None
                }
            });
        out.push(DetectRule {
            name: r.name.clone(),
            detector: d.clone(),
            value,
            filter,
        });
    }
    out
}

/// A numeric SQL expression, planned to evaluate as Float64.
fn numeric(
    ctx: &SessionContext,
    schema: &SchemaRef,
    sql: &str,
) -> Result<Arc<dyn PhysicalExpr>, String> {
    plan_expr(ctx, schema, sql, "value", |ty| {
        if ty.is_numeric() {
            Ok(Some(DataType::Float64))
        } else {
            Err(format!("the value is of type {ty}, not a number"))
        }
    })
}

/// A schema's column names, for a fix that lists them.
fn columns(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn plan_output(
    ctx: &SessionContext,
    input: &SchemaRef,
    sql: &str,
) -> datafusion::error::Result<SchemaRef> {
    register_records(ctx, input.clone(), vec![])?;
    let df = ctx.sql(sql).await?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// The aggregation's mergeable form and the schema of its parts, when its SELECT can be
/// rewritten and the merge of the parts gives the SELECT's columns with their types.
async fn mergeable(
    ctx: &SessionContext,
    input: &SchemaRef,
    sql: &str,
    result: &SchemaRef,
) -> Result<(Mergeable, SchemaRef), String> {
    let m = merge::analyze(sql)?;
    let parts = plan_output(ctx, input, &m.state_sql)
        .await
        .map_err(|e| format!("its parts do not plan: {}", first_line(&e)))?;
    let table = MemTable::try_new(parts.clone(), vec![vec![]]).map_err(|e| e.to_string())?;
    let scratch = session();
    scratch
        .register_table(PARTS_SCRATCH, Arc::new(table))
        .map_err(|e| e.to_string())?;
    let merged = scratch
        .sql(&m.merge_sql(PARTS_SCRATCH, &[]))
        .await
        .map_err(|e| format!("its merge does not plan: {}", first_line(&e)))?;
    let merged = merged.schema().as_arrow();
    let shape = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect::<Vec<_>>()
    };
    if shape(merged) != shape(result) {
        return Err(format!(
            "merging its parts gives {:?}, not {:?}",
            shape(merged),
            shape(result)
        ));
    }
    Ok((m, parts))
}

const PARTS_SCRATCH: &str = "parts_scratch";

/// The table an aggregation's parts are combined and merged from, in the engine's session.
pub const PARTS_TABLE: &str = "shardlake_parts";

/// A query planned once and run many times, each time over the batches given to
/// [`Prepared::run`]. The engine runs its aggregations' queries on every emitted window and
/// fold; planning one (parsing, analysing, optimising) cost more than running it over a
/// chunk's windows.
///
/// A query that calls a stable function (`now()`, `current_date`, …, which the optimiser
/// folds into a constant) or whose scan takes a LIMIT is planned at every run instead, as
/// before: its result must not depend on when it was planned.
pub struct Prepared {
    input: Arc<Input>,
    /// None: planned at every run.
    plan: Option<Arc<dyn ExecutionPlan>>,
    table: String,
    sql: String,
}

/// The table a prepared query reads: whatever its next run was given.
#[derive(Debug)]
struct Input {
    schema: SchemaRef,
    batches: std::sync::Mutex<Vec<RecordBatch>>,
}

impl PartitionStream for Input {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        // Cloned, not taken: a plan may scan its table more than once.
        let batches = self.batches.lock().expect("not poisoned").clone();
        Box::pin(
            MemoryStream::try_new(batches, self.schema.clone(), None)
                .expect("batches of the table's schema"),
        )
    }
}

impl Prepared {
    /// Plans `sql`, which reads table `table` of `schema`.
    pub async fn new(
        ctx: &SessionContext,
        table: &str,
        schema: SchemaRef,
        sql: &str,
    ) -> datafusion::error::Result<Self> {
        let input = Arc::new(Input {
            schema: schema.clone(),
            batches: Default::default(),
        });
        let provider = StreamingTable::try_new(schema, vec![input.clone()])?;
        ctx.deregister_table(table)?;
        ctx.register_table(table, Arc::new(provider))?;
        let planned = async {
            let df = ctx.sql(sql).await?;
            let stable = calls_stable_functions(df.logical_plan())?;
            let plan = df.create_physical_plan().await?;
            let mut limited = false;
            plan.apply(|node| {
                let scan = node.downcast_ref::<StreamingTableExec>();
                limited |= scan.is_some_and(|s| s.limit().is_some());
                Ok(TreeNodeRecursion::Continue)
            })?;
            Ok::<_, datafusion::error::DataFusionError>((!stable && !limited).then_some(plan))
        }
        .await;
        ctx.deregister_table(table)?;
        Ok(Self {
            input,
            plan: planned?,
            table: table.to_string(),
            sql: sql.to_string(),
        })
    }

    /// The schema of the query's result.
    pub fn schema(&self) -> Option<SchemaRef> {
        self.plan.as_ref().map(|p| p.schema())
    }

    /// The query's result over `batches`.
    pub async fn run(
        &self,
        ctx: &SessionContext,
        batches: Vec<RecordBatch>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        if let Some(b) = batches
            .iter()
            .find(|b| !self.input.schema.contains(&b.schema()))
        {
            return datafusion::common::plan_err!(
                "batch schema {:?} is not table {}'s {:?}",
                b.schema(),
                self.table,
                self.input.schema
            );
        }
        let Some(plan) = &self.plan else {
            register_table(ctx, &self.table, self.input.schema.clone(), batches)?;
            return ctx.sql(&self.sql).await?.collect().await;
        };
        *self.input.batches.lock().expect("not poisoned") = batches;
        // A fresh copy of the plan's state (its metrics, its operators' state) for each run.
        let out = match reset_plan_states(plan.clone()) {
            Ok(plan) => collect(plan, ctx.task_ctx()).await,
            Err(e) => Err(e),
        };
        self.input.batches.lock().expect("not poisoned").clear();
        out
    }
}

/// Whether the plan calls a function whose value the optimiser fixes at planning (`now()`).
fn calls_stable_functions(plan: &LogicalPlan) -> datafusion::error::Result<bool> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility == Volatility::Stable
                {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    Ok(found)
}

/// Which columns of `records` (by index) `sqls`, planned over `input` (`records` and the
/// window bounds), read: what the scans of their optimised plans keep.
pub async fn columns_read(
    ctx: &SessionContext,
    input: &SchemaRef,
    records: usize,
    sqls: &[&str],
) -> datafusion::error::Result<Vec<usize>> {
    register_records(ctx, input.clone(), vec![])?;
    let mut used = std::collections::BTreeSet::new();
    for sql in sqls {
        let plan = ctx.sql(sql).await?.into_optimized_plan()?;
        plan.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                match &scan.projection {
                    Some(p) => used.extend(p.iter().copied()),
                    None => used.extend(0..input.fields().len()),
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    Ok(used.into_iter().filter(|&i| i < records).collect())
}

/// Makes `records` the given batches.
pub fn register_records(
    ctx: &SessionContext,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> datafusion::error::Result<()> {
    register_table(ctx, RECORDS_TABLE, schema, batches)
}

/// Makes table `name` the given batches.
pub fn register_table(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> datafusion::error::Result<()> {
    let table = MemTable::try_new(schema, vec![batches])?;
    ctx.deregister_table(name)?;
    ctx.register_table(name, Arc::new(table))?;
    Ok(())
}

fn predicate(
    ctx: &SessionContext,
    schema: &SchemaRef,
    sql: &str,
) -> Result<Arc<dyn PhysicalExpr>, String> {
    plan_expr(ctx, schema, sql, "condition", |ty| {
        if *ty == DataType::Boolean {
            Ok(None)
        } else {
            Err(format!("the condition is of type {ty}, not boolean"))
        }
    })
}

/// Parses and plans a SQL expression over `schema`; `check` says whether its type will do
/// and what to cast it to. `what` names it in the errors ("condition", "value").
fn plan_expr(
    ctx: &SessionContext,
    schema: &SchemaRef,
    sql: &str,
    what: &str,
    check: impl Fn(&DataType) -> Result<Option<DataType>, String>,
) -> Result<Arc<dyn PhysicalExpr>, String> {
    let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| first_line(&e))?;
    let expr = ctx
        .parse_sql_expr(sql, &df_schema)
        .map_err(|e| format!("the {what} does not parse: {}", first_line(&e)))?;
    let ty = expr
        .get_type(&df_schema)
        .map_err(|e| format!("the {what} does not plan: {}", first_line(&e)))?;
    let expr = match check(&ty)? {
        Some(to) => datafusion::logical_expr::cast(expr, to),
        None => expr,
    };
    ctx.create_physical_expr(expr, &df_schema)
        .map_err(|e| format!("the {what} does not plan: {}", first_line(&e)))
}

fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Every output's name, the schema of its files and, for aggregations stored as parts, how
/// to merge them; in `Pipeline::table_names` order.
pub fn output_tables(p: &Pipeline, c: &Compiled) -> Vec<(String, SchemaRef, Option<Mergeable>)> {
    let plain = p.table_names().len() - p.outputs.aggregations.len();
    let mut merges = vec![None; plain];
    merges.extend(c.agg_merge.iter().cloned());
    output_schemas(p, c)
        .into_iter()
        .zip(merges)
        .map(|((name, schema), m)| (name, schema, m))
        .collect()
}

/// Every output's name and schema, in `Pipeline::table_names` order.
pub fn output_schemas(p: &Pipeline, c: &Compiled) -> Vec<(String, SchemaRef)> {
    let o = &p.outputs;
    let mut v: Vec<(String, SchemaRef)> = o
        .raw
        .iter()
        .map(|r| (r.clone(), c.records.clone()))
        .collect();
    v.extend([
        (o.dead_letter.clone(), dead_letter_schema()),
        (o.late.clone(), late_schema(&c.records)),
        (o.alerts.clone(), alerts_schema()),
    ]);
    v.extend(
        o.aggregations
            .iter()
            .zip(&c.agg_outputs)
            .map(|(a, s)| (a.name.clone(), s.clone())),
    );
    v
}

/// A session for the pipeline's small per-window queries: one partition avoids
/// repartitioning work that costs more than it saves at this size.
pub fn session() -> SessionContext {
    let config = datafusion::prelude::SessionConfig::new().with_target_partitions(1);
    SessionContext::new_with_config(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array, TimestampNanosecondArray};

    /// A session, `sql` prepared over table `t` (one Int64 column `x`), and a maker of `t`'s
    /// batches.
    async fn prepare(sql: &str) -> (SessionContext, Prepared, impl Fn(&[i64]) -> RecordBatch) {
        let ctx = session();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let q = Prepared::new(&ctx, "t", schema.clone(), sql).await.unwrap();
        let batch = move |xs: &[i64]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(xs.to_vec()))],
            )
            .unwrap()
        };
        (ctx, q, batch)
    }

    fn int(out: &[RecordBatch]) -> Vec<i64> {
        out.iter()
            .flat_map(|b| {
                let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                c.values().to_vec()
            })
            .collect()
    }

    /// One plan, many runs, each over its own batches.
    #[tokio::test]
    async fn a_prepared_query_reads_each_runs_batches() {
        let (ctx, q, batch) = prepare("SELECT sum(x) AS s FROM t").await;
        assert!(q.schema().is_some(), "planned once");
        let run = |xs: Vec<RecordBatch>| q.run(&ctx, xs);
        assert_eq!(
            int(&run(vec![batch(&[1, 2]), batch(&[3])]).await.unwrap()),
            [6]
        );
        assert_eq!(int(&run(vec![batch(&[10])]).await.unwrap()), [10]);
        // A plan that reads its table twice reads every batch both times.
        let twice = Prepared::new(
            &ctx,
            "t",
            q.input.schema.clone(),
            "SELECT (SELECT sum(x) FROM t) + (SELECT count(*) FROM t) AS s",
        )
        .await
        .unwrap();
        let out = twice.run(&ctx, vec![batch(&[5, 6])]).await.unwrap();
        assert_eq!(int(&out), [13]);
    }

    /// `now()` is folded into a constant when a plan is optimised: such a query is planned
    /// at every run, so each run sees its own time.
    #[tokio::test]
    async fn now_is_read_at_each_run() {
        let (ctx, q, batch) = prepare("SELECT max(now()) AS t FROM t").await;
        assert!(q.schema().is_none(), "planned at every run");
        let at = |out: Vec<RecordBatch>| {
            let c = out[0].column(0);
            let c = c
                .as_any()
                .downcast_ref::<TimestampNanosecondArray>()
                .unwrap();
            c.value(0)
        };
        let first = at(q.run(&ctx, vec![batch(&[1])]).await.unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = at(q.run(&ctx, vec![batch(&[1])]).await.unwrap());
            if now > first {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "now() stayed {first}");
        }
    }

    /// A LIMIT taken by the scan registers metrics at every run of the same scan: such a
    /// query is planned at every run. Batches of another schema are refused.
    #[tokio::test]
    async fn a_limited_scan_is_planned_each_run_and_other_schemas_are_refused() {
        let (ctx, q, batch) = prepare("SELECT x FROM t LIMIT 2").await;
        assert!(q.schema().is_none());
        let out = q.run(&ctx, vec![batch(&[1, 2, 3])]).await.unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("y", DataType::Utf8, false)])),
            vec![Arc::new(arrow::array::StringArray::from(vec!["a"]))],
        )
        .unwrap();
        let err = q.run(&ctx, vec![other]).await.unwrap_err().to_string();
        assert!(err.contains("is not table t's"), "{err}");
    }
}
