//! Sign-in for the console: who a request's user is, and whether a POST comes from the
//! console's own pages.
//!
//! - **Sign-in** is OpenID Connect's authorization-code flow with PKCE (S256), `state` and
//!   `nonce`, against any issuer (endpoints from its discovery document) or a Cognito user
//!   pool's hosted UI. `GET /auth/login?next=/path` sends the browser to the issuer;
//!   `GET /auth/callback` exchanges the code, verifies the ID token ([`verify`]), reads the
//!   user's tenant and role from its claims (and from userinfo when the ID token lacks them,
//!   as oidc-provider's `conformIdTokenClaims` does) and starts a session; `POST /auth/logout`
//!   ends it.
//! - **Sessions** ([`session`]) live on the server; the cookie holds a random id only
//!   (`HttpOnly`, `SameSite=Lax`, `Secure` and the `__Host-` prefix unless the console is on
//!   loopback over plain http). A session ends when its ID token expires, or on logout.
//! - **API clients** send `Authorization: Bearer <access token>`, verified on every request
//!   (signature against the issuer's JWKS, `iss`, `exp`/`nbf`, `aud` or Cognito's `client_id`,
//!   Cognito's `token_use: access`). When the access token lacks the tenant or groups claim
//!   (Cognito's never holds custom attributes), they are looked up once per token: Cognito's
//!   `GetUser` with the token, or the issuer's userinfo endpoint.
//! - **Cross-site POSTs** ([`Auth::check_csrf`]) are refused by the headers browsers set and
//!   pages cannot: `Sec-Fetch-Site` must be `same-origin` (or `none`); without it `Origin`
//!   must be the console's own. A request carrying only a Bearer token and no cookie carries
//!   no ambient credential and passes.
//! - **`auth: none`** (the embedded default) makes every request a local platform admin; it
//!   is refused unless the console listens on loopback, and then requests must name a
//!   loopback `Host` (so a DNS-rebound page cannot read the console).
//!
//! Nothing here logs a token, a cookie value, the client secret or an authorization code.
//!
//! Wiring, in the console's router: merge [`Auth::routes`]; in every handler call
//! [`Auth::user`] first (a [`Denied`] is a response as it is: 401 JSON for the API, or
//! redirect a page to `/auth/login?next=<path>` on a 401), then for a POST
//! [`Auth::check_csrf`], then check the [`Role`] and scope by [`User::tenant`]:
//!
//! ```ignore
//! let auth = Auth::new(&pipeline.console.auth, listen).await?;
//! let app = Router::new()
//!     .route("/api/fleet", get(move |headers: HeaderMap| async move {
//!         match auth2.user(&headers).await {
//!             Ok(user) => Json(fleet_for(&user)).into_response(),
//!             Err(denied) => denied.into_response(),
//!         }
//!     }))
//!     .merge(auth.routes());
//! ```

pub mod jwks;
pub mod session;
pub mod verify;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ConsoleAuth, Issuer, IssuerKind};
use jwks::Jwks;
use session::{Pending, Store, now_secs, random_id};
use verify::{Claims, Expect, Verifier, user_from_claims};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads its tenant's fleet, alerts and lake.
    Viewer,
    /// A viewer who also acknowledges alerts.
    Operator,
    /// A platform admin: every tenant.
    Admin,
}

/// A signed-in user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    /// The issuer's subject id.
    pub sub: String,
    /// For display: `name`, `email` or the user name claim, else `sub`.
    pub name: String,
    /// `None` only for a platform admin.
    pub tenant: Option<String>,
    pub role: Role,
}

/// A request refused: 401 (no or bad credentials), 403 (signed in but not allowed, or a
/// cross-site POST), 503 (the issuer's keys cannot be fetched). As a response it is JSON
/// `{"error": message}`, with `WWW-Authenticate: Bearer` on a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: StatusCode,
    pub message: String,
}

impl Denied {
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for Denied {}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(serde_json::json!({"error": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The token endpoint's answer: OAuth's fields and the ID token.
#[derive(Clone, Deserialize, serde::Serialize)]
struct IdTokenField {
    #[serde(default)]
    id_token: Option<String>,
}

impl std::fmt::Debug for IdTokenField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdTokenField(<not shown>)")
    }
}

impl ExtraTokenFields for IdTokenField {}

type Tokens = StandardTokenResponse<IdTokenField, BasicTokenType>;
type OauthClient = oauth2::Client<
    BasicErrorResponse,
    Tokens,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Sign-in through an issuer.
struct SignIn {
    issuer: Issuer,
    client: OauthClient,
    http: reqwest::Client,
    verifier: Verifier,
    userinfo: Option<String>,
    /// Cognito's API endpoint for `GetUser` (the tenant of a Bearer access token).
    cognito_api: Option<String>,
    /// Claims looked up for Bearer tokens, by the token's SHA-256, until the token expires.
    lookups: Mutex<HashMap<[u8; 32], (Claims, u64)>>,
    /// `scheme://host[:port]` of `redirect_url`: the console's own origin.
    origin: String,
}

/// Bearer lookups cached at most.
const MAX_LOOKUPS: usize = 10_000;

/// Sign-in and sessions for one console.
pub struct Auth {
    cfg: ConsoleAuth,
    /// `None`: `auth: none`.
    sign_in: Option<SignIn>,
    sessions: Store,
    /// Cookies carry `Secure` (and the `__Host-` prefix).
    secure: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.sign_in.as_ref().map(|s| &s.issuer.issuer))
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

/// The issuer's discovery document (the fields used).
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    #[serde(default)]
    userinfo_endpoint: Option<String>,
    jwks_uri: String,
}

impl Auth {
    /// Sets up sign-in: for an OIDC issuer, reads its discovery document; fetches the signing
    /// keys once, so a wrong URL fails here and not at the first sign-in. `auth: none` is
    /// refused unless `listen` is a loopback address.
    pub async fn new(cfg: &ConsoleAuth, listen: SocketAddr) -> anyhow::Result<Arc<Auth>> {
        let loopback = listen.ip().is_loopback();
        let Some(issuer) = &cfg.issuer else {
            if !loopback {
                bail!(
                    "console.auth is `none`, which lets anyone who reaches {listen} in as a platform admin; \
                     it is only allowed on a loopback address: listen on 127.0.0.1, or configure \
                     console.auth with `oidc` or `cognito`"
                );
            }
            return Ok(Arc::new(Auth {
                cfg: cfg.clone(),
                sign_in: None,
                sessions: Store::default(),
                secure: false,
            }));
        };
        let http = reqwest::Client::builder()
            // The token endpoint must not redirect the code elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .context("building the HTTP client for sign-in")?;
        let (authorization, token, userinfo, jwks_url) = match &issuer.endpoints {
            Some(e) => (
                e.authorization.clone(),
                e.token.clone(),
                e.userinfo.clone(),
                issuer.jwks_url.clone().unwrap_or_default(),
            ),
            None => {
                let d = discover(&http, &issuer.issuer).await?;
                let jwks = issuer.jwks_url.clone().unwrap_or(d.jwks_uri);
                (
                    d.authorization_endpoint,
                    d.token_endpoint,
                    d.userinfo_endpoint,
                    jwks,
                )
            }
        };
        let mut client =
            oauth2::Client::new(ClientId::new(issuer.client_id.clone()))
                .set_auth_uri(AuthUrl::new(authorization.clone()).with_context(|| {
                    format!("the issuer's authorization endpoint `{authorization}` is not a URL")
                })?)
                .set_token_uri(TokenUrl::new(token.clone()).with_context(|| {
                    format!("the issuer's token endpoint `{token}` is not a URL")
                })?)
                .set_redirect_uri(RedirectUrl::new(issuer.redirect_url.clone()).with_context(
                    || {
                        format!(
                            "console.auth redirect_url `{}` is not a URL",
                            issuer.redirect_url
                        )
                    },
                )?);
        if let Some(secret) = &issuer.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose().to_string()));
        }
        let verifier = Verifier {
            kind: issuer.kind,
            issuer: issuer.issuer.clone(),
            client_id: issuer.client_id.clone(),
            audience: issuer.audience.clone(),
            jwks: Jwks::new(jwks_url.clone(), http.clone()),
        };
        // The first fetch: a wrong JWKS URL fails the start, not the first sign-in.
        if let Err(jwks::KeyError::Unavailable(why)) = verifier.jwks.key("").await {
            bail!("cannot read the issuer's signing keys: {why}");
        }
        let cognito_api = (issuer.kind == IssuerKind::Cognito).then(|| {
            crate::aws::custom_endpoint("COGNITO_IDENTITY_PROVIDER").unwrap_or_else(|| {
                let region = issuer
                    .issuer
                    .strip_prefix("https://cognito-idp.")
                    .and_then(|r| r.split('.').next())
                    .unwrap_or("us-east-1");
                format!("https://cognito-idp.{region}.amazonaws.com/")
            })
        });
        let origin = origin_of(&issuer.redirect_url);
        let secure = !(loopback && issuer.redirect_url.starts_with("http://"));
        tracing::info!(issuer = %issuer.issuer, jwks = %jwks_url, secure_cookies = secure, "console sign-in set up");
        Ok(Arc::new(Auth {
            cfg: cfg.clone(),
            sign_in: Some(SignIn {
                issuer: issuer.clone(),
                client,
                http,
                verifier,
                userinfo,
                cognito_api,
                lookups: Mutex::new(HashMap::new()),
                origin,
            }),
            sessions: Store::default(),
            secure,
        }))
    }

    /// `GET /auth/login`, `GET /auth/callback`, `POST /auth/logout`.
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/auth/login", get(login))
            .route(ConsoleAuth::CALLBACK_PATH, get(callback))
            .route("/auth/logout", post(logout))
            .with_state(self.clone())
    }

    /// The user of a request: from `Authorization: Bearer <access token>`, else from the
    /// session cookie. With `auth: none`, the local platform admin.
    /// Whether users sign in (false with `auth: none`).
    pub fn signs_in(&self) -> bool {
        self.sign_in.is_some()
    }

    pub async fn user(&self, headers: &HeaderMap) -> Result<User, Denied> {
        let Some(s) = &self.sign_in else {
            if let Some(host) = headers.get(header::HOST)
                && !host.to_str().is_ok_and(is_loopback_authority)
            {
                return Err(Denied::forbidden(
                    "this console has no sign-in and answers only to a loopback Host (127.0.0.1, localhost, [::1])",
                ));
            }
            return Ok(local_admin());
        };
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value.to_str().unwrap_or("");
            let Some(token) = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim())
            else {
                return Err(Denied::unauthorized(
                    "the Authorization header must be `Bearer <access token>`",
                ));
            };
            return self.bearer_user(s, token).await;
        }
        match cookie(headers, self.session_cookie()) {
            Some(id) => match self.sessions.get(id) {
                Some((user, _)) => Ok(user),
                None => Err(Denied::unauthorized("the session has ended; sign in again")),
            },
            None => Err(Denied::unauthorized("sign in first (/auth/login)")),
        }
    }

    /// For POSTs: refuses a cross-site request (403). `Sec-Fetch-Site` must be
    /// `same-origin` or `none`; without it, `Origin` must be the console's own origin (that of
    /// `redirect_url`, or the request's `Host`); without either, the request is refused if it
    /// carries a cookie (a request without a cookie has no ambient credential to abuse).
    pub fn check_csrf(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
        if self.sign_in.is_none()
            && let Some(host) = text(header::HOST)
            && !is_loopback_authority(host)
        {
            return Err(Denied::forbidden(
                "this console has no sign-in and answers only to a loopback Host",
            ));
        }
        // No cookie: no ambient credential for a cross-site page to ride on (a Bearer
        // client, or `auth: none` used from a script or curl). Browsers mark their own
        // cross-site requests with Sec-Fetch-Site or Origin, checked below either way.
        let no_cookie = !headers.contains_key(header::COOKIE);
        let browser =
            headers.contains_key("sec-fetch-site") || headers.contains_key(header::ORIGIN);
        if no_cookie && (headers.contains_key(header::AUTHORIZATION) || !browser) {
            return Ok(());
        }
        if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
            return match site {
                "same-origin" | "none" => Ok(()),
                other => Err(Denied::forbidden(format!(
                    "cross-site request refused (Sec-Fetch-Site: {other})"
                ))),
            };
        }
        let Some(origin) = text(header::ORIGIN) else {
            return Err(Denied::forbidden(
                "a POST must come from the console's own page (no Origin or Sec-Fetch-Site header)",
            ));
        };
        let own = self.sign_in.as_ref().map(|s| s.origin.as_str());
        let host = text(header::HOST);
        let authority = origin.split_once("://").map(|(_, a)| a);
        let same = own == Some(origin) || (authority.is_some() && authority == host);
        if same && (self.sign_in.is_some() || authority.is_some_and(is_loopback_authority)) {
            Ok(())
        } else {
            Err(Denied::forbidden(format!(
                "cross-site request refused (Origin: {origin})"
            )))
        }
    }

    /// How many sessions are open.
    pub fn sessions(&self) -> usize {
        self.sessions.count()
    }

    fn session_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-shardlake_session"
        } else {
            "shardlake_session"
        }
    }

    fn login_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-shardlake_login"
        } else {
            "shardlake_login"
        }
    }

    fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
        ))
        .expect("cookie ids are hex")
    }

    async fn bearer_user(&self, s: &SignIn, token: &str) -> Result<User, Denied> {
        let mut claims = s.verifier.verify(token, Expect::Access).await?;
        let lacks = |c: &Claims| {
            !c.contains_key(&self.cfg.tenant_claim) || !c.contains_key(&self.cfg.groups_claim)
        };
        if lacks(&claims) {
            let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
            let extra = self.lookup(s, token, exp).await?;
            for (k, v) in extra {
                claims.entry(k).or_insert(v);
            }
        }
        user_from_claims(&self.cfg, &claims)
    }

    /// The claims an access token does not hold: Cognito's `GetUser` (custom attributes) or
    /// the issuer's userinfo, once per token.
    async fn lookup(&self, s: &SignIn, token: &str, exp: u64) -> Result<Claims, Denied> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = now_secs();
        if let Some((c, _)) = s
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|(_, e)| *e > now)
        {
            return Ok(c.clone());
        }
        let claims = if let Some(api) = &s.cognito_api {
            cognito_get_user(&s.http, api, token).await
        } else if let Some(url) = &s.userinfo {
            userinfo(&s.http, url, token).await
        } else {
            Ok(Claims::new())
        }
        .map_err(|why| {
            tracing::warn!(error = %why, "could not look up the claims of an access token");
            Denied::unauthorized("the access token's user could not be looked up")
        })?;
        let mut m = s.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_LOOKUPS {
            m.retain(|_, (_, e)| *e > now);
            if m.len() >= MAX_LOOKUPS {
                m.clear();
            }
        }
        m.insert(key, (claims.clone(), exp));
        Ok(claims)
    }
}

fn local_admin() -> User {
    User {
        sub: "local".into(),
        name: "local admin".into(),
        tenant: None,
        role: Role::Admin,
    }
}

/// `scheme://authority` of an absolute URL.
fn origin_of(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{authority}")
        }
        None => String::new(),
    }
}

/// `127.0.0.1:8080`, `localhost`, `[::1]:80`.
fn is_loopback_authority(authority: &str) -> bool {
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A cookie's value from the `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

async fn discover(http: &reqwest::Client, issuer: &str) -> anyhow::Result<Discovery> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let resp = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("reading the issuer's discovery document {url}"))?;
    if !resp.status().is_success() {
        bail!(
            "the issuer's discovery document {url} answered HTTP {}",
            resp.status()
        );
    }
    let d: Discovery = read_json(resp)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{url} is not an OpenID discovery document"))?;
    if d.issuer != issuer {
        bail!(
            "{url} names the issuer `{}`, not `{issuer}`: write console.auth.oidc.issuer exactly as the issuer names itself",
            d.issuer
        );
    }
    Ok(d)
}

async fn userinfo(http: &reqwest::Client, url: &str, token: &str) -> Result<Claims, String> {
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("userinfo: {}", e.without_url()))?;
    if !resp.status().is_success() {
        return Err(format!("userinfo answered HTTP {}", resp.status()));
    }
    read_json::<Claims>(resp)
        .await
        .map_err(|e| format!("userinfo: {e}"))
}

/// Cognito's `GetUser` with the access token (no AWS credentials needed): the user's
/// attributes as claims (`custom:tenant`, `email`, …).
async fn cognito_get_user(
    http: &reqwest::Client,
    api: &str,
    token: &str,
) -> Result<Claims, String> {
    let resp = http
        .post(api)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "AWSCognitoIdentityProviderService.GetUser")
        .body(serde_json::json!({"AccessToken": token}).to_string())
        .send()
        .await
        .map_err(|e| format!("Cognito GetUser: {}", e.without_url()))?;
    if !resp.status().is_success() {
        return Err(format!("Cognito GetUser answered HTTP {}", resp.status()));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Attr {
        name: String,
        value: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct GetUser {
        #[serde(default)]
        user_attributes: Vec<Attr>,
    }
    let u: GetUser = read_json(resp)
        .await
        .map_err(|e| format!("Cognito GetUser: {e}"))?;
    Ok(u.user_attributes
        .into_iter()
        // `sub` comes from the verified token only.
        .filter(|a| a.name != "sub")
        .map(|a| (a.name, Value::String(a.value)))
        .collect())
}

/// A JSON body. The error says where it failed to parse, never what it held (a token may be
/// in it).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, String> {
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the body: {}", e.without_url()))?;
    serde_json::from_slice(&body).map_err(|e| {
        format!(
            "not the JSON expected (line {}, column {}, {:?})",
            e.line(),
            e.column(),
            e.classify()
        )
    })
}

/// A plain-text page (never HTML: a message may quote what the issuer sent).
fn text_page(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

fn see_other(location: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

/// A local path to return to (`/fleet?x=1`); anything else (`//evil`, `https://…`) is `/`.
fn local_path(next: Option<String>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n
        }
        _ => "/".into(),
    }
}

async fn login(State(auth): State<Arc<Auth>>, Query(q): Query<LoginQuery>) -> Response {
    let next = local_path(q.next);
    let Some(s) = &auth.sign_in else {
        return see_other(&next);
    };
    let (challenge, pkce_verifier) = PkceCodeChallenge::new_random_sha256();
    let state = random_id();
    let nonce = random_id();
    let (url, _) = s
        .client
        .authorize_url(|| CsrfToken::new(state.clone()))
        .add_scopes(s.issuer.scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_extra_param("nonce", &nonce)
        .url();
    auth.sessions.begin(
        &state,
        Pending {
            pkce_verifier: pkce_verifier.secret().clone(),
            nonce,
            next,
            created: now_secs(),
        },
    );
    let mut r = see_other(url.as_str());
    r.headers_mut().insert(
        header::SET_COOKIE,
        auth.set_cookie(auth.login_cookie(), &state, session::PENDING_TTL.as_secs()),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[derive(Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

async fn callback(
    State(auth): State<Arc<Auth>>,
    Query(q): Query<CallbackQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(s) = &auth.sign_in else {
        return see_other("/");
    };
    match finish_sign_in(&auth, s, q, &headers).await {
        Ok((id, expires, next)) => {
            let mut r = see_other(&next);
            let h = r.headers_mut();
            let max_age = expires.saturating_sub(now_secs());
            h.append(
                header::SET_COOKIE,
                auth.set_cookie(auth.session_cookie(), &id, max_age),
            );
            h.append(
                header::SET_COOKIE,
                auth.set_cookie(auth.login_cookie(), "", 0),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(d) => text_page(
            d.status,
            format!(
                "Sign-in failed: {}\n\nSign in again: /auth/login\n",
                d.message
            ),
        ),
    }
}

/// The callback's checks and the code exchange; the new session's id, its end and where to go.
async fn finish_sign_in(
    auth: &Auth,
    s: &SignIn,
    q: CallbackQuery,
    headers: &HeaderMap,
) -> Result<(String, u64, String), Denied> {
    if let Some(error) = q.error {
        tracing::info!(error = %error, "the issuer refused a sign-in");
        let desc = q.error_description.unwrap_or_default();
        return Err(Denied::unauthorized(format!(
            "the issuer answered {error} {desc}"
        )));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(Denied {
            status: StatusCode::BAD_REQUEST,
            message: "the callback lacks `code` or `state`".into(),
        });
    };
    // The sign-in must have started in this browser (login CSRF) and be under way.
    if cookie(headers, auth.login_cookie()) != Some(state.as_str()) {
        return Err(Denied {
            status: StatusCode::BAD_REQUEST,
            message: "this sign-in did not start in this browser (or took over 10 minutes)".into(),
        });
    }
    let Some(pending) = auth.sessions.finish(&state) else {
        return Err(Denied {
            status: StatusCode::BAD_REQUEST,
            message: "this sign-in has expired or was already used".into(),
        });
    };
    let tokens: Tokens = s
        .client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier))
        .request_async(&s.http)
        .await
        .map_err(|e| {
            // Never the response body: it may hold tokens.
            let why = match &e {
                RequestTokenError::ServerResponse(r) => format!(
                    "the issuer answered {} {}",
                    r.error(),
                    r.error_description().map_or("", String::as_str)
                ),
                RequestTokenError::Request(e) => format!("the token request failed: {e}"),
                // Not the serde message either: it may quote a value.
                RequestTokenError::Parse(e, _) => {
                    format!("the token response did not parse (at `{}`)", e.path())
                }
                RequestTokenError::Other(e) => e.clone(),
            };
            tracing::warn!(reason = %why, "sign-in: the code exchange failed");
            Denied::unauthorized(format!("the code exchange failed: {why}"))
        })?;
    let Some(id_token) = &tokens.extra_fields().id_token else {
        return Err(Denied::unauthorized(
            "the issuer sent no ID token (is `openid` among the scopes?)",
        ));
    };
    let mut claims = s
        .verifier
        .verify(
            id_token,
            Expect::Id {
                nonce: &pending.nonce,
            },
        )
        .await?;
    let cfg = &auth.cfg;
    if (!claims.contains_key(&cfg.tenant_claim) || !claims.contains_key(&cfg.groups_claim))
        && let Some(url) = &s.userinfo
    {
        match userinfo(&s.http, url, tokens.access_token().secret()).await {
            Ok(extra) if extra.get("sub") == claims.get("sub") => {
                for (k, v) in extra {
                    claims.entry(k).or_insert(v);
                }
            }
            Ok(_) => tracing::warn!("sign-in: userinfo names another subject; ignored"),
            Err(why) => tracing::warn!(error = %why, "sign-in: userinfo failed"),
        }
    }
    let user = user_from_claims(cfg, &claims)?;
    let expires = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    tracing::info!(sub = %user.sub, tenant = ?user.tenant, role = ?user.role, "signed in");
    let id = auth.sessions.create(user, expires);
    Ok((id, expires, pending.next))
}

async fn logout(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Response {
    if let Err(d) = auth.check_csrf(&headers) {
        return d.into_response();
    }
    if let Some(id) = cookie(&headers, auth.session_cookie()) {
        auth.sessions.remove(id);
    }
    let mut r = see_other("/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        auth.set_cookie(auth.session_cookie(), "", 0),
    );
    r
}
