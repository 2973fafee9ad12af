//! The `/v1` routes: each checks the caller may do the operation on that key's namespace, then
//! runs the keystore call on the blocking pool.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{b64, ApiError, Body, KeyId, B64};
use super::auth::{Caller, Client, Clients};
use crate::config::Operation;
use crate::keystore::{KeyInfo, KeyRequest, Keystore};
use crate::{KeySpec, KeyType, Purpose, SignatureFormat};

type Answer = Result<Json<Value>, ApiError>;

/// What every request shares.
#[derive(Debug, Clone)]
pub struct State {
    keystore: Arc<Keystore>,
    pub(super) clients: Clients,
}

impl State {
    pub(super) fn new(keystore: Arc<Keystore>, clients: Clients) -> Self {
        Self { keystore, clients }
    }

    pub(super) fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }
}

/// The service's routes.
pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/keys", get(list).post(create))
        .route("/v1/keys/{id}", get(show))
        .route("/v1/keys/{id}/public", get(public))
        .route("/v1/keys/{id}/sign", post(sign))
        .route("/v1/keys/{id}/verify", post(verify))
        .route("/v1/keys/{id}/encrypt", post(encrypt))
        .route("/v1/keys/{id}/decrypt", post(decrypt))
        .route("/v1/random", post(random))
        .fallback(|_: Caller| async {
            ApiError::bad_request("no such endpoint: the service's paths begin /v1/".into())
        })
        .method_not_allowed_fallback(|_: Caller| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(super::MAX_BODY))
        .with_state(state)
}

/// Runs `op` on the keystore, off the threads that serve connections.
async fn blocking<T: Send + 'static>(
    state: &State,
    op: impl FnOnce(&Keystore) -> crate::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let keystore = Arc::clone(&state.keystore);
    tokio::task::spawn_blocking(move || op(&keystore))
        .await
        .map_err(|e| ApiError::internal(format!("the operation did not finish: {e}")))?
        .map_err(ApiError::from)
}

/// The key `id` if the caller may do `operation` and sees its namespace; a key it does not see
/// is answered as one that does not exist. The namespace is the ID's, authenticated without
/// reading the store: nothing about a key the caller does not see is looked up (no due work
/// run, no device asked, no other error told).
async fn visible(
    state: &State,
    client: &Client,
    operation: Operation,
    id: &str,
) -> Result<KeyInfo, ApiError> {
    client.may(operation)?;
    let fields = state.keystore.authenticate_id(id)?;
    if !client.sees(&fields.namespace) {
        return Err(ApiError::no_such_key());
    }
    let owned = id.to_owned();
    // A key that does not exist is answered as `ApiError::no_such_key` by the conversion.
    let info = blocking(state, move |ks| ks.key_info(&owned)).await?;
    Ok(info)
}

async fn health(Caller(client): Caller) -> Answer {
    Ok(Json(json!({ "status": "ok", "client": client.name })))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

async fn list(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    client.may(Operation::List)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let namespaces: Vec<String> = match query.namespace {
        Some(ns) if client.sees(&ns) => vec![ns],
        Some(_) => Vec::new(),
        None => client.namespaces().to_vec(),
    };
    let keys = blocking(&state, move |ks| {
        let mut all = Vec::new();
        for ns in &namespaces {
            all.extend(ks.list_keys(Some(ns))?);
        }
        Ok(all)
    })
    .await?;
    Ok(Json(Value::Array(
        keys.iter().map(KeyInfo::to_json).collect(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    namespace: String,
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    purpose: Option<String>,
    backend: Option<String>,
}

async fn create(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    Body(body): Body<CreateBody>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    client.may(Operation::Create)?;
    if !client.sees(&body.namespace) {
        return Err(ApiError::forbidden(format!(
            "client `{}` may not make keys in namespace `{}`",
            client.name, body.namespace
        )));
    }
    let key_type: KeyType = body.key_type.parse().map_err(ApiError::from)?;
    let purpose: Option<Purpose> = body
        .purpose
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(ApiError::from)?;
    let request = KeyRequest {
        namespace: body.namespace,
        name: body.name,
        spec: KeySpec::new(key_type, purpose, None)?,
        backend: body.backend,
    };
    let info = blocking(&state, move |ks| ks.create_key(&request)).await?;
    Ok((axum::http::StatusCode::CREATED, Json(info.to_json())))
}

async fn show(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
) -> Answer {
    let info = visible(&state, &client, Operation::Show, &id).await?;
    Ok(Json(info.to_json()))
}

async fn public(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
) -> Answer {
    visible(&state, &client, Operation::Pubkey, &id).await?;
    let key = blocking(&state, move |ks| ks.public_key(&id)).await?;
    Ok(Json(json!({ "pem": key.to_pem() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignBody {
    data: B64,
    #[serde(default)]
    format: Option<String>,
}

fn signature_format(format: Option<&str>) -> Result<SignatureFormat, ApiError> {
    match format {
        None | Some("der") => Ok(SignatureFormat::Der),
        Some("raw") => Ok(SignatureFormat::Raw),
        Some(other) => Err(ApiError::bad_request(format!(
            "`format` is `der` or `raw`, not `{other}`"
        ))),
    }
}

async fn sign(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
    Body(body): Body<SignBody>,
) -> Answer {
    let format = signature_format(body.format.as_deref())?;
    let data = body.data.decode("data")?;
    visible(&state, &client, Operation::Sign, &id).await?;
    let signature = blocking(&state, move |ks| ks.sign(&id, &data, format)).await?;
    Ok(Json(json!({ "signature": b64(&signature) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    data: B64,
    signature: B64,
    #[serde(default)]
    format: Option<String>,
}

async fn verify(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
    Body(body): Body<VerifyBody>,
) -> Answer {
    let format = signature_format(body.format.as_deref())?;
    let (data, signature) = (
        body.data.decode("data")?,
        body.signature.decode("signature")?,
    );
    visible(&state, &client, Operation::Verify, &id).await?;
    let checked = blocking(&state, move |ks| {
        match ks.verify(&id, &data, &signature, format) {
            Ok(()) => Ok(true),
            Err(crate::Error::VerificationFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?;
    Ok(Json(json!({ "valid": checked })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptBody {
    plaintext: B64,
    #[serde(default)]
    aad: B64,
}

async fn encrypt(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
    Body(body): Body<EncryptBody>,
) -> Answer {
    let (plaintext, aad) = (body.plaintext.decode("plaintext")?, body.aad.decode("aad")?);
    visible(&state, &client, Operation::Encrypt, &id).await?;
    let envelope = blocking(&state, move |ks| ks.encrypt(&id, &plaintext, &aad)).await?;
    Ok(Json(json!({ "envelope": b64(&envelope) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecryptBody {
    envelope: B64,
    #[serde(default)]
    aad: B64,
}

async fn decrypt(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    KeyId(id): KeyId,
    Body(body): Body<DecryptBody>,
) -> Answer {
    let (envelope, aad) = (body.envelope.decode("envelope")?, body.aad.decode("aad")?);
    visible(&state, &client, Operation::Decrypt, &id).await?;
    let plaintext = blocking(&state, move |ks| ks.decrypt(&id, &envelope, &aad)).await?;
    Ok(Json(json!({ "plaintext": b64(plaintext.expose()) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RandomBody {
    bytes: usize,
}

async fn random(Caller(client): Caller, Body(body): Body<RandomBody>) -> Answer {
    client.may(Operation::Random)?;
    let data = crate::keystore::random_bytes(body.bytes)?;
    Ok(Json(json!({ "data": b64(&data) })))
}
