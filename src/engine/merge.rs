//! Aggregates that stay right however many workers fed a window.
//!
//! Workers share a stream by shards, not by group keys, so a window whose group spans shards
//! (per tenant, when records are keyed by device) is seen in parts by several workers; across
//! a reshard even a per-device window can be. Each worker therefore stores, per window and
//! group, the *state* of every aggregate over the records it read (count, sum, min, max, the
//! set of distinct values, mean and M2 for variances), and readers see a view that merges the
//! parts: `shardlake query` and the Athena DDL both use [`Mergeable::merge_sql`]. With one
//! worker there is one part per group and the view returns exactly the SELECT's result.
//!
//! The SELECT is rewritten at the SQL level: every item must be a GROUP BY expression or one
//! supported aggregate over an expression, with an alias. Anything else (an expression over
//! aggregates, HAVING, ORDER BY, other aggregate functions) is not mergeable and is written
//! as the SELECT returns it; with DynamoDB leases that is a configuration error.

use datafusion::sql::sqlparser::ast::{
    DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    SelectItem, SetExpr, Statement,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// Where [`Mergeable::merge_sql`] puts the GROUP BY columns of a window over the parts.
const GROUPS: &str = "{groups}";

/// How to store an aggregation as mergeable parts and read it back whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mergeable {
    /// The SELECT over `records` that computes one worker's part of every group.
    pub state_sql: String,
    /// The merged columns, in the SELECT's order.
    merged: Vec<String>,
    /// The state columns again, each over the parts: several parts of one window and group
    /// become one (how the engine folds a window's records in steps).
    combined: Vec<String>,
    /// The GROUP BY columns, quoted.
    groups: Vec<String>,
    /// Per variance: the mean of its group over all parts, a window over the parts.
    means: Vec<String>,
}

impl Mergeable {
    /// The SELECT over the parts table `parts` that gives the aggregation's rows, followed
    /// by `partition_columns` (the lake's `year`, `month`, … which a window's parts share:
    /// they are grouped by too, so a filter on them still prunes directories).
    pub fn merge_sql(&self, parts: &str, partition_columns: &[&str]) -> String {
        self.over_parts(&self.merged, parts, partition_columns)
    }

    /// The SELECT over the parts table `parts` that gives one part per window and group,
    /// with the columns and the meaning of the parts ([`Mergeable::state_sql`]'s result).
    pub fn combine_sql(&self, parts: &str) -> String {
        self.over_parts(&self.combined, parts, &[])
    }

    fn over_parts(&self, items: &[String], parts: &str, partition_columns: &[&str]) -> String {
        // A partition column that is a group already (the tenant) is not added twice.
        let extra: Vec<String> = partition_columns
            .iter()
            .map(|c| q(c))
            .filter(|c| !self.groups.contains(c))
            .collect();
        let groups = [self.groups.clone(), extra.clone()].concat().join(", ");
        let select = [items.to_vec(), extra].concat().join(", ");
        let from = if self.means.is_empty() {
            parts.to_string()
        } else {
            format!(
                "(SELECT *, {} FROM {parts}) AS parts",
                self.means.join(", ").replace(GROUPS, &groups)
            )
        };
        format!("SELECT {select} FROM {from} GROUP BY {groups}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    CountDistinct,
    Var { pop: bool, sqrt: bool },
}

fn kind(name: &str, distinct: bool) -> Option<Kind> {
    Some(match (name, distinct) {
        ("count", false) => Kind::Count,
        ("count", true) => Kind::CountDistinct,
        ("sum", false) => Kind::Sum,
        ("min", _) => Kind::Min,
        ("max", _) => Kind::Max,
        ("avg" | "mean", false) => Kind::Avg,
        ("stddev" | "stddev_samp", false) => Kind::Var {
            pop: false,
            sqrt: true,
        },
        ("stddev_pop", false) => Kind::Var {
            pop: true,
            sqrt: true,
        },
        ("var" | "variance" | "var_samp", false) => Kind::Var {
            pop: false,
            sqrt: false,
        },
        ("var_pop", false) => Kind::Var {
            pop: true,
            sqrt: false,
        },
        _ => return None,
    })
}

fn q(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL pieces of a mergeable SELECT, gathered item by item.
#[derive(Default)]
struct Parts {
    /// The GROUP BY columns.
    groups: Vec<String>,
    /// The state SELECT's items: what one part stores.
    states: Vec<String>,
    /// Over parts: the SELECT's own columns.
    merged: Vec<String>,
    /// Over parts: one part per group from several.
    combined: Vec<String>,
    /// Window functions the merge of a variance needs first (the groups' means).
    means: Vec<String>,
}

impl Parts {
    /// The pieces of one aggregate item, `name` = `k(arg)`.
    fn add(&mut self, k: Kind, arg: &str, name: &str) {
        let n = |suffix: &str| q(&format!("{name}__{suffix}"));
        let d = |e: &str| format!("CAST({e} AS DOUBLE)");
        match k {
            Kind::Count | Kind::Sum | Kind::Min | Kind::Max => {
                let f = match k {
                    Kind::Count => "count",
                    Kind::Sum => "sum",
                    Kind::Min => "min",
                    _ => "max",
                };
                self.states.push(format!("{f}({arg}) AS {}", q(name)));
                let m = if k == Kind::Count { "sum" } else { f };
                self.merged.push(format!("{m}({}) AS {}", q(name), q(name)));
                self.combined
                    .push(format!("{m}({}) AS {}", q(name), q(name)));
            }
            Kind::Avg => {
                self.states.push(format!("sum({}) AS {}", d(arg), n("sum")));
                self.states.push(format!("count({arg}) AS {}", n("n")));
                self.merged.push(format!(
                    "sum({}) / NULLIF(sum({}), 0) AS {}",
                    n("sum"),
                    n("n"),
                    q(name)
                ));
                self.combined.push(format!("sum({s}) AS {s}", s = n("sum")));
                self.combined.push(format!("sum({c}) AS {c}", c = n("n")));
            }
            Kind::CountDistinct => {
                self.states.push(format!(
                    "array_agg(DISTINCT {arg}) FILTER (WHERE {arg} IS NOT NULL) AS {}",
                    n("set")
                ));
                self.merged.push(format!(
                    "COALESCE(CAST(cardinality(array_distinct(flatten(array_agg({})))) AS BIGINT), 0) AS {}",
                    n("set"),
                    q(name)
                ));
                self.combined.push(format!(
                    "array_distinct(flatten(array_agg({set}) FILTER (WHERE {set} IS NOT NULL))) AS {set}",
                    set = n("set")
                ));
            }
            Kind::Var { pop, sqrt } => {
                // Per part: n, mean and M2 (the sum of squared deviations from the part's
                // mean); merged with the parallel formula, which keeps the precision a
                // plain sum of squares would lose.
                self.states.push(format!("count({arg}) AS {}", n("n")));
                self.states
                    .push(format!("avg({}) AS {}", d(arg), n("mean")));
                self.states
                    .push(format!("var_pop({}) * count({arg}) AS {}", d(arg), n("m2")));
                self.means.push(format!(
                    "sum({n} * {mean}) OVER (PARTITION BY {GROUPS}) / NULLIF(sum({n}) OVER (PARTITION BY {GROUPS}), 0) AS {gmean}",
                    n = n("n"),
                    mean = n("mean"),
                    gmean = n("gmean")
                ));
                let m2 = format!(
                    "(sum({m2}) + sum({cnt} * ({mean} - {gmean}) * ({mean} - {gmean})))",
                    m2 = n("m2"),
                    cnt = n("n"),
                    mean = n("mean"),
                    gmean = n("gmean")
                );
                let var = if pop {
                    format!(
                        "CASE WHEN sum({c}) > 0 THEN {m2} / sum({c}) END",
                        c = n("n")
                    )
                } else {
                    format!(
                        "CASE WHEN sum({c}) > 1 THEN {m2} / (sum({c}) - 1) END",
                        c = n("n")
                    )
                };
                let value = if sqrt { format!("sqrt({var})") } else { var };
                self.merged.push(format!("{value} AS {}", q(name)));
                self.combined.push(format!("sum({c}) AS {c}", c = n("n")));
                self.combined
                    .push(format!("max({g}) AS {}", n("mean"), g = n("gmean")));
                self.combined.push(format!("{m2} AS {}", n("m2")));
            }
        }
    }
}

/// The mergeable form of an aggregation's SELECT, or why it has none.
pub fn analyze(sql: &str) -> Result<Mergeable, String> {
    let dialect = GenericDialect {};
    let mut statements = Parser::parse_sql(&dialect, sql).map_err(|e| e.to_string())?;
    let (Some(Statement::Query(mut query)), true) = (statements.pop(), statements.is_empty())
    else {
        return Err("it is not one SELECT".into());
    };
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return Err("WITH, ORDER BY and LIMIT cannot be merged".into());
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err("it is not a plain SELECT (UNION, VALUES, …)".into());
    };
    if select.distinct.is_some() || select.having.is_some() || select.qualify.is_some() {
        return Err("SELECT DISTINCT, HAVING and QUALIFY cannot be merged".into());
    }
    let GroupByExpr::Expressions(group_by, modifiers) = &select.group_by else {
        return Err("GROUP BY ALL cannot be merged; name the GROUP BY columns".into());
    };
    if group_by.is_empty() || !modifiers.is_empty() {
        return Err("it needs a plain GROUP BY".into());
    }
    let grouped: Vec<String> = group_by.iter().map(|e| e.to_string()).collect();

    let mut parts = Parts::default();
    for item in &select.projection {
        let (expr, name) = match item {
            SelectItem::ExprWithAlias { expr, alias } => (expr, alias.value.clone()),
            SelectItem::UnnamedExpr(e @ Expr::Identifier(i)) => (e, i.value.clone()),
            SelectItem::UnnamedExpr(e @ Expr::CompoundIdentifier(parts)) => {
                (e, parts.last().map(|i| i.value.clone()).unwrap_or_default())
            }
            other => return Err(format!("`{other}` has no alias")),
        };
        if grouped.contains(&expr.to_string()) {
            parts.states.push(format!("{expr} AS {}", q(&name)));
            parts.merged.push(q(&name));
            parts.combined.push(q(&name));
            parts.groups.push(q(&name));
            continue;
        }
        let (k, arg) = aggregate(expr)?;
        parts.add(k, &arg, &name);
    }
    let Parts {
        groups,
        states,
        merged,
        combined,
        means,
    } = parts;
    if groups.len() == select.projection.len() {
        return Err("it has no aggregate".into());
    }
    let mut names = std::collections::HashSet::new();
    for s in &states {
        let alias = s.rsplit(" AS ").next().unwrap_or_default();
        if !names.insert(alias.to_string()) {
            return Err(format!("the state column {alias} would appear twice"));
        }
    }

    let items = Parser::parse_sql(&dialect, &format!("SELECT {}", states.join(", ")))
        .map_err(|e| e.to_string())?;
    let Some(Statement::Query(items)) = items.into_iter().next() else {
        unreachable!("a SELECT parses as a query")
    };
    let SetExpr::Select(items) = *items.body else {
        unreachable!("a SELECT list parses as a SELECT")
    };
    select.projection = items.projection;
    let state_sql = Statement::Query(query).to_string();

    Ok(Mergeable {
        state_sql,
        merged,
        combined,
        groups,
        means,
    })
}

/// A supported aggregate call with one argument: its kind and the argument's SQL.
fn aggregate(expr: &Expr) -> Result<(Kind, String), String> {
    let not = || {
        format!(
            "`{expr}` is neither a GROUP BY expression nor count, sum, min, max, avg, \
             count(DISTINCT …), stddev or variance of one expression"
        )
    };
    let Expr::Function(f) = expr else {
        return Err(not());
    };
    if f.over.is_some()
        || f.filter.is_some()
        || f.null_treatment.is_some()
        || !f.within_group.is_empty()
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return Err(not());
    }
    let FunctionArguments::List(list) = &f.args else {
        return Err(not());
    };
    if list.args.len() != 1 || !list.clauses.is_empty() {
        return Err(not());
    }
    let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
    let name = f.name.to_string().to_ascii_lowercase();
    let k = kind(&name, distinct).ok_or_else(not)?;
    let arg = match &list.args[0] {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => e.to_string(),
        FunctionArg::Unnamed(FunctionArgExpr::Wildcard) if k == Kind::Count => "*".into(),
        _ => return Err(not()),
    };
    Ok((k, arg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_a_select_into_states_and_a_merge() {
        let m = analyze(
            "SELECT window_start, window_end, tenant, count(*) AS readings, \
             count(DISTINCT device_id) AS devices, avg(pressure_psi) AS p_avg, \
             max(pressure_psi) AS p_max, stddev(temp_c) AS t_sd \
             FROM records WHERE status = 'ok' GROUP BY window_start, window_end, tenant",
        )
        .unwrap();
        assert!(
            m.state_sql.contains("count(*) AS \"readings\""),
            "{}",
            m.state_sql
        );
        assert!(
            m.state_sql.contains("WHERE status = 'ok'"),
            "{}",
            m.state_sql
        );
        assert!(
            m.state_sql.contains("array_agg(DISTINCT device_id) FILTER"),
            "{}",
            m.state_sql
        );
        let merge = m.merge_sql("well_parts", &["year"]);
        assert!(
            merge.contains("sum(\"readings\") AS \"readings\""),
            "{merge}"
        );
        assert!(merge.contains("FROM well_parts) AS parts"), "{merge}");
        assert!(
            merge.ends_with("GROUP BY \"window_start\", \"window_end\", \"tenant\", \"year\""),
            "{merge}"
        );
    }

    #[test]
    fn says_why_a_select_cannot_be_merged() {
        let why = |sql: &str| analyze(sql).unwrap_err();
        assert!(
            why("SELECT window_start, median(x) AS m FROM records GROUP BY window_start")
                .contains("median(x)")
        );
        assert!(
            why("SELECT window_start, max(x) - avg(x) AS s FROM records GROUP BY window_start")
                .contains("neither")
        );
        assert!(
            why("SELECT window_start, count(*) AS n FROM records GROUP BY window_start HAVING count(*) > 1")
                .contains("HAVING")
        );
        assert!(
            why("SELECT window_start FROM records GROUP BY window_start").contains("no aggregate")
        );
    }
}
