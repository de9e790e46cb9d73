//! Token verification: an RS256 signature by one of the issuer's keys ([`super::jwks`]), then
//! `iss`, `exp` and `nbf` (with [`LEEWAY`]), and the audience: an ID token's `aud` is the
//! console's client id (and its `nonce` the one the sign-in sent); a Bearer access token's
//! `aud` is the configured audience (OIDC), or its `client_id` claim is the console's client id
//! (Cognito access tokens have no `aud`). Cognito's `token_use` must say which kind it is, so
//! an ID token is no Bearer token. Then [`user_from_claims`] reads the tenant and the role.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::{Jwks, KeyError};
use super::{Denied, Role, User};
use crate::config::{ConsoleAuth, IssuerKind};

/// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY: u64 = 30;

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// Which token is expected.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// The sign-in's ID token; `nonce` is the one the authorization request sent.
    Id { nonce: &'a str },
    /// An access token in `Authorization: Bearer`.
    Access,
}

/// What a token is checked against.
pub struct Verifier {
    pub kind: IssuerKind,
    pub issuer: String,
    pub client_id: String,
    /// The `aud` of an OIDC access token.
    pub audience: String,
    pub jwks: Jwks,
}

impl Verifier {
    /// The token's claims, or why it is refused (a 401; the message names the rule, never the
    /// token).
    pub async fn verify(&self, token: &str, expect: Expect<'_>) -> Result<Claims, Denied> {
        let refused = |why: String| Denied::unauthorized(format!("token refused: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            refused(match e.kind() {
                // `alg: none` and unknown algorithms fail here.
                ErrorKind::Json(_) | ErrorKind::InvalidAlgorithmName => {
                    "not a signed JWT with a known algorithm (RS256 only)".to_string()
                }
                _ => "not a JWT".to_string(),
            })
        })?;
        if header.alg != Algorithm::RS256 {
            return Err(refused(format!(
                "algorithm {:?} is not accepted (RS256 only)",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| refused("the token names no signing key (`kid`)".into()))?;
        let key = self.jwks.key(&kid).await.map_err(|e| match e {
            KeyError::UnknownKid(k) => refused(format!(
                "signed by a key the issuer does not list (kid `{k}`)"
            )),
            KeyError::Unavailable(why) => {
                tracing::warn!(error = %why, "the issuer's signing keys are unavailable");
                Denied::unavailable("the sign-in issuer's keys cannot be fetched; try again")
            }
        })?;

        let mut v = Validation::new(Algorithm::RS256);
        v.leeway = LEEWAY;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        match (expect, self.kind) {
            (Expect::Id { .. }, _) => v.set_audience(&[&self.client_id]),
            (Expect::Access, IssuerKind::Oidc) => v.set_audience(&[&self.audience]),
            // Checked below: Cognito's access tokens carry `client_id` and no `aud`.
            (Expect::Access, IssuerKind::Cognito) => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
            refused(
                match e.kind() {
                    ErrorKind::InvalidSignature => "the signature does not verify",
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet (`nbf` is in the future)",
                    ErrorKind::InvalidIssuer => "issued by another issuer (`iss`)",
                    ErrorKind::InvalidAudience => "meant for another audience (`aud`)",
                    ErrorKind::InvalidAlgorithm => "algorithm not accepted (RS256 only)",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "a required claim (exp, iss, sub) is missing"
                    }
                    _ => "malformed",
                }
                .to_string(),
            )
        })?;
        let claims = data.claims;
        let text = |k: &str| claims.get(k).and_then(Value::as_str);
        if self.kind == IssuerKind::Cognito {
            let want = match expect {
                Expect::Id { .. } => "id",
                Expect::Access => "access",
            };
            if text("token_use") != Some(want) {
                return Err(refused(format!(
                    "`token_use` is {}, not {want}",
                    text("token_use").unwrap_or("missing")
                )));
            }
            if matches!(expect, Expect::Access) && text("client_id") != Some(&self.client_id) {
                return Err(refused("issued to another app client (`client_id`)".into()));
            }
        }
        if let Expect::Id { nonce } = expect {
            if text("nonce") != Some(nonce) {
                return Err(refused(
                    "the ID token's `nonce` is not this sign-in's".into(),
                ));
            }
            // Several audiences: the authorized party must be this client.
            let many = claims
                .get("aud")
                .and_then(Value::as_array)
                .is_some_and(|a| a.len() > 1);
            if many && text("azp") != Some(&self.client_id) {
                return Err(refused("the ID token's `azp` is another client".into()));
            }
        }
        Ok(claims)
    }
}

/// The user a token's claims describe: `sub`, a display name, the tenant from
/// `cfg.tenant_claim`, and the role from the groups in `cfg.groups_claim` (a list, or one
/// name). A platform admin needs no tenant; anyone else without one is refused (403), and so
/// is a user in none of `roles.viewer` when that list is set.
pub fn user_from_claims(cfg: &ConsoleAuth, claims: &Claims) -> Result<User, Denied> {
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let sub = text("sub")
        .ok_or_else(|| Denied::unauthorized("token refused: no `sub`"))?
        .to_string();
    let name = [
        "name",
        "email",
        "cognito:username",
        "username",
        "preferred_username",
    ]
    .iter()
    .find_map(|k| text(k))
    .unwrap_or(&sub)
    .to_string();
    let groups: Vec<&str> = match claims.get(&cfg.groups_claim) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => s.split([' ', ',']).filter(|g| !g.is_empty()).collect(),
        _ => Vec::new(),
    };
    let member = |list: &[String]| groups.iter().any(|g| list.iter().any(|l| l == g));
    let roles = &cfg.roles;
    let role = if member(&roles.admin) {
        Role::Admin
    } else if member(&roles.operator) {
        Role::Operator
    } else if roles.viewer.is_empty() || member(&roles.viewer) {
        Role::Viewer
    } else {
        return Err(Denied::forbidden(format!(
            "{name} is in none of the console's groups ({})",
            roles.viewer.join(", ")
        )));
    };
    let tenant = text(&cfg.tenant_claim).map(str::to_string);
    if tenant.is_none() && role != Role::Admin {
        return Err(Denied::forbidden(format!(
            "{name} has no tenant (claim `{}`); ask an administrator to set it",
            cfg.tenant_claim
        )));
    }
    Ok(User {
        sub,
        name,
        tenant,
        role,
    })
}
