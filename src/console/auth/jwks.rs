//! The issuer's signing keys (JWKS), cached by `kid`. A token whose `kid` is not in the cache
//! makes one refetch, at most once per [`Jwks::min_refetch`] (so a stream of tokens with
//! made-up `kid`s cannot make the console hammer the issuer); the whole set is also refetched
//! when it is older than [`Jwks::max_age`], so a key the issuer removed stops verifying.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use tokio::sync::Mutex;

/// Keys by `kid`, and when they were fetched.
struct Cached {
    keys: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

pub struct Jwks {
    url: String,
    http: reqwest::Client,
    cached: Mutex<Cached>,
    /// At most one refetch for an unknown `kid` per this long.
    pub min_refetch: Duration,
    /// The set is fetched again when it is older than this.
    pub max_age: Duration,
    fetches: AtomicU64,
}

/// Why no key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The issuer's set has no key with this `kid` (after a refetch, or within the rate limit).
    UnknownKid(String),
    /// The set could not be fetched or read (the message says why; it holds no secret).
    Unavailable(String),
}

impl Jwks {
    pub fn new(url: String, http: reqwest::Client) -> Self {
        Self {
            url,
            http,
            cached: Mutex::new(Cached {
                keys: HashMap::new(),
                fetched: None,
            }),
            min_refetch: Duration::from_secs(30),
            max_age: Duration::from_secs(3600),
            fetches: AtomicU64::new(0),
        }
    }

    /// How many times the set was fetched (tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key for `kid`, fetching the set first when it was never fetched, is too old, or
    /// lacks `kid` (rate-limited).
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, KeyError> {
        let mut cached = self.cached.lock().await;
        let age = cached.fetched.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a >= self.max_age);
        if !stale && let Some(k) = cached.keys.get(kid) {
            return Ok(k.clone());
        }
        let may_refetch = age.is_none_or(|a| a >= self.min_refetch);
        if stale || may_refetch {
            match self.fetch().await {
                Ok(keys) => {
                    cached.keys = keys;
                    cached.fetched = Some(Instant::now());
                }
                // A failed fetch keeps the keys it had: an issuer's short outage does not
                // sign everyone out. It counts as a fetch for the rate limit.
                Err(e) if cached.fetched.is_some() => {
                    tracing::warn!(url = %self.url, error = %e, "could not refresh the issuer's signing keys");
                    cached.fetched = Some(Instant::now());
                }
                Err(e) => return Err(KeyError::Unavailable(e)),
            }
        }
        cached
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| KeyError::UnknownKid(kid.to_string()))
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        if !resp.status().is_success() {
            return Err(format!("GET {}: HTTP {}", self.url, resp.status()));
        }
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = super::read_json(resp)
            .await
            .map_err(|e| format!("GET {}: not a JWK set: {e}", self.url))?;
        Ok(parse_keys(set.keys))
    }
}

/// The RSA signing keys with a `kid` (others, and keys for encryption, are left out: a key
/// type this crate does not know must not make the whole set unreadable).
fn parse_keys(keys: Vec<serde_json::Value>) -> HashMap<String, DecodingKey> {
    let mut out = HashMap::new();
    for value in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let rsa = matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
        );
        let for_signing = !matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        );
        let (Some(kid), true, true) = (jwk.common.key_id.clone(), rsa, for_signing) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            out.insert(kid, key);
        }
    }
    out
}
