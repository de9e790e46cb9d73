//! Pipeline and schema configuration: loading, `${VAR}` substitution, and validation that
//! reports every problem at once with the file, the line, the field and the fix.
//!
//! Loading goes YAML → a JSON value tree (so `${VAR}` is replaced in values, never in keys)
//! → the typed [`file`] → [`Pipeline`], whose values are parsed and checked. The parts:
//! [`problem`] (what a problem says), [`load`] (the YAML loader, which the Pi agent uses too),
//! [`file`] (the YAML as written), [`resolve`] (the checks, a file per section) and [`model`]
//! (the checked result). Every public item is re-exported here, as `crate::config::X`.

mod file;
mod load;
mod model;
mod problem;
mod resolve;
mod yaml_index;

use std::path::Path;

use file::{PipelineFile, SchemaFile};
use load::{read_yaml, redact, typed};
use resolve::{resolve_pipeline, resolve_schema};

pub use file::{FieldType, TimeFormat};
pub use load::{Env, expand, load_file, process_env};
pub use model::{
    Aggregation, AlertRule, Check, Checkpoints, CommandAction, CommandsBroker, Compaction,
    Compression, Console, ConsoleAuth, Detector, DetectorKind, Endpoints, EventTime, FanOut, Field,
    Identity, Issuer, IssuerKind, KeyPart, KinesisSource, KnownDevices, LakeLocation, LeaseTable,
    Notifier, NotifyTarget, ObjectFormat, ObjectNotifications, ObjectSource, ObjectStoreAt,
    Outputs, Pipeline, QueryLimits, RESERVED_COLUMNS, RecordSchema, RoleGroups, Rollover,
    S3Location, SERIES_SEP, STORAGE_CLASSES, Secret, Source, StartAt, TableFormat, hash_key,
};
pub use problem::{ConfigError, Problem, Problems, is_ident, parse_bytes};
pub use yaml_index::LineIndex;

/// Loads a schema file on its own (`shardlake validate schemas/x.yaml`).
pub fn load_schema(path: &Path, env: Env) -> Result<RecordSchema, ConfigError> {
    load_file(path, env, |f: SchemaFile, p| resolve_schema(path, f, p))
}

/// Loads and checks a pipeline file and its schema. SQL is checked by the engine
/// (`engine::sql::load`), which needs DataFusion.
pub fn load_pipeline(path: &Path, env: Env) -> Result<Pipeline, ConfigError> {
    match load_pipeline_partial(path, env) {
        (Some(p), problems) if problems.is_empty() => Ok(p),
        (_, problems) => Err(ConfigError { problems }),
    }
}

/// Like [`load_pipeline`], but returns the pipeline as far as it resolved beside the problems
/// found, so later checks (SQL) can still run and every problem is reported at once. A rule
/// naming a missing aggregation is left out of the returned pipeline.
pub fn load_pipeline_partial(path: &Path, env: Env) -> (Option<Pipeline>, Vec<Problem>) {
    let (value, lines, subs) = match read_yaml(path, env) {
        Ok(v) => v,
        Err(e) => return (None, e.problems),
    };
    let mut p = Problems::new(path, &lines);
    let Some(f) = typed::<PipelineFile>(value, &mut p) else {
        redact(&mut p.list, &subs);
        return (None, p.list);
    };
    let mut extra = Vec::new();
    let schema_path = path.parent().unwrap_or(Path::new(".")).join(&f.schema);
    let schema = match load_schema(&schema_path, env) {
        Ok(s) => Some(s),
        Err(e) => {
            if !schema_path.exists() {
                p.add(
                    "schema",
                    format!("schema file {} does not exist", schema_path.display()),
                    "give a path relative to this pipeline file, e.g. ../schemas/well-reading.yaml",
                );
            } else {
                extra = e.problems;
            }
            None
        }
    };
    let pipeline = resolve_pipeline(path, f, schema, lines.clone(), &mut p);
    p.list.extend(extra);
    redact(&mut p.list, &subs);
    (pipeline, p.list)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Writes `s.yaml` (one timestamp field `ts`) into `dir`; returns the path for a pipeline
    /// named `pipeline` next to it.
    fn with_ts_schema(dir: &tempfile::TempDir, pipeline: &str) -> std::path::PathBuf {
        std::fs::write(
            dir.path().join("s.yaml"),
            "name: s\nfields:\n  - {name: ts, type: timestamp}\n",
        )
        .unwrap();
        dir.path().join(pipeline)
    }

    #[test]
    fn problems_never_show_what_a_variable_held() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        // A token pasted into the wrong fields: a stream name and a duration.
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\nsource: {kinesis: {stream: 'x/${TOKEN}', poll_interval: '${SHORT}'}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "TOKEN" => Some("tok-9f8e7d6c5b".to_string()),
            "SHORT" => Some("abc".to_string()),
            _ => None,
        };
        let err = load_pipeline(&pipe, &env).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert!(!text.contains("9f8e7d6c5b"), "{text}");
        assert!(!text.contains("`abc`"), "{text}");
        assert!(
            text.contains("`x/${TOKEN}` is not a Kinesis stream name"),
            "{text}"
        );
        assert!(
            text.contains("source.kinesis.poll_interval: `${SHORT}`"),
            "{text}"
        );
    }

    #[test]
    fn a_table_rollover_falls_back_to_the_pipeline_default() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\nsource: {local: {path: x}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\nrollover: {max_bytes: 1MiB, max_age: 2m}\noutputs:\n  raw: {name: raw, rollover: {max_bytes: 8MiB}}\n  alerts: {name: alerts, rollover: {max_age: 10s}}\n",
        )
        .unwrap();
        let p = load_pipeline(&pipe, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let r = &p.outputs.rollover;
        assert_eq!(
            (r["raw"].max_bytes, r["raw"].max_age),
            (8 << 20, Duration::from_secs(120))
        );
        assert_eq!(
            (r["alerts"].max_bytes, r["alerts"].max_age),
            (1 << 20, Duration::from_secs(10))
        );
        assert_eq!(
            (r["late"].max_bytes, r["late"].max_age),
            (1 << 20, Duration::from_secs(120))
        );
    }

    #[test]
    fn the_raw_table_can_be_switched_off() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        let head = "name: p\nschema: s.yaml\nsource: {local: {path: x}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\noutputs:\n";
        let load = |raw: &str| {
            std::fs::write(&pipe, format!("{head}  raw: {raw}\n")).unwrap();
            load_pipeline(&pipe, &|_| None)
        };
        let off = load("false").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.outputs.raw, None);
        assert_eq!(off.table_names(), ["dead_letter", "late", "alerts"]);
        assert!(!off.outputs.rollover.contains_key("records"));
        let on = load("true").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on.outputs.raw.as_deref(), Some("records"));
        let named = load("{name: readings}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named.table_names()[0], "readings");

        let err = load("{name: readings, colour: red}").unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].field, "outputs.raw.colour", "{err}");
        assert_eq!(err.problems[0].line, Some(8), "{err}");
        let err = load("7").unwrap_err();
        assert_eq!(err.problems[0].field, "outputs.raw", "{err}");
        assert!(
            err.to_string().contains("`false` for no raw table"),
            "{err}"
        );
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("s.yaml");
        std::fs::write(
            &schema,
            "name: s\nfields:\n  - {name: ts, type: timestamp, required: true}\n",
        )
        .unwrap();
        let pipe = dir.path().join("p.yaml");
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\ncolour: red\nsource: {local: {path: x}}\nlake: {local: {path: y}}\ncheckpoints: {local: {path: z}}\nevent_time:\n  field: ts\n  lateness: 5s\n",
        )
        .unwrap();
        let err = load_pipeline(&pipe, &|_| None).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert_eq!(err.problems[0].line, Some(3), "{text}");
        assert!(text.contains("unknown key `colour`"), "{text}");
        assert_eq!(err.problems[1].field, "event_time.lateness", "{text}");
        assert_eq!(err.problems[1].line, Some(9), "{text}");
        assert!(text.contains("allowed_lateness"), "{text}");
    }

    /// The head of a valid pipeline file, for the console cases.
    const HEAD: &str = "name: p\nschema: s.yaml\nsource: {local: {path: x}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\n";

    #[test]
    fn the_console_signs_in_with_none_by_default_or_an_oidc_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        std::fs::write(&pipe, HEAD).unwrap();
        let p = load_pipeline(&pipe, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let auth = &p.console.auth;
        assert_eq!(auth.issuer, None);
        assert_eq!(
            (auth.tenant_claim.as_str(), auth.groups_claim.as_str()),
            ("custom:tenant", "groups")
        );
        assert_eq!(auth.roles.operator, ["operators"]);
        assert_eq!(auth.roles.admin, ["platform-admins"]);
        assert!(auth.roles.viewer.is_empty());

        std::fs::write(
            &pipe,
            format!("{HEAD}console:\n  auth:\n    oidc:\n      issuer: http://127.0.0.1:9000\n      client_id: console\n      client_secret: ${{SECRET}}\n      redirect_url: http://127.0.0.1:8080/auth/callback\n  claims: {{tenant: org}}\n  roles: {{viewer: [staff], operator: [ops]}}\n"),
        )
        .unwrap();
        let env = |k: &str| (k == "SECRET").then(|| "s3cr3t-value".to_string());
        let p = load_pipeline(&pipe, &env).unwrap_or_else(|e| panic!("{e}"));
        let auth = &p.console.auth;
        let issuer = auth.issuer.as_ref().unwrap();
        assert_eq!(issuer.kind, IssuerKind::Oidc);
        assert_eq!(issuer.issuer, "http://127.0.0.1:9000");
        assert_eq!(
            issuer.client_secret.as_ref().unwrap().expose(),
            "s3cr3t-value"
        );
        assert_eq!(issuer.audience, "console");
        assert_eq!(issuer.scopes, ["openid", "profile", "email"]);
        assert_eq!(issuer.endpoints, None);
        assert_eq!(auth.tenant_claim, "org");
        assert_eq!(auth.roles.viewer, ["staff"]);
        assert_eq!(auth.roles.operator, ["ops"]);
        // The secret never shows in Debug.
        assert!(!format!("{p:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn a_cognito_pool_gives_its_issuer_jwks_and_hosted_ui_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        std::fs::write(
            &pipe,
            format!("{HEAD}console:\n  auth: {{cognito: {{user_pool_id: eu-west-1_AbC123, region: eu-west-1, client_id: abc, domain: wells.auth.eu-west-1.amazoncognito.com, redirect_url: 'https://console.example.com/auth/callback'}}}}\n"),
        )
        .unwrap();
        let p = load_pipeline(&pipe, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let auth = &p.console.auth;
        let i = auth.issuer.as_ref().unwrap();
        assert_eq!(i.kind, IssuerKind::Cognito);
        assert_eq!(
            i.issuer,
            "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123"
        );
        assert_eq!(
            i.jwks_url.as_deref(),
            Some(
                "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123/.well-known/jwks.json"
            )
        );
        let e = i.endpoints.as_ref().unwrap();
        assert_eq!(
            e.authorization,
            "https://wells.auth.eu-west-1.amazoncognito.com/oauth2/authorize"
        );
        assert_eq!(
            e.token,
            "https://wells.auth.eu-west-1.amazoncognito.com/oauth2/token"
        );
        assert_eq!(i.client_secret, None);
        assert_eq!(auth.groups_claim, "cognito:groups");
    }

    #[test]
    fn bad_console_sign_in_settings_are_each_reported_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        let load = |console: &str| {
            std::fs::write(&pipe, format!("{HEAD}console:\n{console}")).unwrap();
            let env = |k: &str| (k == "SECRET").then(|| "hush-hush-9876".to_string());
            load_pipeline(&pipe, &env).unwrap_err()
        };
        // Line 7 is `console:`, so the first line inside it is 8.
        let err = load(
            "  auth:\n    oidc:\n      issuer: http://login.example.com\n      client_id: ''\n      client_secret: ${SECRET}\n      redirect_url: https://console.example.com/callback\n      scopes: [profile]\n      jwks_url: ftp://x\n",
        );
        let text = err.to_string();
        let fields: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.field.as_str(), p.line))
            .collect();
        assert_eq!(
            fields,
            [
                ("console.auth.oidc.issuer", Some(10)),
                ("console.auth.oidc.client_id", Some(11)),
                ("console.auth.oidc.redirect_url", Some(13)),
                ("console.auth.oidc.jwks_url", Some(15)),
                ("console.auth.oidc.scopes", Some(14)),
            ],
            "{text}"
        );
        assert!(
            text.contains("plain http on a host that is not loopback"),
            "{text}"
        );
        assert!(text.contains("does not end in /auth/callback"), "{text}");
        assert!(text.contains("leave out `openid`"), "{text}");
        assert!(!text.contains("hush-hush"), "{text}");

        let err = load(
            "  auth: {cognito: {user_pool_id: us-east-1_abc, region: eu-west-1, client_id: c, domain: 'x y', redirect_url: 'https://c.example.com/auth/callback', client_secret: ''}}\n",
        );
        let text = err.to_string();
        let fields: Vec<_> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "console.auth.cognito.user_pool_id",
                "console.auth.cognito.client_secret",
                "console.auth.cognito.domain",
            ],
            "{text}"
        );
        assert!(
            text.contains("is in us-east-1, not in `region: eu-west-1`"),
            "{text}"
        );

        let err = load("  auth: {saml: {}}\n");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].field, "console.auth", "{err}");
        assert!(err.to_string().contains("unknown variant `saml`"), "{err}");

        let err = load("  auth: none\n  roles: {operators: [ops]}\n");
        assert_eq!(err.problems[0].field, "console.roles.operators", "{err}");
        assert_eq!(err.problems[0].line, Some(9), "{err}");

        let err = load(
            "  auth: {oidc: {issuer: 'https://i.example.com', client_id: c, redirect_url: 'https://c.example.com/auth/callback'}}\n",
        );
        assert!(
            err.to_string().contains("missing field `client_secret`"),
            "{err}"
        );
    }
}
