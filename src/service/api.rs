//! The service's bodies: binary fields in base64, errors as `{"error":{"code","message"}}` with
//! the HTTP status that fits.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;

use crate::error::Error;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// Any refusal: the transport's own (429 `busy`) are made so.
    pub(super) fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            message,
        }
    }

    /// 401: no configured client.
    pub fn unauthenticated() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthenticated",
            message: "this connection is no client of the service".into(),
        }
    }

    /// 403: the client may not do that.
    pub fn forbidden(message: String) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message,
        }
    }

    /// 404 for a key outside the client's namespaces: said as for a key that does not exist.
    pub fn no_such_key() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "no_such_key",
            message: "no such key".into(),
        }
    }

    /// 400: a body that does not say what the operation needs.
    pub fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_input",
            message,
        }
    }

    /// 405: the path takes other methods.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "this path does not take that method (docs/service.md)".into(),
        }
    }

    /// 500: the service itself failed (a task that did not finish).
    pub fn internal(message: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        // Said the same whatever the key: a key another client holds is answered so too.
        if matches!(e, Error::NoSuchKey { .. }) {
            return Self::no_such_key();
        }
        let status = match &e {
            Error::NoSuchKey { .. } => StatusCode::NOT_FOUND,
            Error::KeyIdAuthentication { .. }
            | Error::InvalidInput(_)
            | Error::WrongPurpose { .. }
            | Error::VerificationFailed { .. }
            | Error::DecryptionFailed { .. } => StatusCode::BAD_REQUEST,
            Error::KeyExists { .. } | Error::WrongState { .. } => StatusCode::CONFLICT,
            Error::Unsupported { .. } | Error::NotBuilt { .. } | Error::NoSuchBackend { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::BackendUnavailable { .. }
            | Error::Timeout { .. }
            | Error::BackendLogin { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            code: e.kind(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body whose refusals (malformed, wrong types, unknown fields, too large, not JSON) are
/// answered as every error is, with axum's status and message.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError {
                status: rejection.status(),
                code: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "invalid_input"
                },
                message: rejection.body_text(),
            }),
        }
    }
}

/// The `{id}` of a key's path; a path that cannot be read is answered as every error is.
#[derive(Debug)]
pub struct KeyId(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for KeyId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(id)| Self(id))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Bytes carried as standard base64 in a JSON string.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct B64(String);

impl B64 {
    /// The bytes, or 400 naming `field`.
    pub fn decode(&self, field: &str) -> Result<Vec<u8>, ApiError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .map_err(|e| ApiError::bad_request(format!("`{field}` is not base64: {e}")))
    }
}

/// Standard base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
