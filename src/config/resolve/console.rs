//! `console:`: how console users sign in (`none`, any OpenID Connect issuer, or a Cognito user
//! pool's hosted UI) and how their tenant and role are read from their tokens. Secrets
//! (`client_secret`) are never repeated in a message.

use crate::config::file::{
    ClaimsFile, CognitoFile, ConsoleAuthFile, ConsoleFile, OidcFile, RolesFile,
};
use crate::config::{
    Console, ConsoleAuth, Endpoints, Issuer, IssuerKind, Problems, QueryLimits, RoleGroups, Secret,
};

/// The path the console serves the sign-in callback on; `redirect_url` must end in it.
const CALLBACK_PATH: &str = ConsoleAuth::CALLBACK_PATH;

const DEFAULT_SCOPES: &[&str] = &["openid", "profile", "email"];

pub(super) fn resolve_console(p: &mut Problems, f: ConsoleFile) -> Console {
    let (issuer, default_groups) = match f.auth {
        ConsoleAuthFile::None => (None, "groups"),
        ConsoleAuthFile::Oidc(o) => (Some(resolve_oidc(p, o)), "groups"),
        ConsoleAuthFile::Cognito(c) => (Some(resolve_cognito(p, c)), "cognito:groups"),
    };
    let ClaimsFile { tenant, groups } = f.claims;
    let tenant_claim = claim_name(p, "console.claims.tenant", tenant, "custom:tenant");
    let groups_claim = claim_name(p, "console.claims.groups", groups, default_groups);
    let mut tenant_limits = std::collections::BTreeMap::new();
    for (tenant, l) in f.query.tenants {
        let at = |k: &str| format!("console.query.tenants.{tenant}.{k}");
        if l.max_rows == Some(0) {
            p.add(
                &at("max_rows"),
                "must be more than zero",
                "write the most rows a query of this tenant may return, e.g. 1000",
            );
        }
        let timeout = l.timeout.as_deref().map(|t| p.duration(&at("timeout"), t));
        if timeout.is_some_and(|t| t.is_zero()) {
            p.add(
                &at("timeout"),
                "must be more than zero",
                "write how long a query may run, e.g. 5s",
            );
        }
        tenant_limits.insert(
            tenant,
            QueryLimits {
                max_rows: l.max_rows.map(|n| n as usize),
                timeout,
            },
        );
    }
    Console {
        auth: ConsoleAuth {
            issuer,
            tenant_claim,
            groups_claim,
            roles: resolve_roles(p, f.roles),
        },
        tenant_limits,
    }
}

fn claim_name(p: &mut Problems, field: &str, name: Option<String>, default: &str) -> String {
    let name = name.unwrap_or_else(|| default.to_string());
    if name.trim().is_empty() || name.trim() != name {
        p.add(
            field,
            format!("`{name}` is not a claim name"),
            format!("name the token claim, e.g. `{default}`"),
        );
    }
    name
}

fn resolve_roles(p: &mut Problems, r: RolesFile) -> RoleGroups {
    for (role, groups) in [
        ("viewer", &r.viewer),
        ("operator", &r.operator),
        ("admin", &r.admin),
    ] {
        for (i, g) in groups.iter().enumerate() {
            if g.trim().is_empty() {
                p.add(
                    &format!("console.roles.{role}[{i}]"),
                    "a group name is empty",
                    "name the group as the issuer's groups claim lists it, e.g. operators",
                );
            }
        }
    }
    RoleGroups {
        viewer: r.viewer,
        operator: r.operator,
        admin: r.admin,
    }
}

fn resolve_oidc(p: &mut Problems, o: OidcFile) -> Issuer {
    let at = |k: &str| format!("console.auth.oidc.{k}");
    check_url(
        p,
        &at("issuer"),
        &o.issuer,
        "write the issuer as its tokens' `iss` says, e.g. https://login.example.com",
    );
    if o.issuer.contains('?') || o.issuer.contains('#') {
        p.add(
            &at("issuer"),
            format!(
                "`{}` has a query or fragment; an issuer has neither",
                o.issuer
            ),
            "write the issuer as its tokens' `iss` says, e.g. https://login.example.com",
        );
    }
    non_empty(
        p,
        &at("client_id"),
        &o.client_id,
        "the client id the issuer gave the console",
    );
    if o.client_secret.is_empty() {
        p.add(
            &at("client_secret"),
            "the client secret is empty",
            "give it from the environment: client_secret: ${CONSOLE_CLIENT_SECRET}",
        );
    }
    check_redirect(p, &at("redirect_url"), &o.redirect_url);
    if let Some(u) = &o.jwks_url {
        check_url(
            p,
            &at("jwks_url"),
            u,
            "write the issuer's JWKS URL, or leave it out to use discovery",
        );
    }
    let scopes = resolve_scopes(p, &at("scopes"), o.scopes);
    Issuer {
        kind: IssuerKind::Oidc,
        audience: o.audience.unwrap_or_else(|| o.client_id.clone()),
        issuer: o.issuer,
        client_id: o.client_id,
        client_secret: Some(Secret(o.client_secret)),
        redirect_url: o.redirect_url,
        scopes,
        jwks_url: o.jwks_url,
        endpoints: None,
    }
}

fn resolve_cognito(p: &mut Problems, c: CognitoFile) -> Issuer {
    let at = |k: &str| format!("console.auth.cognito.{k}");
    let region_ok = c.region.split('-').count() >= 3
        && c.region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        p.add(
            &at("region"),
            format!("`{}` is not an AWS region", c.region),
            "write the user pool's region, e.g. eu-west-1",
        );
    }
    match c.user_pool_id.split_once('_') {
        Some((region, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            if region_ok && region != c.region {
                p.add(
                    &at("user_pool_id"),
                    format!(
                        "user pool `{}` is in {region}, not in `region: {}`",
                        c.user_pool_id, c.region
                    ),
                    format!("set `region: {region}`, or give the pool of {}", c.region),
                );
            }
        }
        _ => p.add(
            &at("user_pool_id"),
            format!("`{}` is not a user pool id", c.user_pool_id),
            "write <region>_<id> as the Cognito console shows it, e.g. eu-west-1_AbCdEf123",
        ),
    }
    non_empty(p, &at("client_id"), &c.client_id, "the app client's id");
    if c.client_secret.as_deref() == Some("") {
        p.add(
            &at("client_secret"),
            "the client secret is empty",
            "leave it out for an app client without a secret, or give it from the environment: ${CONSOLE_CLIENT_SECRET}",
        );
    }
    let domain = c
        .domain
        .strip_prefix("https://")
        .unwrap_or(&c.domain)
        .trim_end_matches('/')
        .to_string();
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':');
    if !domain_ok {
        p.add(
            &at("domain"),
            format!("`{}` is not a hosted UI domain", c.domain),
            "write the domain alone, e.g. wells.auth.eu-west-1.amazoncognito.com",
        );
    }
    check_redirect(p, &at("redirect_url"), &c.redirect_url);
    if let Some(u) = &c.jwks_url {
        check_url(
            p,
            &at("jwks_url"),
            u,
            "leave it out: it defaults to the pool's JWKS",
        );
    }
    let scopes = resolve_scopes(p, &at("scopes"), c.scopes);
    let issuer = format!(
        "https://cognito-idp.{}.amazonaws.com/{}",
        c.region, c.user_pool_id
    );
    let base = format!("https://{domain}");
    Issuer {
        kind: IssuerKind::Cognito,
        jwks_url: Some(
            c.jwks_url
                .unwrap_or_else(|| format!("{issuer}/.well-known/jwks.json")),
        ),
        issuer,
        audience: c.client_id.clone(),
        client_id: c.client_id,
        client_secret: c.client_secret.map(Secret),
        redirect_url: c.redirect_url,
        scopes,
        endpoints: Some(Endpoints {
            authorization: format!("{base}/oauth2/authorize"),
            token: format!("{base}/oauth2/token"),
            userinfo: Some(format!("{base}/oauth2/userInfo")),
        }),
    }
}

fn non_empty(p: &mut Problems, field: &str, value: &str, what: &str) {
    if value.trim().is_empty() {
        p.add(field, "is empty", format!("give {what}"));
    }
}

/// `https://…`, or `http://` on a loopback host (a local test issuer).
fn check_url(p: &mut Problems, field: &str, url: &str, fix: &str) {
    if url.starts_with("https://") && url.len() > "https://".len() {
        return;
    }
    if let Some(rest) = url.strip_prefix("http://") {
        if is_loopback_host(rest) {
            return;
        }
        p.add(
            field,
            format!("`{url}` is plain http on a host that is not loopback"),
            "use https:// (plain http only for 127.0.0.1, [::1] or localhost)",
        );
        return;
    }
    p.add(field, format!("`{url}` is not an https:// URL"), fix);
}

/// Whether the authority at the start of `rest` (after `http://`) is a loopback host.
fn is_loopback_host(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check_redirect(p: &mut Problems, field: &str, url: &str) {
    check_url(
        p,
        field,
        url,
        "write the console's own URL with /auth/callback, e.g. https://console.example.com/auth/callback",
    );
    let path_end = url.split(['?', '#']).next().unwrap_or(url);
    if !path_end.ends_with(CALLBACK_PATH) || url.contains(['?', '#']) {
        p.add(
            field,
            format!("`{url}` does not end in {CALLBACK_PATH}, where the console takes the issuer's answer"),
            format!("write the console's address followed by {CALLBACK_PATH}, and register that URL at the issuer"),
        );
    }
}

fn resolve_scopes(p: &mut Problems, field: &str, scopes: Option<Vec<String>>) -> Vec<String> {
    let scopes = scopes.unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    if !scopes.iter().any(|s| s == "openid") {
        p.add(
            field,
            "the scopes leave out `openid`, so the issuer sends no ID token",
            "add `openid`, e.g. [openid, profile, email]",
        );
    }
    for (i, s) in scopes.iter().enumerate() {
        if s.is_empty() || s.contains(char::is_whitespace) {
            p.add(
                &format!("{field}[{i}]"),
                format!("`{s}` is not a scope"),
                "give one scope per list item, without spaces",
            );
        }
    }
    scopes
}
