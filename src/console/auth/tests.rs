//! Token verification against a JWKS served over HTTP by the test (the test keys are in
//! `testdata/console-auth/`), the claims-to-user rules, sessions, the cross-site check, and
//! the sign-in redirect of a console set up through an issuer's discovery document.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::jwks::Jwks;
use super::session::{Store, now_secs};
use super::verify::{Expect, Verifier, user_from_claims};
use super::*;
use crate::config::{ConsoleAuth, IssuerKind, RoleGroups};

const KEY_A: &[u8] = include_bytes!("../../../testdata/console-auth/key-a.der");
const KEY_B: &[u8] = include_bytes!("../../../testdata/console-auth/key-b.der");
const ISS: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test";
const CLIENT: &str = "console-client";

fn jwk(name: &str) -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/testdata/console-auth/jwk-{name}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JWKS endpoint (and an OIDC discovery document) served by the test; `keys` can change
/// while it runs, and `hits` counts JWKS requests.
struct Issuer {
    addr: SocketAddr,
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<AtomicU64>,
}

#[derive(Clone)]
struct IssuerState {
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<AtomicU64>,
    base: String,
}

async fn serve_issuer(keys: Vec<Value>) -> Issuer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keys = Arc::new(Mutex::new(keys));
    let hits = Arc::new(AtomicU64::new(0));
    let state = IssuerState {
        keys: keys.clone(),
        hits: hits.clone(),
        base: format!("http://{addr}"),
    };
    let app = Router::new()
        .route(
            "/jwks",
            get(|State(s): State<IssuerState>| async move {
                s.hits.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"keys": *s.keys.lock().unwrap()}))
            }),
        )
        .route(
            "/.well-known/openid-configuration",
            get(|State(s): State<IssuerState>| async move {
                axum::Json(json!({
                    "issuer": s.base,
                    "authorization_endpoint": format!("{}/auth", s.base),
                    "token_endpoint": format!("{}/token", s.base),
                    "userinfo_endpoint": format!("{}/me", s.base),
                    "jwks_uri": format!("{}/jwks", s.base),
                }))
            }),
        )
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Issuer { addr, keys, hits }
}

impl Issuer {
    fn jwks_url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn verifier(&self, kind: IssuerKind, min_refetch: Duration) -> Verifier {
        let mut jwks = Jwks::new(self.jwks_url(), reqwest::Client::new());
        jwks.min_refetch = min_refetch;
        Verifier {
            kind,
            issuer: ISS.into(),
            client_id: CLIENT.into(),
            audience: "console-api".into(),
            jwks,
        }
    }
}

/// `claims` signed with `key` under `kid`.
fn sign(key: &[u8], kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_rsa_der(key)).unwrap()
}

/// A Cognito access token's claims, valid for an hour.
fn access_claims() -> Value {
    let now = now_secs();
    json!({
        "iss": ISS, "sub": "u-1", "client_id": CLIENT, "token_use": "access",
        "scope": "openid", "username": "alice", "cognito:groups": ["operators"],
        "custom:tenant": "tenant-a", "iat": now, "exp": now + 3600,
    })
}

fn id_claims(nonce: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": ISS, "sub": "u-1", "aud": CLIENT, "token_use": "id", "nonce": nonce,
        "email": "alice@example.com", "custom:tenant": "tenant-a", "iat": now, "exp": now + 3600,
    })
}

fn with(mut v: Value, k: &str, x: Value) -> Value {
    v[k] = x;
    v
}

async fn refused(v: &Verifier, token: &str, expect: Expect<'_>) -> String {
    let d = v
        .verify(token, expect)
        .await
        .expect_err("the token should be refused");
    assert_eq!(d.status, StatusCode::UNAUTHORIZED, "{d}");
    d.message
}

#[tokio::test]
async fn a_valid_access_token_is_accepted_and_tokens_breaking_a_rule_are_refused_each_with_its_reason()
 {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let v = issuer.verifier(IssuerKind::Cognito, Duration::from_secs(3600));
    let good = sign(KEY_A, "key-a", &access_claims());
    let claims = v.verify(&good, Expect::Access).await.unwrap();
    assert_eq!(claims["sub"], "u-1");

    let now = now_secs();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "signed by another key under key-a's kid",
            sign(KEY_B, "key-a", &access_claims()),
            "the signature does not verify",
        ),
        (
            "expired two minutes ago",
            sign(
                KEY_A,
                "key-a",
                &with(access_claims(), "exp", json!(now - 120)),
            ),
            "expired",
        ),
        (
            "nbf five minutes ahead",
            sign(
                KEY_A,
                "key-a",
                &with(access_claims(), "nbf", json!(now + 300)),
            ),
            "not valid yet",
        ),
        (
            "another issuer",
            sign(
                KEY_A,
                "key-a",
                &with(access_claims(), "iss", json!("https://issuer.example.com")),
            ),
            "another issuer",
        ),
        (
            "an ID token where an access token is required",
            sign(
                KEY_A,
                "key-a",
                &with(access_claims(), "token_use", json!("id")),
            ),
            "`token_use` is id, not access",
        ),
        (
            "another app client",
            sign(
                KEY_A,
                "key-a",
                &with(access_claims(), "client_id", json!("other")),
            ),
            "another app client",
        ),
        (
            "no exp",
            sign(KEY_A, "key-a", &{
                let mut c = access_claims();
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
            "required claim",
        ),
        ("not a JWT at all", "abc.def".to_string(), "not a JWT"),
    ];
    for (what, token, reason) in cases {
        let why = refused(&v, &token, Expect::Access).await;
        assert!(why.contains(reason), "{what}: {why}");
        assert!(
            !why.contains(&token),
            "{what}: the message quotes the token"
        );
    }
    // Within the leeway, an expired token still passes.
    let recent = sign(
        KEY_A,
        "key-a",
        &with(access_claims(), "exp", json!(now - 5)),
    );
    v.verify(&recent, Expect::Access).await.unwrap();
    // One fetch served every case.
    assert_eq!(issuer.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unsigned_and_hmac_tokens_are_refused() {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let v = issuer.verifier(IssuerKind::Cognito, Duration::from_secs(3600));
    let b64 = |v: &Value| {
        use std::fmt::Write;
        // base64url without padding, written out so the test does not lean on the code under test.
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "key-a", "typ": "JWT"})),
        b64(&access_claims())
    );
    let why = refused(&v, &none, Expect::Access).await;
    assert!(why.contains("RS256 only"), "{why}");

    // HS256 keyed with the public modulus: the classic key-confusion attack.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("key-a".into());
    let secret = jwk("a")["n"].as_str().unwrap().as_bytes().to_vec();
    let hs =
        jsonwebtoken::encode(&h, &access_claims(), &EncodingKey::from_secret(&secret)).unwrap();
    let why = refused(&v, &hs, Expect::Access).await;
    assert!(why.contains("HS256") && why.contains("RS256 only"), "{why}");
}

#[tokio::test]
async fn an_id_token_needs_the_client_as_audience_and_the_sign_ins_nonce() {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let v = issuer.verifier(IssuerKind::Cognito, Duration::from_secs(3600));
    let good = sign(KEY_A, "key-a", &id_claims("n-1"));
    v.verify(&good, Expect::Id { nonce: "n-1" }).await.unwrap();
    let why = refused(&v, &good, Expect::Id { nonce: "n-2" }).await;
    assert!(why.contains("nonce"), "{why}");
    let other = sign(
        KEY_A,
        "key-a",
        &with(id_claims("n-1"), "aud", json!("another-client")),
    );
    let why = refused(&v, &other, Expect::Id { nonce: "n-1" }).await;
    assert!(why.contains("another audience"), "{why}");
    // The ID token is no access token.
    let why = refused(&v, &good, Expect::Access).await;
    assert!(why.contains("`token_use` is id"), "{why}");

    // OIDC: a Bearer access token's `aud` is the configured audience.
    let oidc = issuer.verifier(IssuerKind::Oidc, Duration::from_secs(3600));
    let now = now_secs();
    let claims = json!({"iss": ISS, "sub": "u-1", "aud": "console-api", "exp": now + 60});
    oidc.verify(&sign(KEY_A, "key-a", &claims), Expect::Access)
        .await
        .unwrap();
    let wrong = with(claims, "aud", json!(CLIENT));
    let why = refused(&oidc, &sign(KEY_A, "key-a", &wrong), Expect::Access).await;
    assert!(why.contains("another audience"), "{why}");
}

#[tokio::test]
async fn an_unknown_kid_refetches_the_keys_at_most_once_per_interval() {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let by_b = sign(KEY_B, "key-b", &access_claims());
    let by_a = sign(KEY_A, "key-a", &access_claims());

    // Rate-limited: key-b appears at the issuer, but within the interval nothing is refetched.
    let limited = issuer.verifier(IssuerKind::Cognito, Duration::from_secs(3600));
    limited.verify(&by_a, Expect::Access).await.unwrap();
    assert_eq!(limited.jwks.fetches(), 1);
    let why = refused(&limited, &by_b, Expect::Access).await;
    assert!(why.contains("kid `key-b`"), "{why}");
    issuer.keys.lock().unwrap().push(jwk("b"));
    for _ in 0..5 {
        refused(&limited, &by_b, Expect::Access).await;
    }
    assert_eq!(limited.jwks.fetches(), 1, "no refetch within the interval");

    // Past the interval (zero here), an unknown kid refetches once and finds the new key.
    issuer.keys.lock().unwrap().retain(|k| k["kid"] == "key-a");
    let eager = issuer.verifier(IssuerKind::Cognito, Duration::ZERO);
    eager.verify(&by_a, Expect::Access).await.unwrap();
    refused(&eager, &by_b, Expect::Access).await;
    assert_eq!(eager.jwks.fetches(), 2);
    issuer.keys.lock().unwrap().push(jwk("b"));
    eager.verify(&by_b, Expect::Access).await.unwrap();
    assert_eq!(eager.jwks.fetches(), 3);
    // A known kid fetches nothing.
    eager.verify(&by_a, Expect::Access).await.unwrap();
    eager.verify(&by_b, Expect::Access).await.unwrap();
    assert_eq!(eager.jwks.fetches(), 3);
}

fn console_auth(viewer: &[&str]) -> ConsoleAuth {
    ConsoleAuth {
        issuer: None,
        tenant_claim: "custom:tenant".into(),
        groups_claim: "cognito:groups".into(),
        roles: RoleGroups {
            viewer: viewer.iter().map(|s| s.to_string()).collect(),
            operator: vec!["operators".into()],
            admin: vec!["platform-admins".into()],
        },
    }
}

fn claims(v: Value) -> verify::Claims {
    v.as_object().unwrap().clone()
}

#[test]
fn tenant_and_role_come_from_the_configured_claims() {
    let cfg = console_auth(&[]);
    let u = user_from_claims(
        &cfg,
        &claims(json!({"sub": "s", "email": "a@x", "custom:tenant": "t-a", "cognito:groups": ["operators"]})),
    )
    .unwrap();
    assert_eq!(
        u,
        User {
            sub: "s".into(),
            name: "a@x".into(),
            tenant: Some("t-a".into()),
            role: Role::Operator
        }
    );
    let viewer =
        user_from_claims(&cfg, &claims(json!({"sub": "s", "custom:tenant": "t-a"}))).unwrap();
    assert_eq!((viewer.role, viewer.name.as_str()), (Role::Viewer, "s"));
    // A platform admin needs no tenant; anyone else does.
    let admin = user_from_claims(
        &cfg,
        &claims(json!({"sub": "root", "cognito:groups": "platform-admins operators"})),
    )
    .unwrap();
    assert_eq!((admin.role, admin.tenant), (Role::Admin, None));
    let d = user_from_claims(
        &cfg,
        &claims(json!({"sub": "s", "cognito:groups": ["operators"]})),
    )
    .unwrap_err();
    assert_eq!(d.status, StatusCode::FORBIDDEN);
    assert!(
        d.message.contains("no tenant (claim `custom:tenant`)"),
        "{d}"
    );
    // With viewer groups listed, a user in none of them is refused.
    let strict = console_auth(&["viewers"]);
    let d =
        user_from_claims(&strict, &claims(json!({"sub": "s", "custom:tenant": "t"}))).unwrap_err();
    assert_eq!(d.status, StatusCode::FORBIDDEN, "{d}");
    let ok = user_from_claims(
        &strict,
        &claims(json!({"sub": "s", "custom:tenant": "t", "cognito:groups": ["viewers"]})),
    )
    .unwrap();
    assert_eq!(ok.role, Role::Viewer);
}

#[test]
fn sessions_end_on_removal_and_at_their_expiry() {
    let store = Store::default();
    let user = User {
        sub: "s".into(),
        name: "n".into(),
        tenant: Some("t".into()),
        role: Role::Viewer,
    };
    let id = store.create(user.clone(), now_secs() + 60);
    assert_eq!(id.len(), 64);
    assert_eq!(store.get(&id).map(|(u, _)| u), Some(user.clone()));
    assert!(store.get("not-a-session").is_none());
    assert!(store.remove(&id));
    assert!(store.get(&id).is_none());
    let old = store.create(user, now_secs() - 1);
    assert!(
        store.get(&old).is_none(),
        "an expired session is no session"
    );
    assert_eq!(store.count(), 0, "and it is dropped");
    assert_ne!(session::random_id(), session::random_id());
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[tokio::test]
async fn no_sign_in_only_on_loopback_and_only_for_a_loopback_host() {
    let cfg = console_auth(&[]);
    let err = Auth::new(&cfg, "0.0.0.0:8080".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only allowed on a loopback address"),
        "{err}"
    );
    let auth = Auth::new(&cfg, "127.0.0.1:8080".parse().unwrap())
        .await
        .unwrap();
    let u = auth
        .user(&headers(&[("host", "127.0.0.1:8080")]))
        .await
        .unwrap();
    assert_eq!((u.role, u.tenant), (Role::Admin, None));
    auth.user(&headers(&[("host", "localhost:8080")]))
        .await
        .unwrap();
    // A page on another name resolving to 127.0.0.1 (DNS rebinding) reads nothing.
    let d = auth
        .user(&headers(&[("host", "evil.example:8080")]))
        .await
        .unwrap_err();
    assert_eq!(d.status, StatusCode::FORBIDDEN);
    let d = auth
        .check_csrf(&headers(&[
            ("host", "evil.example:8080"),
            ("sec-fetch-site", "same-origin"),
        ]))
        .unwrap_err();
    assert_eq!(d.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn cross_site_posts_are_refused() {
    let auth = Auth::new(&console_auth(&[]), "127.0.0.1:8080".parse().unwrap())
        .await
        .unwrap();
    let host = ("host", "127.0.0.1:8080");
    let ok = [
        vec![host, ("sec-fetch-site", "same-origin")],
        vec![host, ("origin", "http://127.0.0.1:8080")],
        vec![host, ("authorization", "Bearer x")],
        // No cookie and no browser's marks: nothing ambient to ride on (curl, a script).
        vec![host],
    ];
    for h in ok {
        auth.check_csrf(&headers(&h))
            .unwrap_or_else(|d| panic!("{h:?}: {d}"));
    }
    let refused = [
        vec![host, ("sec-fetch-site", "cross-site")],
        vec![host, ("sec-fetch-site", "same-site")],
        vec![host, ("origin", "http://evil.example")],
        vec![host, ("origin", "null")],
        vec![host, ("cookie", "shardlake_session=1")],
        vec![
            host,
            ("authorization", "Bearer x"),
            ("cookie", "shardlake_session=1"),
        ],
    ];
    for h in refused {
        let d = auth.check_csrf(&headers(&h)).unwrap_err();
        assert_eq!(d.status, StatusCode::FORBIDDEN, "{h:?}");
    }
}

#[test]
fn cookies_and_return_paths_are_read_strictly() {
    let h = headers(&[
        ("cookie", "a=1; shardlake_session=abc ; b=2"),
        ("cookie", "c=3"),
    ]);
    assert_eq!(cookie(&h, "shardlake_session"), Some("abc"));
    assert_eq!(cookie(&h, "c"), Some("3"));
    assert_eq!(cookie(&h, "session"), None);
    assert_eq!(local_path(Some("/fleet?x=1".into())), "/fleet?x=1");
    for bad in [
        "//evil.example",
        "https://evil.example",
        "/\\evil",
        "fleet",
        "",
    ] {
        assert_eq!(local_path(Some(bad.into())), "/", "{bad}");
    }
    assert_eq!(
        origin_of("https://c.example.com:8443/auth/callback"),
        "https://c.example.com:8443"
    );
}

/// A console set up through the test issuer's discovery document, serving its routes.
async fn console_with_issuer(issuer: &Issuer) -> (Arc<Auth>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{}", issuer.addr);
    let mut cfg = console_auth(&[]);
    cfg.issuer = Some(crate::config::Issuer {
        kind: IssuerKind::Oidc,
        issuer: base,
        client_id: CLIENT.into(),
        client_secret: Some(crate::config::Secret("s3cret".into())),
        redirect_url: format!("http://{addr}/auth/callback"),
        scopes: vec!["openid".into(), "email".into()],
        jwks_url: None,
        audience: CLIENT.into(),
        endpoints: None,
    });
    let auth = Auth::new(&cfg, addr).await.unwrap();
    let app = auth.routes();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (auth, addr)
}

#[tokio::test]
async fn login_sends_the_browser_to_the_issuer_with_pkce_state_and_nonce() {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let (auth, addr) = console_with_issuer(&issuer).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .get(format!("http://{addr}/auth/login?next=/fleet"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let location = r.headers()[header::LOCATION].to_str().unwrap().to_string();
    let url = url::Url::parse(&location).unwrap();
    assert_eq!(url.path(), "/auth");
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT);
    assert_eq!(q["redirect_uri"], format!("http://{addr}/auth/callback"));
    assert_eq!(q["scope"], "openid email");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert_eq!(q["state"].len(), 64);
    assert_eq!(q["nonce"].len(), 64);
    assert!(!location.contains("s3cret"));
    let cookie = r.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(
        cookie.starts_with(&format!("shardlake_login={}", q["state"])),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("Secure"),
        "plain http on loopback: {cookie}"
    );

    // A callback whose state this browser did not start is refused, and starts no session.
    let r = http
        .get(format!(
            "http://{addr}/auth/callback?code=c&state={}",
            q["state"]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("did not start in this browser")
    );
    // Without a session or a token, the user is unknown.
    let d = auth.user(&HeaderMap::new()).await.unwrap_err();
    assert_eq!(d.status, StatusCode::UNAUTHORIZED);
    let d = auth
        .user(&headers(&[("cookie", "shardlake_session=0123")]))
        .await
        .unwrap_err();
    assert!(d.message.contains("session has ended"), "{d}");
    // Logout needs a same-origin POST.
    let r = http
        .post(format!("http://{addr}/auth/logout"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("http://{addr}/auth/logout"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_bearer_access_token_is_a_user_and_other_schemes_are_refused() {
    let issuer = serve_issuer(vec![jwk("a")]).await;
    let (auth, _) = console_with_issuer(&issuer).await;
    let now = now_secs();
    let iss = format!("http://{}", issuer.addr);
    let token = sign(
        KEY_A,
        "key-a",
        &json!({"iss": iss, "sub": "bob", "aud": CLIENT, "exp": now + 60,
                "custom:tenant": "t-b", "cognito:groups": ["platform-admins"]}),
    );
    let u = auth
        .user(&headers(&[("authorization", &format!("Bearer {token}"))]))
        .await
        .unwrap();
    assert_eq!((u.sub.as_str(), u.role), ("bob", Role::Admin));
    let d = auth
        .user(&headers(&[("authorization", "Basic Ym9iOnB3")]))
        .await
        .unwrap_err();
    assert_eq!(d.status, StatusCode::UNAUTHORIZED);
    let by_b = sign(
        KEY_B,
        "key-a",
        &json!({"iss": iss, "sub": "bob", "aud": CLIENT, "exp": now + 60}),
    );
    let d = auth
        .user(&headers(&[("authorization", &format!("Bearer {by_b}"))]))
        .await
        .unwrap_err();
    assert!(d.message.contains("signature"), "{d}");
}
