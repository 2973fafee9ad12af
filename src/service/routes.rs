//! The `/v1` routes. A request on a key is checked before its body is read: the client must be
//! granted the operation and see the namespace its ID authenticates. Then the body is read, and
//! the rest (parsing it, decoding its base64, the keystore call, encoding the answer) runs on the
//! blocking pool, behind its backend's gate, on behalf of the client (so the audit log names it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request};
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::api::{b64, ApiError, Body, PathOf};
use super::auth::{Caller, Client, Clients};
use super::metrics::Metrics;
use super::ops::{Action, Input};
use crate::backend::KeyOptions;
use crate::config::Operation;
use crate::keystore::{KeyInfo, KeyRequest, Keystore};
use crate::{KeySpec, KeyType, Purpose, RsaPadding};

type Answer = Result<Json<Value>, ApiError>;

/// How many calls of one backend may run at once on the blocking pool; more wait for a turn
/// without holding a thread, so a slow device (a TPM making RSA keys) cannot take the threads
/// every other backend's requests need.
pub const PER_BACKEND: usize = 32;

/// The most operations one `/v1/batch` request may hold.
pub const MAX_BATCH: usize = 1000;

/// What every request shares.
#[derive(Debug, Clone)]
pub struct State {
    keystore: Arc<Keystore>,
    pub(super) clients: Clients,
    /// A gate per backend, by name.
    gates: Arc<HashMap<Arc<str>, Arc<Semaphore>>>,
    metrics: Arc<Metrics>,
}

impl State {
    pub(super) fn new(keystore: Arc<Keystore>, clients: Clients) -> Self {
        let gates = keystore
            .backends()
            .map(|b| (Arc::from(b.name()), Arc::new(Semaphore::new(PER_BACKEND))))
            .collect();
        Self {
            keystore,
            clients,
            gates: Arc::new(gates),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The backend's shared name, if the keystore has it.
    fn backend(&self, name: &str) -> Option<Arc<str>> {
        self.gates.get_key_value(name).map(|(k, _)| Arc::clone(k))
    }

    pub(super) fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }
}

/// The service's routes.
pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/metrics", get(metrics))
        .route("/v1/clients", get(clients))
        .route("/v1/keys", get(list).post(create))
        .route("/v1/keys/{id}", get(show))
        .route("/v1/keys/{id}/{what}", get(read).post(act))
        .route("/v1/batch", post(batch))
        .route("/v1/random", post(random))
        .fallback(
            |caller: Result<Caller, ApiError>, request: Request| async move {
                let e = match caller {
                    Ok(_) => ApiError::no_endpoint(
                        "no such endpoint: the service's paths are in docs/service.md".into(),
                    ),
                    Err(e) => e,
                };
                refuse(request, e).await
            },
        )
        .method_not_allowed_fallback(
            |caller: Result<Caller, ApiError>, request: Request| async move {
                let e = caller.err().unwrap_or_else(ApiError::method_not_allowed);
                refuse(request, e).await
            },
        )
        .layer(DefaultBodyLimit::max(super::MAX_BODY))
        .with_state(state)
}

/// Runs `op` on the keystore on the blocking pool, behind `backend`'s gate (if any), on behalf
/// of `client`, and counts it as `operation` in the metrics.
async fn run<T: Send + 'static>(
    state: &State,
    client: &Client,
    operation: &'static str,
    backend: Option<Arc<str>>,
    op: impl FnOnce(&Keystore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let who: Arc<str> = Arc::from(client.name.as_str());
    let gate = backend.as_ref().and_then(|b| state.gates.get(b)).cloned();
    let done = async {
        // The gate is never closed: acquiring fails only if it were.
        let _turn = match gate {
            Some(gate) => Some(
                gate.acquire_owned()
                    .await
                    .map_err(|_| ApiError::internal("the backend's gate closed".into()))?,
            ),
            None => None,
        };
        let keystore = Arc::clone(&state.keystore);
        let on_behalf = Arc::clone(&who);
        tokio::task::spawn_blocking(move || {
            crate::audit::on_behalf_of(&on_behalf, || op(&keystore))
        })
        .await
        .map_err(|e| ApiError::internal(format!("the operation did not finish: {e}")))?
    }
    .await;
    let none: Arc<str> = Arc::from("-");
    state.metrics.record(
        operation,
        backend.as_ref().unwrap_or(&none),
        &who,
        done.as_ref().map_or_else(ApiError::code, |_| "ok"),
        started.elapsed(),
    );
    done
}

/// The backend of the key `id` if the caller may do `operation` and sees its namespace; a key
/// it does not see is answered as one that does not exist. The namespace is the ID's,
/// authenticated without reading the store: nothing about a key the caller does not see is
/// looked up (no due work run, no device asked, no other error told), and no body read.
fn authorize(
    state: &State,
    client: &Client,
    operation: Operation,
    id: &str,
) -> Result<Option<Arc<str>>, ApiError> {
    client.may(operation)?;
    let fields = state.keystore.authenticate_id(id)?;
    if !client.sees(&fields.namespace) {
        return Err(ApiError::no_such_key());
    }
    Ok(state.backend(&fields.backend))
}

async fn health(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
) -> Answer {
    Ok(Json(json!({
        "status": "ok",
        "client": client.name,
        "sealer": state.keystore.sealer_kind(),
    })))
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
) -> Result<(StatusCode, [(header::HeaderName, &'static str); 1], String), ApiError> {
    client.may(Operation::Metrics)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    ))
}

async fn clients(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
) -> Answer {
    client.may(Operation::Admin)?;
    Ok(Json(state.clients.to_json()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    namespace: Option<String>,
    name: Option<String>,
    /// Destroyed keys too.
    #[serde(default)]
    all: bool,
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
        None if query.name.is_some() => {
            return Err(ApiError::bad_request(
                "a key is found by name within its namespace: give `namespace` with `name`".into(),
            ))
        }
        None => client.namespaces().to_vec(),
    };
    let keys = run(&state, &client, "list", None, move |ks| {
        let mut all = Vec::new();
        for ns in &namespaces {
            match &query.name {
                Some(name) => all.extend(ks.key_info_by_name(ns, name)?),
                None if query.all => all.extend(ks.list_all_keys(Some(ns))?),
                None => all.extend(ks.list_keys(Some(ns))?),
            }
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
    /// `pss` (default) or `pkcs1v15`, for RSA signing keys.
    padding: Option<String>,
    /// `DURATION` (`90d`): rotate when the current version is this old.
    rotate_after: Option<String>,
    /// An RFC 3339 UTC time or `+DURATION`: start in pre-activation until then.
    activate_at: Option<String>,
    /// An RFC 3339 UTC time or `+DURATION`: deactivate then.
    deactivate_at: Option<String>,
    /// Let the key leave its device wrapped (never in clear).
    #[serde(default)]
    extractable: bool,
}

impl CreateBody {
    /// The request and its options, times counted from `now`.
    fn request(self, now: i64) -> Result<(KeyRequest, KeyOptions), ApiError> {
        let key_type: KeyType = self.key_type.parse()?;
        let purpose: Option<Purpose> = self.purpose.as_deref().map(str::parse).transpose()?;
        let padding = match self.padding.as_deref() {
            None => None,
            Some("pss") => Some(RsaPadding::Pss),
            Some("pkcs1v15") => Some(RsaPadding::Pkcs1v15),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "`padding` is `pss` or `pkcs1v15`, not `{other}`"
                )))
            }
        };
        let instant = |t: &Option<String>| {
            t.as_deref()
                .map(|t| crate::time::parse_instant(t, now))
                .transpose()
        };
        let options = KeyOptions::new()
            .extractable(self.extractable)
            .activate_at(instant(&self.activate_at)?)
            .deactivate_at(instant(&self.deactivate_at)?)
            .rotate_after(
                self.rotate_after
                    .as_deref()
                    .map(crate::time::parse_duration)
                    .transpose()?,
            );
        let request = KeyRequest {
            namespace: self.namespace,
            name: self.name,
            spec: KeySpec::new(key_type, purpose, padding)?,
            backend: self.backend,
        };
        Ok((request, options))
    }
}

async fn create(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (client, request) = granted(caller, request, Some(Operation::Create)).await?;
    let Body(body) = Body::<CreateBody>::from_request(request, &state).await?;
    if !client.sees(&body.namespace) {
        return Err(ApiError::forbidden(format!(
            "client `{}` may not make keys in namespace `{}`",
            client.name, body.namespace
        )));
    }
    let backend = body.backend.as_deref().and_then(|b| state.backend(b));
    let (request, options) = body.request(crate::time::now())?;
    let info = run(&state, &client, "create", backend, move |ks| {
        Ok(ks.create_key_with(&request, &options)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info.to_json())))
}

async fn show(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    PathOf(id): PathOf<String>,
) -> Answer {
    let backend = authorize(&state, &client, Operation::Show, &id)?;
    let info = run(&state, &client, "show", backend, move |ks| {
        Ok(ks.key_info(&id)?)
    })
    .await?;
    Ok(Json(info.to_json()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    version: Option<u32>,
}

/// `GET /v1/keys/{id}/public[?version=N]` and `GET /v1/keys/{id}/history`.
async fn read(
    axum::extract::State(state): axum::extract::State<State>,
    Caller(client): Caller,
    PathOf((id, what)): PathOf<(String, String)>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    match what.as_str() {
        "public" => {
            let backend = authorize(&state, &client, Operation::Pubkey, &id)?;
            let key = run(&state, &client, "pubkey", backend, move |ks| {
                Ok(ks.public_key_version(&id, query.version)?)
            })
            .await?;
            Ok(Json(json!({
                "pem": key.to_pem(),
                "der": b64(key.spki_der()),
                "type": key.key_type().as_str(),
                "algorithm": key.algorithm().as_str(),
            })))
        }
        "history" => {
            let backend = authorize(&state, &client, Operation::History, &id)?;
            let events = run(&state, &client, "history", backend, move |ks| {
                Ok(ks.history(&id)?)
            })
            .await?;
            Ok(Json(Value::Array(
                events.iter().map(crate::KeyEvent::to_json).collect(),
            )))
        }
        other => Err(ApiError::no_endpoint(format!(
            "GET /v1/keys/ID/{other}: a key's readable parts are `public` and `history`"
        ))),
    }
}

/// `POST /v1/keys/{id}/{action}`: checked, then the body read, then run ([`Action`]).
async fn act(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    PathOf((id, action)): PathOf<(String, String)>,
    request: Request,
) -> Answer {
    let (client, request) = granted(caller, request, None).await?;
    let checked = Action::parse(&action).and_then(|action| {
        let backend = authorize(&state, &client, action.operation(), &id)?;
        Ok((action, backend))
    });
    let (action, backend) = match checked {
        Ok(checked) => checked,
        Err(e) => return Err(refuse(request, e).await),
    };
    let body = json_bytes(request, &state).await?;
    let answer = run(&state, &client, action.name(), backend, move |ks| {
        action.run(ks, &id, Input::Bytes(&body))
    })
    .await?;
    Ok(Json(answer))
}

/// The client asking, if it is one and is granted `operation` (any, for `None`); else the
/// refusal, once the body is dropped ([`refuse`]).
async fn granted(
    caller: Result<Caller, ApiError>,
    request: Request,
    operation: Option<Operation>,
) -> Result<(Arc<Client>, Request), ApiError> {
    let checked = caller.and_then(|Caller(client)| {
        operation.map_or(Ok(()), |op| client.may(op))?;
        Ok(client)
    });
    match checked {
        Ok(client) => Ok((client, request)),
        Err(e) => Err(refuse(request, e).await),
    }
}

/// `e`, once the request's body is read and dropped (at most [`super::MAX_BODY`] bytes): a
/// request refused before its body was read would otherwise be closed on with the body unread,
/// and the client see its connection reset instead of the answer.
pub(super) async fn refuse(request: Request, e: ApiError) -> ApiError {
    use axum::body::HttpBody;
    let mut body = request.into_body();
    let mut seen = 0usize;
    while let Some(Ok(frame)) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        seen = seen.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
        if seen > super::MAX_BODY {
            break;
        }
    }
    e
}

/// A request's body, at most [`super::MAX_BODY`] bytes, which must be JSON unless empty.
async fn json_bytes(request: Request, state: &State) -> Result<axum::body::Bytes, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    let bytes = axum::body::Bytes::from_request(request, state)
        .await
        .map_err(|e| ApiError::rejection(e.status(), e.body_text()))?;
    if !bytes.is_empty() && !is_json {
        return Err(ApiError::rejection(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON: send `Content-Type: application/json`".into(),
        ));
    }
    Ok(bytes)
}

/// An operation of a batch, checked and ready to run.
struct Item {
    action: Action,
    key: String,
    backend: Option<Arc<str>>,
    input: Value,
}

/// `POST /v1/batch`: `{"operations":[{"op":ACTION,"key":ID,…its body's fields}, …]}`, at most
/// [`MAX_BATCH`]; each answered in order as `{"status":N,"result":…}` or
/// `{"status":N,"error":{…}}`. Each is checked as its own request would be; those refused are
/// not run, the others are, one after the other, on one thread of the blocking pool.
async fn batch(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Answer {
    let (client, request) = granted(caller, request, None).await?;
    let body = json_bytes(request, &state).await?;
    let who: Arc<str> = Arc::from(client.name.as_str());
    // Parsed off the threads that serve connections: a batch may be tens of megabytes.
    let items = tokio::task::spawn_blocking(move || parse_batch(&body))
        .await
        .map_err(|e| ApiError::internal(format!("the batch was not read: {e}")))??;
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    let mut ready = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item.and_then(|(action, key, input)| {
            let backend = authorize(&state, &client, action.operation(), &key)?;
            Ok(Item {
                action,
                key,
                backend,
                input,
            })
        }) {
            Ok(item) => ready.push((i, item)),
            Err(e) => results[i] = Some(item_error(&e)),
        }
    }
    // One turn of each backend the batch uses, taken in name order (no two batches wait on
    // each other's).
    let mut backends: Vec<Arc<str>> = ready
        .iter()
        .filter_map(|(_, it)| it.backend.clone())
        .collect();
    backends.sort();
    backends.dedup();
    let mut turns = Vec::with_capacity(backends.len());
    for backend in &backends {
        if let Some(gate) = state.gates.get(backend) {
            turns.push(
                Arc::clone(gate)
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::internal("the backend's gate closed".into()))?,
            );
        }
    }
    let keystore = Arc::clone(&state.keystore);
    let metrics = Arc::clone(&state.metrics);
    let done = tokio::task::spawn_blocking(move || {
        let none: Arc<str> = Arc::from("-");
        crate::audit::on_behalf_of(&who, || {
            ready
                .into_iter()
                .map(|(i, item)| {
                    let started = Instant::now();
                    let outcome = item
                        .action
                        .run(&keystore, &item.key, Input::Value(item.input));
                    metrics.record(
                        item.action.name(),
                        item.backend.as_ref().unwrap_or(&none),
                        &who,
                        outcome.as_ref().map_or_else(ApiError::code, |_| "ok"),
                        started.elapsed(),
                    );
                    let result = match outcome {
                        Ok(value) => json!({ "status": 200, "result": value }),
                        Err(e) => item_error(&e),
                    };
                    (i, result)
                })
                .collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("the batch did not finish: {e}")))?;
    drop(turns);
    for (i, result) in done {
        results[i] = Some(result);
    }
    Ok(Json(json!({ "results": results })))
}

/// A batch's items: each its action, key and body, or why it cannot be run.
#[allow(clippy::type_complexity)]
fn parse_batch(body: &[u8]) -> Result<Vec<Result<(Action, String, Value), ApiError>>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        operations: Vec<serde_json::Map<String, Value>>,
    }
    let batch: Batch = Input::Bytes(body).parse()?;
    if batch.operations.len() > MAX_BATCH {
        return Err(ApiError::rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch holds at most {MAX_BATCH} operations, not {}",
                batch.operations.len()
            ),
        ));
    }
    Ok(batch
        .operations
        .into_iter()
        .map(|mut fields| {
            let mut take = |name: &str| match fields.remove(name) {
                Some(Value::String(text)) => Ok(text),
                _ => Err(ApiError::bad_request(format!(
                    "each operation of a batch needs `{name}`, a string"
                ))),
            };
            let action = Action::parse(&take("op")?)?;
            let key = take("key")?;
            Ok((action, key, Value::Object(fields)))
        })
        .collect())
}

/// A batch item's failure: `{"status":N,"error":{…}}`.
fn item_error(e: &ApiError) -> Value {
    let mut value = e.to_json();
    value["status"] = json!(e.status().as_u16());
    value
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RandomBody {
    bytes: usize,
}

async fn random(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Answer {
    let (_, request) = granted(caller, request, Some(Operation::Random)).await?;
    let Body(body) = Body::<RandomBody>::from_request(request, &state).await?;
    let data = crate::keystore::random_bytes(body.bytes)?;
    Ok(Json(json!({ "data": b64(&data) })))
}
