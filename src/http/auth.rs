//! Credentials of the surfaces: bearer service tokens for the internal API, HS256 JWTs for the
//! user and admin APIs.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;
use crate::config::Secret;
use crate::domain::UserId;

/// The claims of our JWTs. `sub` is the user id as a decimal string (RFC 7519).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Who a verified JWT speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub admin: bool,
}

pub struct Auth {
    /// sha-256 of each configured service token: comparing digests does not leak, through
    /// timing, how much of a guessed token was right.
    service_token_digests: Vec<[u8; 32]>,
    jwt_key: Option<DecodingKey>,
}

impl Auth {
    pub fn new(service_tokens: &[Secret], jwt_secret: Option<&Secret>) -> Auth {
        Auth {
            service_token_digests: service_tokens
                .iter()
                .map(Secret::expose)
                .filter(|token| !token.trim().is_empty())
                .map(|token| digest(token.trim()))
                .collect(),
            jwt_key: jwt_secret
                .filter(|secret| !secret.expose().is_empty())
                .map(|secret| DecodingKey::from_secret(secret.expose().as_bytes())),
        }
    }

    fn is_service_token(&self, token: &str) -> bool {
        let presented = digest(token);
        self.service_token_digests
            .iter()
            .any(|known| known == &presented)
    }

    pub(crate) fn verify_jwt(&self, token: &str) -> Result<Principal, ApiError> {
        self.verify_claims(token).map(|(principal, _)| principal)
    }

    /// [`Auth::verify_jwt`], with when the token expires (its `exp`, Unix seconds): the
    /// console's session cookie ends with it.
    pub(crate) fn verify_claims(&self, token: &str) -> Result<(Principal, i64), ApiError> {
        let key = self
            .jwt_key
            .as_ref()
            .ok_or_else(|| ApiError::unauthorized("no JWT secret is configured"))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|error| ApiError::unauthorized(format!("invalid token: {error}")))?
            .claims;
        let user_id = claims
            .sub
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| ApiError::unauthorized("the token's sub is not a user id"))?;
        let principal = Principal {
            user_id: UserId(user_id),
            admin: claims.role.as_deref() == Some("admin"),
        };
        Ok((principal, claims.exp))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn bearer(request: &Request) -> Result<&str, ApiError> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <token>"))
}

/// The internal API: one of the configured service tokens.
pub async fn require_service(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer(&request)?;
    if !state.auth.is_service_token(token) {
        return Err(ApiError::unauthorized("unknown service token"));
    }
    Ok(next.run(request).await)
}

/// The user API: any valid JWT; the handler serves only the token's own user.
pub async fn require_user(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let principal = state.auth.verify_jwt(bearer(&request)?)?;
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// The admin API: a valid JWT with `role: "admin"`.
pub async fn require_admin(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let principal = state.auth.verify_jwt(bearer(&request)?)?;
    if !principal.admin {
        return Err(ApiError::forbidden("this route needs the admin role"));
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// Mints an HS256 token for operators (`credits-engine token`).
pub fn mint_token(
    secret: &Secret,
    user_id: i64,
    role: Option<&str>,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: user_id.to_string(),
        exp: (now + ttl).timestamp(),
        role: role.map(str::to_owned),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
}
