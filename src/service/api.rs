//! The service's bodies: binary fields in base64, errors as `{"error":{"code","message"}}` with
//! the HTTP status that fits.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::Error;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `Retry-After`, in seconds, for a refusal that ends.
    retry_after: Option<u64>,
    /// `Allow`, for a method the path does not take, when the router cannot say it.
    allow: Option<&'static str>,
}

impl ApiError {
    /// Any refusal: the transport's own (429 `busy`) are made so.
    pub(super) fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// 401: no configured client.
    pub fn unauthenticated() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthenticated",
            message: "this connection is no client of the service".into(),
            retry_after: None,
            allow: None,
        }
    }

    /// 403: the client may not do that.
    pub fn forbidden(message: String) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// 404 for a key outside the client's namespaces: said as for a key that does not exist.
    pub fn no_such_key() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "no_such_key",
            message: "no such key".into(),
            retry_after: None,
            allow: None,
        }
    }

    /// 400: a body that does not say what the operation needs.
    pub fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_input",
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// 404: a path the service does not have.
    pub fn no_endpoint(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "no_such_endpoint",
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// A JSON body that cannot be read: 400 if it is not JSON, 422 if it does not say what the
    /// operation needs (a field missing, of the wrong type, or unknown), as axum's extractor.
    pub fn body(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        let status = match e.classify() {
            Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            Category::Io | Category::Syntax | Category::Eof => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            code: "invalid_input",
            message: format!("the request's JSON body: {e}"),
            retry_after: None,
            allow: None,
        }
    }

    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its error code (`no_such_key`, `forbidden`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// `{"error":{"code","message"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        })
    }

    /// An axum rejection of the request (its body unreadable, too large, of another type),
    /// with axum's status and message.
    pub fn rejection(status: StatusCode, message: String) -> Self {
        Self {
            status,
            code: if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "invalid_input"
            },
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// 405: the path takes other methods.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "this path does not take that method (docs/service.md)".into(),
            retry_after: None,
            allow: None,
        }
    }

    /// 405 on a path that takes `allow` only (`POST`, `GET,HEAD`), said in `Allow`: for the
    /// paths the router cannot tell apart (`/v1/keys/{id}/{what}`).
    pub fn method_not_allowed_but(allow: &'static str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: format!(
                "this path takes {} only (docs/service.md)",
                allow.replace(',', " and ")
            ),
            retry_after: None,
            allow: Some(allow),
        }
    }

    /// 422: a body that is JSON of the wrong shape (a field missing, of the wrong type).
    pub fn unprocessable(message: String) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            message,
            retry_after: None,
            allow: None,
        }
    }

    /// 429: too many failed authentications from the request's source; try again in
    /// `retry_after` seconds.
    pub fn rate_limited(message: String, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message,
            retry_after: Some(retry_after),
            allow: None,
        }
    }

    /// 500: the service itself failed (a task that did not finish).
    pub fn internal(message: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
            retry_after: None,
            allow: None,
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
            retry_after: None,
            allow: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.to_json())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        if let Some(allow) = self.allow {
            response.headers_mut().insert(
                axum::http::header::ALLOW,
                axum::http::HeaderValue::from_static(allow),
            );
        }
        response
    }
}

/// A request without query parameters: one given is 400 naming it, for a path that takes none
/// (a parameter is refused, never ignored).
#[derive(Debug)]
pub struct NoQuery;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        no_query(parts.uri.query()).map(|()| Self)
    }
}

/// `Ok` for no query (or an empty one), else 400 naming its first parameter.
pub fn no_query(query: Option<&str>) -> Result<(), ApiError> {
    let names: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query string: {e}")))?;
    match names.first() {
        None => Ok(()),
        Some((name, _)) => Err(ApiError::bad_request(format!(
            "`{name}` is not a query parameter of this path: it takes none"
        ))),
    }
}

/// The query parameters as `T` (which refuses unknown ones): 400 naming what is wrong.
pub fn query<T: serde::de::DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query string: {e}")))
}

/// The parameters of a path (`{id}`, `{id}/{what}`); a path that cannot be read is answered as
/// every error is.
#[derive(Debug)]
pub struct PathOf<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for PathOf<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Bytes carried as standard base64 in a JSON string: a plaintext, perhaps, so the bytes are
/// zeroized when dropped. Decoded as the JSON is read, straight from its text (no copy of the
/// string is made, unless it holds escapes); text that is not base64 is an error only when the
/// field is asked for ([`B64::decode`]), which names it.
pub struct B64(Result<Zeroizing<Vec<u8>>, base64::DecodeError>);

impl Default for B64 {
    fn default() -> Self {
        Self(Ok(Zeroizing::new(Vec::new())))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;

        impl serde::de::Visitor<'_> for Text {
            type Value = B64;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string (base64)")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<B64, E> {
                Ok(B64(base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map(Zeroizing::new)))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<B64, E> {
                let text = Zeroizing::new(text);
                self.visit_str(&text)
            }
        }

        d.deserialize_str(Text)
    }
}

impl std::fmt::Debug for B64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(bytes) => write!(f, "B64({} bytes)", bytes.len()),
            Err(_) => f.write_str("B64(not base64)"),
        }
    }
}

impl B64 {
    /// The bytes, or 400 naming `field`.
    pub fn decode(self, field: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        self.0
            .map_err(|e| ApiError::bad_request(format!("`{field}` is not base64: {e}")))
    }
}

/// Appends the standard base64 of `bytes` to `out`, encoded in place: no buffer between holds
/// any of it (the bytes may be a plaintext or a data key).
pub fn push_b64(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), ApiError> {
    let too_long = || ApiError::internal("an answer too long to encode".into());
    let len = base64::encoded_len(bytes.len(), true).ok_or_else(too_long)?;
    let at = out.len();
    out.resize(at.checked_add(len).ok_or_else(too_long)?, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[at..])
        .map_err(|_| too_long())?;
    out.truncate(at + written);
    Ok(())
}

/// A JSON answer of `body`'s bytes, with its `Content-Type`.
pub fn json_response(body: Vec<u8>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Standard base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
