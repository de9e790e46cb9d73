//! The console: what operators look at. `shardlake console PIPELINE` (and `shardlake demo
//! --live`) serves, on its own port:
//!
//! - the **fleet page**: one row per device with the latest value of each field, its age,
//!   a sparkline of the last [`crate::live::HISTORY_MINUTES`] minutes and its open alerts;
//! - the **alert feed**: new alerts live, newest first; operators acknowledge them, durably
//!   ([`acks`]) and visibly to every other user;
//! - the **device page**: the device's aggregates over a chosen range, read from the lake's
//!   aggregation table through the merged views `shardlake query` uses, with its recent
//!   readings and alerts;
//! - the **query page and API**: `POST /api/query`, read-only SQL over the pipeline's tables
//!   ([`query`]);
//! - a device's **desired and reported state** (`GET /api/devices/{id}/desired`), which an
//!   operator of its tenant changes (`POST`, `{"set": {…}, "unset": […]}`) through the
//!   pipeline's `commands:` broker, as `shardlake device set` does ([`crate::tools::device`]).
//!
//! Live data comes from the workers' live state, merged in [`fleet`]: the console reads no
//! shard itself. Pages are plain HTML, CSS and JavaScript compiled into the binary (`assets/`):
//! no CDN, no build step. The page updates over server-sent events that resume after a dropped
//! connection with `Last-Event-ID`.
//!
//! Every response carries a Content-Security-Policy that allows no inline script and no other
//! origin; the page writes every value from the stream as text, never as HTML.

pub mod acks;
pub mod auth;
pub mod fleet;
pub mod query;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow::array::RecordBatch;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datafusion::prelude::SessionContext;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::{LakeLocation, Pipeline};
use crate::live::AlertRow;
use crate::tools::query as lake;
use acks::AckStore;
use auth::{Auth, Denied, Role};
use fleet::{Ack, Feed, Fleet, Scope};

/// No script but our own file, no style but our own, no other origin, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// How a console is started.
#[derive(Clone)]
pub struct ConsoleOptions {
    pub listen: SocketAddr,
    /// The workers whose live state the page shows; none: the workers the pipeline's lease
    /// table or local checkpoints list ([`workers`]).
    pub feeds: Vec<Feed>,
    /// Where acknowledgements are kept (default: beside a local lake).
    pub acks_dir: Option<PathBuf>,
    /// Rows a query returns at most.
    pub query_rows: usize,
    /// How long a query may run.
    pub query_timeout: Duration,
}

impl ConsoleOptions {
    pub fn new(listen: SocketAddr, feeds: Vec<Feed>) -> Self {
        Self {
            listen,
            feeds,
            acks_dir: None,
            query_rows: 10_000,
            query_timeout: Duration::from_secs(30),
        }
    }
}

/// Who is asking. Without sign-in configured (loopback only), a local user who sees every
/// tenant and may acknowledge.
#[derive(Debug, Clone, Serialize)]
pub struct Viewer {
    pub name: String,
    pub tenant: Option<String>,
    pub role: &'static str,
    #[serde(skip)]
    pub scope: Scope,
}

impl Viewer {
    fn may_acknowledge(&self) -> bool {
        matches!(self.role, "operator" | "admin")
    }
}

struct Console {
    /// Names this console's numbering of changes: event ids are `<epoch>.<version>`, so a page
    /// that followed another console (or this one before a restart) starts again from a
    /// snapshot instead of reading one numbering as another.
    epoch: String,
    auth: Arc<Auth>,
    p: Arc<Pipeline>,
    opts: ConsoleOptions,
    fleet: Arc<Fleet>,
    acks: AckStore,
    ctx: SessionContext,
    /// Per tenant: a session whose tables hold only that tenant's rows ([`Console::session`]).
    tenant_ctx: std::sync::Mutex<std::collections::HashMap<String, SessionContext>>,
    /// The aggregation with one row per device and window the device page charts.
    device_table: Option<String>,
}

/// An answer that is not a success: its status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(serde_json::json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<query::QueryError> for ApiError {
    fn from(e: query::QueryError) -> Self {
        use query::QueryError::*;
        let status = match &e {
            Refused(_) => StatusCode::FORBIDDEN,
            Invalid(_) => StatusCode::BAD_REQUEST,
            TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

/// Starts the console; returns the address it listens on and its fleet state.
pub async fn serve(
    p: Arc<Pipeline>,
    opts: ConsoleOptions,
) -> anyhow::Result<(SocketAddr, Arc<Fleet>)> {
    // `auth: none` is refused here unless the console listens on loopback.
    let auth = Auth::new(&p.console.auth, opts.listen).await?;
    let tables = lake::output_schemas(&p).await?;
    let ctx = lake::lake_session(&p, &tables)
        .await
        .context("opening the lake's tables")?;
    let device_table = p.schema.key.as_ref().and_then(|key| {
        p.outputs
            .aggregations
            .iter()
            .find(|a| {
                tables
                    .iter()
                    .any(|t| t.name == a.name && t.schema.field_with_name(key).is_ok())
            })
            .map(|a| a.name.clone())
    });
    let acks = match (&opts.acks_dir, &p.outputs.sinks[&p.outputs.alerts]) {
        (Some(d), _) => AckStore::local(d.clone()),
        (None, LakeLocation::Local { path }) => AckStore::local(path.join(acks::ACKS_PREFIX)),
        (None, LakeLocation::S3(loc)) => Ok(AckStore::s3(loc).await),
    }
    .context("opening the acknowledgements' store")?;
    let fleet = Fleet::new();
    match recent_alerts(&p, &ctx).await {
        Ok(alerts) => fleet.backfill(alerts),
        Err(e) => {
            tracing::warn!(error = %e, "reading recent alerts from the lake failed; the feed starts empty")
        }
    }
    fleet.load_acks(acks.load().await.context("reading the acknowledgements")?);
    if opts.feeds.is_empty() {
        workers::Workers::of(&p).await.follow_all(fleet.clone());
    }
    for feed in &opts.feeds {
        fleet::follow(feed.clone(), fleet.clone());
    }
    let console = Arc::new(Console {
        epoch: format!("{:x}", chrono::Utc::now().timestamp_micros()),
        auth,
        p,
        opts: opts.clone(),
        fleet: fleet.clone(),
        acks,
        ctx,
        tenant_ctx: Default::default(),
        device_table,
    });
    let bound = crate::ops::serve(opts.listen, router(console)).await?;
    Ok((bound, fleet))
}

fn router(console: Arc<Console>) -> Router {
    let page = |body: &'static str, ctype: &'static str| {
        move || async move { ([(header::CONTENT_TYPE, ctype)], body) }
    };
    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            get(page(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/app.css",
            get(page(APP_CSS, "text/css; charset=utf-8")),
        )
        .route("/api/me", get(me))
        .route("/api/fleet", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/alerts/{id}/ack", post(acknowledge))
        .route("/api/devices/{id}", get(device))
        .route(
            "/api/devices/{id}/desired",
            get(desired_state).post(set_desired),
        )
        .route("/api/query", post(run_query))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API") })
        .with_state(console.clone())
        .merge(console.auth.routes())
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

impl Console {
    /// The signed-in user (session cookie or Bearer token), or why not.
    async fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, ApiError> {
        let user = self.auth.user(headers).await?;
        let (role, scope) = match (user.role, &user.tenant) {
            (Role::Admin, _) => ("admin", Scope::All),
            (Role::Operator, Some(t)) => ("operator", Scope::Tenant(t.clone())),
            (Role::Viewer, Some(t)) => ("viewer", Scope::Tenant(t.clone())),
            (_, None) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "your account names no tenant, so there is nothing to show; ask an administrator to set your tenant",
                ));
            }
        };
        Ok(Viewer {
            name: user.name,
            tenant: user.tenant,
            role,
            scope,
        })
    }

    /// A POST from a signed-in user, sent by the console's own pages (or with a Bearer token).
    async fn poster(&self, headers: &HeaderMap) -> Result<Viewer, ApiError> {
        let v = self.viewer(headers).await?;
        self.auth.check_csrf(headers)?;
        Ok(v)
    }
}

impl Console {
    /// The query API's row and time limits for `scope`: the console's own, lowered by the
    /// tenant's `console.query.tenants` entry (a tenant cannot raise them).
    fn limits(&self, scope: &Scope) -> (usize, Duration) {
        let (rows, timeout) = (self.opts.query_rows, self.opts.query_timeout);
        match scope {
            Scope::Tenant(t) => match self.p.console.tenant_limits.get(t) {
                Some(l) => (
                    l.max_rows.map_or(rows, |r| r.min(rows)),
                    l.timeout.map_or(timeout, |d| d.min(timeout)),
                ),
                None => (rows, timeout),
            },
            Scope::All => (rows, timeout),
        }
    }

    /// The session a viewer's SQL runs in. A tenant's viewer gets a session of its own in
    /// which each table is a view of the lake's table filtered on the tenant field, built on
    /// the table itself (not on its name), so no name in that session reaches another
    /// tenant's rows: `UNION`, subqueries, CTEs or quoting reach only those views. Tables
    /// without the tenant field (dead letters, alerts) are not in it.
    async fn session(&self, scope: &Scope) -> Result<SessionContext, ApiError> {
        let Scope::Tenant(tenant) = scope else {
            return Ok(self.ctx.clone());
        };
        if let Some(ctx) = self.tenant_ctx.lock().expect("not poisoned").get(tenant) {
            return Ok(ctx.clone());
        }
        let Some(field) = self.p.tenant_field() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "the schema has no tenant field, so tenant users cannot query",
            ));
        };
        let scoped = SessionContext::new_with_config_rt(Default::default(), self.ctx.runtime_env());
        let fail = |e: datafusion::error::DataFusionError| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening the tables: {e}"),
            )
        };
        for name in self.p.table_names() {
            let Ok(provider) = self.ctx.table_provider(name).await else {
                continue;
            };
            if provider.schema().field_with_name(field).is_err() {
                continue;
            }
            let df = self.ctx.table(name).await.map_err(fail)?;
            let view = df
                .filter(
                    datafusion::prelude::col(format!("\"{field}\""))
                        .eq(datafusion::prelude::lit(tenant.as_str())),
                )
                .map_err(fail)?
                .into_view();
            scoped.register_table(name, view).map_err(fail)?;
        }
        self.tenant_ctx
            .lock()
            .expect("not poisoned")
            .insert(tenant.clone(), scoped.clone());
        Ok(scoped)
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        Self(d.status, d.message)
    }
}

/// The page, or a redirect to sign-in without a session.
async fn index(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match c.auth.user(&headers).await {
        Ok(_) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            INDEX_HTML,
        )
            .into_response(),
        Err(d) if d.status == StatusCode::UNAUTHORIZED => {
            axum::response::Redirect::to("/auth/login?next=/").into_response()
        }
        Err(d) => d.into_response(),
    }
}

async fn me(State(c): State<Arc<Console>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let v = c.viewer(&headers).await?;
    Ok(axum::Json(serde_json::json!({
        "name": v.name, "tenant": v.tenant, "role": v.role, "signs_in": c.auth.signs_in(),
        "pipeline": c.p.name, "key": c.p.schema.key, "tenant_field": c.p.tenant_field(),
        "fields": c.p.schema.fields.iter().map(|f| f.name.as_str())
            .filter(|f| Some(*f) != c.p.schema.key.as_deref() && Some(*f) != c.p.tenant_field() && *f != c.p.event_time.field)
            .collect::<Vec<_>>(),
        "numeric_fields": c.p.schema.fields.iter()
            .filter(|f| matches!(f.ty, crate::config::FieldType::Float64 | crate::config::FieldType::Float32))
            .map(|f| f.name.as_str()).collect::<Vec<_>>(),
        "tables": c.p.table_names(),
        "device_table": c.device_table,
        "query_rows": c.opts.query_rows,
        "commands": c.p.commands.is_some(),
    }))
    .into_response())
}

/// Everything the viewer may see, with each device's whole history: what the page starts
/// from before it follows `/api/events?since=<version>`.
async fn snapshot(State(c): State<Arc<Console>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let v = c.viewer(&headers).await?;
    let view = c.fleet.since(0, &v.scope, true);
    /// The view and its cursor, written straight into the body: no JSON tree in between
    /// (with 10,000 devices' histories that tree held several times the text's size).
    #[derive(Serialize)]
    struct Snapshot<'a> {
        #[serde(flatten)]
        view: &'a fleet::View,
        cursor: String,
    }
    let cursor = format!("{}.{}", c.epoch, view.version);
    let body = serde_json::to_vec(&Snapshot {
        view: &view,
        cursor,
    })
    .expect("serialisable");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
struct SinceQuery {
    /// A cursor (`<epoch>.<version>`) from the snapshot or an event.
    since: Option<String>,
}

impl Console {
    /// The version a cursor names in this console's numbering; None for another numbering.
    fn version_of(&self, cursor: &str) -> Option<u64> {
        let (epoch, version) = cursor.trim().split_once('.')?;
        (epoch == self.epoch)
            .then(|| version.parse().ok())
            .flatten()
    }
}

/// The server-sent event stream: `changes` events (devices, alerts, acknowledgements
/// after the event's id), at most one per [`fleet::POLL`]; a `reset` event when the reader is
/// too far behind to catch up (alerts it missed are no longer kept) or followed another
/// numbering (a console restarted): it reloads the snapshot.
async fn events(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<SinceQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let v = c.viewer(&headers).await?;
    // A reconnecting EventSource sends the id of the last event it received.
    let cursor = headers
        .get("last-event-id")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or(q.since)
        .filter(|s| !s.is_empty());
    // Another numbering: start again from a snapshot (the first answer is a reset).
    let since = match &cursor {
        None => 0,
        Some(s) => c.version_of(s).unwrap_or(u64::MAX),
    };
    // The gap between two events is counted from the previous one: a reader slow to take a
    // large event (every device changed) does not wait a full gap more on top.
    let stream =
        futures::stream::unfold((c, v, since, None), |(c, v, mut since, sent)| async move {
            if let Some(sent) = sent {
                tokio::time::sleep_until(sent + fleet::POLL).await;
            }
            let fleet = c.fleet.clone();
            loop {
                let woken = fleet.changed.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                // Serialised once for every reader at `since` in this scope.
                let view = fleet.update(since, &v.scope);
                // Behind what is kept, or ahead of this console's numbering (it restarted while
                // the page stayed open): the page starts again from a snapshot.
                if since > view.version || (since > 0 && since + 1 < view.alerts_from) {
                    let e = Event::default()
                        .event("reset")
                        .data("start again from /api/fleet");
                    return Some((
                        Ok(e),
                        (c, v, view.version, Some(tokio::time::Instant::now())),
                    ));
                }
                if view.version > since {
                    let id = view.version;
                    if !view.empty {
                        let e = Event::default()
                            .id(format!("{}.{id}", c.epoch))
                            .event("changes")
                            .data(&*view.json);
                        return Some((Ok(e), (c, v, id, Some(tokio::time::Instant::now()))));
                    }
                    // Changes of other tenants only.
                    since = id;
                }
                let _ = tokio::time::timeout(Duration::from_secs(30), woken).await;
            }
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn acknowledge(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = c.poster(&headers).await?;
    if !v.may_acknowledge() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "acknowledging alerts needs the operator role",
        ));
    }
    let Some(alert) = c.fleet.alert(&id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no alert {id} (the console keeps the newest {} alerts)",
                fleet::ALERTS_KEPT
            ),
        ));
    };
    if !matches!(&v.scope, Scope::All) && v.tenant != alert.tenant {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no alert {id}"),
        ));
    }
    let ack = Ack {
        alert: id,
        by: v.name.clone(),
        at_us: chrono::Utc::now().timestamp_micros(),
        version: 0,
    };
    let kept = c.acks.put(&ack).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("keeping the acknowledgement: {e}"),
        )
    })?;
    let shown = c.fleet.ack(kept).unwrap_or(ack);
    Ok(axum::Json(shown).into_response())
}

impl Console {
    /// The broker and topics of device `id`, if `v` may see it: its tenant is the one its live
    /// row names (a device the console has not seen cannot be commanded from here).
    fn device_topics(
        &self,
        v: &Viewer,
        id: &str,
    ) -> Result<(crate::tools::device::Broker, crate::tools::device::Topics), ApiError> {
        use crate::tools::device::{Broker, Topics};
        let Some(b) = &self.p.commands else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "this pipeline has no `commands:` broker, so devices cannot be commanded from here",
            ));
        };
        let Some(row) = self.fleet.device(id, &v.scope) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no device {id} in the live fleet"),
            ));
        };
        let Some(tenant) = row.tenant.or_else(|| b.tenant.clone()) else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "device {id} names no tenant and commands.tenant is not set: its topics are unknown"
                ),
            ));
        };
        let topics = Topics::new(&b.desired_topic, &b.reported_topic, &tenant, id)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        Ok((Broker::of(b), topics))
    }
}

fn broker_error(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        format!("the commands broker: {e:#}"),
    )
}

/// The device's retained desired and reported states.
async fn desired_state(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = c.viewer(&headers).await?;
    let (broker, topics) = c.device_topics(&v, &id)?;
    let state = crate::tools::device::show(&broker, &topics)
        .await
        .map_err(broker_error)?;
    Ok(axum::Json(state).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetDesired {
    #[serde(default)]
    set: std::collections::BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    unset: Vec<String>,
}

/// An operator changes a device's desired state; answers with the new document and, if the
/// device answered within 5 s, its report.
async fn set_desired(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::Json<SetDesired>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let v = c.poster(&headers).await?;
    if !v.may_acknowledge() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "setting a device's desired state needs the operator role",
        ));
    }
    let axum::Json(req) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{e}; send {{\"set\": {{\"sensors.<name>.interval\": \"1s\"}}, \"unset\": [\"outputs.<name>\"]}}"
            ),
        )
    })?;
    if req.set.is_empty() && req.unset.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "nothing to change: give `set` or `unset`",
        ));
    }
    if let Some(k) = req
        .set
        .keys()
        .chain(&req.unset)
        .find(|k| !crate::agent::commands::is_command_key(k))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "`{k}` is not a setting a device takes: use sensors.<name>.interval, sensors.<name>.enabled or outputs.<name>"
            ),
        ));
    }
    let (broker, topics) = c.device_topics(&v, &id)?;
    let set: Vec<(String, serde_json::Value)> = req.set.into_iter().collect();
    let outcome = crate::tools::device::set(
        &broker,
        &topics,
        &set,
        &req.unset,
        &format!("user:{}", v.name),
        Some(Duration::from_secs(5)),
    )
    .await
    .map_err(broker_error)?;
    tracing::info!(device = %id, user = %v.name, version = outcome.desired.version, "desired state set from the console");
    Ok(axum::Json(outcome).into_response())
}

#[derive(Deserialize)]
struct RangeQuery {
    /// `1h`, `1d`, `7d` (default `1h`), or `custom` with `from` and `to` (RFC 3339).
    range: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// The device page's data: its live row, aggregates over the range from the lake, its recent
/// readings and its alerts.
async fn device(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Response, ApiError> {
    let v = c.viewer(&headers).await?;
    let Some(key) = c.p.schema.key.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the schema has no key field, so there are no devices",
        ));
    };
    let now = chrono::Utc::now();
    let (from, to) = match q.range.as_deref().unwrap_or("1h") {
        "1h" => (now - chrono::Duration::hours(1), now),
        "1d" => (now - chrono::Duration::days(1), now),
        "7d" => (now - chrono::Duration::days(7), now),
        "custom" => {
            let parse = |s: &Option<String>, what: &str| {
                s.as_deref()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("range=custom needs `{what}` as an RFC 3339 time, e.g. 2026-12-02T10:00:00Z")))
            };
            (parse(&q.from, "from")?, parse(&q.to, "to")?)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown range {other:?}: use 1h, 1d, 7d or custom"),
            ));
        }
    };
    if from >= to {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`from` must be before `to`",
        ));
    }
    let live = c.fleet.device(&id, &v.scope);
    let tenant_filter = match (&v.scope, c.p.tenant_field()) {
        (Scope::Tenant(t), Some(f)) => format!(" AND \"{f}\" = {}", literal(t)),
        _ => String::new(),
    };
    let parts = partition_filter(from, to);
    let range = |col: &str| {
        format!(
            "\"{col}\" >= TIMESTAMP {} AND \"{col}\" < TIMESTAMP {}",
            literal(&from.to_rfc3339()),
            literal(&to.to_rfc3339())
        )
    };
    let timeout = c.limits(&v.scope).1;
    let run = |sql: String| {
        let c = c.clone();
        async move {
            let a = query::run(&c.ctx, &sql, 5_000, timeout).await?;
            Ok::<_, ApiError>(
                serde_json::from_slice::<serde_json::Value>(&query::to_json(&a.batches)?)
                    .unwrap_or_default(),
            )
        }
    };
    let aggregates = match &c.device_table {
        Some(t) => {
            run(format!(
                "SELECT * FROM \"{t}\" WHERE \"{key}\" = {}{tenant_filter} AND {}{parts} ORDER BY window_start",
                literal(&id),
                range(crate::columns::WINDOW_START)
            ))
            .await?
        }
        None => serde_json::Value::Array(vec![]),
    };
    let readings = match &c.p.outputs.raw {
        Some(raw) => {
            let ts = &c.p.event_time.field;
            run(format!(
                "SELECT * FROM \"{raw}\" WHERE \"{key}\" = {}{tenant_filter} AND {}{parts} ORDER BY \"{ts}\" DESC LIMIT 50",
                literal(&id),
                range(ts)
            ))
            .await?
        }
        None => serde_json::Value::Array(vec![]),
    };
    let alerts = run(format!(
        "SELECT rule, kind, event_time, detail FROM \"{}\" WHERE key = {} AND {}{parts} ORDER BY event_time DESC LIMIT 200",
        c.p.outputs.alerts,
        literal(&id),
        range(crate::columns::EVENT_TIME)
    ))
    .await?;
    // The alerts table has no tenant column: a tenant's viewer sees the rows whose record
    // names its tenant.
    let alerts = match (&v.scope, c.p.tenant_field(), alerts) {
        (Scope::Tenant(t), Some(f), serde_json::Value::Array(rows)) => serde_json::Value::Array(
            rows.into_iter()
                .filter(|r| {
                    r["detail"]
                        .as_str()
                        .and_then(|d| crate::live::tenant_of(d, f))
                        .as_deref()
                        == Some(t.as_str())
                })
                .collect(),
        ),
        (Scope::Tenant(_), _, _) => serde_json::Value::Array(vec![]),
        (_, _, a) => a,
    };
    // A device of another tenant does not exist for this viewer.
    if live.is_none()
        && aggregates.as_array().is_none_or(|a| a.is_empty())
        && readings.as_array().is_none_or(|a| a.is_empty())
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id} in this range"),
        ));
    }
    Ok(axum::Json(serde_json::json!({
        "device": id, "from": from.to_rfc3339(), "to": to.to_rfc3339(),
        "table": c.device_table, "live": live, "aggregates": aggregates,
        "readings": readings, "alerts": alerts,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct QueryBody {
    sql: String,
    limit: Option<usize>,
}

/// `POST /api/query` with `{"sql": "...", "limit": N}`; the answer's format follows
/// `Accept`: `application/json` (default), `text/csv`, `application/vnd.apache.arrow.stream`.
async fn run_query(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let v = c.poster(&headers).await?;
    let q: QueryBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON like {{\"sql\": \"SELECT ...\", \"limit\": 100}}: {e}"),
        )
    })?;
    let (rows, timeout) = c.limits(&v.scope);
    let limit = q.limit.unwrap_or(rows).min(rows);
    let ctx = c.session(&v.scope).await?;
    let answer = query::run(&ctx, &q.sql, limit, timeout).await?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("application/json");
    let truncated = HeaderValue::from_static(if answer.truncated { "true" } else { "false" });
    let (ctype, body) = if accept.contains("text/csv") {
        ("text/csv; charset=utf-8", query::to_csv(&answer.batches)?)
    } else if accept.contains("application/vnd.apache.arrow.stream") {
        let schema = answer
            .batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
        (
            "application/vnd.apache.arrow.stream",
            query::to_arrow(&answer.batches, &schema)?,
        )
    } else {
        ("application/json", query::to_json(&answer.batches)?)
    };
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, ctype)], body).into_response();
    r.headers_mut().insert("x-shardlake-truncated", truncated);
    Ok(r)
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// ` AND (...)` over the partition columns naming the hours (or, for long ranges, the days)
/// from `from` to `to`, so a device's page reads only those directories; empty past 62 days.
fn partition_filter(
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> String {
    use chrono::{Datelike, DurationRound, Timelike};
    let hours = (to - from).num_hours();
    let mut terms = Vec::new();
    if hours <= 72 {
        let mut t = from
            .duration_trunc(chrono::Duration::hours(1))
            .expect("in range");
        while t < to {
            terms.push(format!(
                "(year = '{:04}' AND month = '{:02}' AND day = '{:02}' AND hour = '{:02}')",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            ));
            t += chrono::Duration::hours(1);
        }
    } else if hours <= 62 * 24 {
        let mut t = from
            .duration_trunc(chrono::Duration::days(1))
            .expect("in range");
        while t < to {
            terms.push(format!(
                "(year = '{:04}' AND month = '{:02}' AND day = '{:02}')",
                t.year(),
                t.month(),
                t.day()
            ));
            t += chrono::Duration::days(1);
        }
    } else {
        return String::new();
    }
    format!(" AND ({})", terms.join(" OR "))
}

/// The newest alerts of the last day in the lake, oldest first.
async fn recent_alerts(p: &Pipeline, ctx: &SessionContext) -> anyhow::Result<Vec<AlertRow>> {
    let now = chrono::Utc::now();
    let sql = format!(
        "SELECT rule, kind, event_time, key, detail FROM \"{}\" WHERE true{} ORDER BY event_time DESC LIMIT 1000",
        p.outputs.alerts,
        partition_filter(
            now - chrono::Duration::days(1),
            now + chrono::Duration::hours(1)
        )
    );
    let batches: Vec<RecordBatch> = ctx.sql(&sql).await?.collect().await?;
    let mut rows: Vec<AlertRow> = batches
        .iter()
        .flat_map(|b| crate::live::alert_rows(b, p.tenant_field()))
        .collect();
    rows.reverse();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_filter_names_each_hour_or_day() {
        let t = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let f = partition_filter(t("2026-12-01T22:30:00Z"), t("2026-12-02T00:10:00Z"));
        assert_eq!(f.matches(" OR ").count(), 2, "{f}");
        assert!(
            f.contains("day = '01' AND hour = '22'") && f.contains("day = '02' AND hour = '00'"),
            "{f}"
        );
        let f = partition_filter(t("2026-11-01T00:00:00Z"), t("2026-11-08T00:00:00Z"));
        assert_eq!(f.matches(" OR ").count(), 6, "{f}");
        assert!(!f.contains("hour"));
        assert_eq!(
            partition_filter(t("2026-01-01T00:00:00Z"), t("2026-12-01T00:00:00Z")),
            ""
        );
        assert_eq!(literal("a'b"), "'a''b'");
    }
}
