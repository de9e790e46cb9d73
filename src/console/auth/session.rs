//! Server-side state of sign-in: sessions (a random id in the cookie, the user on the server,
//! ending when the ID token does) and sign-ins under way (the PKCE verifier and nonce kept
//! under the `state` sent to the issuer). Both live in memory: a restart of the console signs
//! everyone out. Ids are 256 random bits from ring's system RNG; the maps are keyed by the
//! SHA-256 of the id, so the store never holds a cookie value.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::fmt::Write;

use ring::rand::{SecureRandom, SystemRandom};

use super::User;

/// Sessions and sign-ins under way kept at most; past that the oldest half is dropped.
const MAX_SESSIONS: usize = 100_000;
const MAX_PENDING: usize = 10_000;
/// How long a sign-in may take at the issuer.
pub const PENDING_TTL: Duration = Duration::from_secs(600);

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random id for a cookie, a `state` or a nonce: 32 bytes, in hex.
pub fn random_id() -> String {
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn key(id: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

#[derive(Clone)]
struct Session {
    user: User,
    /// Seconds since the epoch.
    expires: u64,
}

/// A sign-in under way.
pub struct Pending {
    pub pkce_verifier: String,
    pub nonce: String,
    /// Where to go after signing in (a local path).
    pub next: String,
    /// Seconds since the epoch.
    pub created: u64,
}

#[derive(Default)]
pub struct Store {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    pending: Mutex<HashMap<[u8; 32], Pending>>,
}

impl Store {
    /// Starts a session for `user` until `expires` (seconds since the epoch); returns its id.
    pub fn create(&self, user: User, expires: u64) -> String {
        let id = random_id();
        let now = now_secs();
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_SESSIONS {
            s.retain(|_, v| v.expires > now);
            if s.len() >= MAX_SESSIONS {
                let mut ends: Vec<u64> = s.values().map(|v| v.expires).collect();
                ends.sort_unstable();
                let cut = ends[ends.len() / 2];
                s.retain(|_, v| v.expires > cut);
            }
        }
        s.insert(key(&id), Session { user, expires });
        id
    }

    /// The user of a live session; an expired one is removed.
    pub fn get(&self, id: &str) -> Option<(User, u64)> {
        let k = key(id);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match s.get(&k) {
            Some(v) if v.expires > now_secs() => Some((v.user.clone(), v.expires)),
            Some(_) => {
                s.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends a session; whether there was one.
    pub fn remove(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(id))
            .is_some()
    }

    pub fn count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Keeps a sign-in under `state`.
    pub fn begin(&self, state: &str, p: Pending) {
        let now = now_secs();
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, v| now.saturating_sub(v.created) < PENDING_TTL.as_secs());
        if m.len() >= MAX_PENDING {
            let mut created: Vec<u64> = m.values().map(|v| v.created).collect();
            created.sort_unstable();
            let cut = created[created.len() / 2];
            m.retain(|_, v| v.created > cut);
        }
        m.insert(key(state), p);
    }

    /// Takes the sign-in kept under `state` (once: a replayed callback finds nothing).
    pub fn finish(&self, state: &str) -> Option<Pending> {
        let p = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(state))?;
        (now_secs().saturating_sub(p.created) < PENDING_TTL.as_secs()).then_some(p)
    }
}
