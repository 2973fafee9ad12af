//! The `/v1` routes. A request on a key is checked before its body is read: the client must be
//! granted the operation and see the namespace its ID authenticates. Then the body is read, and
//! the rest (parsing it, decoding its base64, the keystore call, encoding the answer) runs where
//! its [`Placement`] says (the blocking pool, unless it is quick), behind its backend's gate, on
//! behalf of the client (so the audit log names it).

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Query, RawPathParams, RawQuery, Request};
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{b64, ApiError, NoQuery, PathOf, B64};
use super::auth::{Caller, Clients};
use super::metrics::Metrics;
use super::ops::{Action, Input};
use crate::backend::KeyOptions;
use crate::config::Operation;
use crate::keystore::{KeyIdFields, KeyInfo, KeyRequest, Keystore};
use crate::{KeySpec, KeyType, Purpose, RsaPadding};

mod admin;
mod batch;
mod placement;

use admin::{audit, audit_verify, clients, maintain, namespaces, store_verify};
use batch::batch;
use placement::{quick_use, run_blocking, Gate, Placement};

type Answer = Result<Json<Value>, ApiError>;

/// The room made for a key action's answer before it is written: a signature's or a 1 KiB
/// envelope's answer fits.
const ANSWER_CAPACITY: usize = 2048;

/// How many calls of one backend may run at once on the blocking pool; more wait for a turn
/// without holding a thread, so a slow device (a TPM making RSA keys) cannot take the threads
/// every other backend's requests need.
pub const PER_BACKEND: usize = 32;

/// What every request shares: one `Arc`, which axum clones for every request.
#[derive(Debug, Clone)]
pub struct State(Arc<Common>);

impl std::ops::Deref for State {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.0
    }
}

/// The state itself ([`State`]).
#[derive(Debug)]
pub struct Common {
    keystore: Arc<Keystore>,
    pub(super) clients: Arc<Clients>,
    /// A gate per backend, by name.
    gates: Arc<HashMap<Arc<str>, Gate>>,
    metrics: Arc<Metrics>,
    /// The metrics' backend label of a request on no backend: `-`.
    no_backend: Arc<str>,
    /// The last periodic verification's outcome, if one ran.
    verified: Arc<std::sync::Mutex<Option<Verified>>>,
    /// Keystore calls under way.
    in_flight: Arc<AtomicUsize>,
}

/// What the last periodic verification found.
#[derive(Debug, Clone, Copy)]
pub struct Verified {
    /// When it ended, seconds since the epoch.
    at: i64,
    /// `passed`, `unchecked` (something could not be checked), `failed`, or `error` (the run
    /// itself could not be made).
    status: &'static str,
}

impl Verified {
    /// The outcome of a run.
    pub fn of(report: &crate::Result<crate::verify::VerifyReport>) -> Self {
        Self {
            at: crate::time::now(),
            status: report.as_ref().map_or("error", |r| r.status().as_str()),
        }
    }

    /// Whether it found something wrong, or could not run.
    fn failed(self) -> bool {
        matches!(self.status, "failed" | "error")
    }
}

impl State {
    pub(super) fn new(
        keystore: Arc<Keystore>,
        clients: Clients,
        verified: Arc<std::sync::Mutex<Option<Verified>>>,
    ) -> Self {
        let gates = keystore
            .backends()
            .map(|b| (Arc::from(b.name()), Gate::new(b.computes_in_process())))
            .collect();
        Self(Arc::new(Common {
            keystore,
            clients: Arc::new(clients),
            gates: Arc::new(gates),
            metrics: Arc::new(Metrics::default()),
            no_backend: Arc::from("-"),
            verified,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// The backend's shared name, if the keystore has it.
    fn backend(&self, name: &str) -> Option<Arc<str>> {
        self.gates.get_key_value(name).map(|(k, _)| Arc::clone(k))
    }

    /// Where `operation` on the key of `fields` runs ([`Placement`]).
    fn placement(&self, operation: Operation, fields: &KeyIdFields) -> Placement {
        match self.gates.get_key_value(fields.backend.as_str()) {
            Some((name, gate)) => {
                let key_use = quick_use(operation, fields.spec.key_type());
                // A signature is checked in process with the recorded public key, whoever holds
                // the private one.
                let in_process = gate.in_process || operation == Operation::Verify;
                Placement {
                    backend: Some(Arc::clone(name)),
                    quick: in_process && key_use,
                    device_use: !in_process && key_use,
                }
            }
            None => Placement::pool(None),
        }
    }

    pub(super) fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    pub(super) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// The service's routes. The service admits each request before them and passes each answer
/// through [`allow_on_405_only`] (`src/service/listen.rs`).
pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/metrics", get(metrics))
        .route("/v1/clients", get(clients))
        .route("/v1/namespaces", get(namespaces))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", post(audit_verify))
        .route("/v1/store/verify", post(store_verify))
        .route("/v1/maintain", post(maintain))
        .route("/v1/keys", get(list).post(create))
        .route("/v1/keys/import", post(import))
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
            |caller: Result<Caller, ApiError>,
             params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
             request: Request| async move {
                let e = caller
                    .err()
                    .unwrap_or_else(|| method_not_allowed(params.ok().as_ref()));
                refuse(request, e).await
            },
        )
        .layer(DefaultBodyLimit::max(super::MAX_BODY))
        .with_state(state)
}

/// Removes `Allow` from every answer but a 405: axum adds a route's methods to whatever its
/// method fallback answers (a 404 for a key action that does not exist, a 401), where it would
/// tell of methods the request was not refused for. Done to the router's answer: a layer on its
/// routes runs inside what adds `Allow`.
pub(super) fn allow_on_405_only(response: &mut axum::response::Response) {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().remove(header::ALLOW);
    }
}

/// A method the path does not take: 405; on `/v1/keys/{id}/{what}`, which the router serves
/// with both methods, with the one `what` takes in `Allow` (or 404 for a `what` the service does
/// not have); elsewhere the router says `Allow`.
fn method_not_allowed(params: Option<&RawPathParams>) -> ApiError {
    let what = params.and_then(|p| p.iter().find(|(name, _)| *name == "what"));
    match what {
        Some((_, what)) => match key_path_allows(what) {
            Ok(allow) => ApiError::method_not_allowed_but(allow),
            Err(e) => e,
        },
        None => ApiError::method_not_allowed(),
    }
}

/// The methods `/v1/keys/{id}/{what}` takes (`Allow`): `GET` for a key's readable parts, `POST`
/// for its actions; 404 for a `what` the service does not have.
fn key_path_allows(what: &str) -> Result<&'static str, ApiError> {
    match what {
        "public" | "history" => Ok("GET,HEAD"),
        action => Action::parse(action).map(|_| "POST"),
    }
}

/// Runs `op` on the keystore where `placement` says, behind its backend's gate (if any), on
/// behalf of `client`, and counts it as `operation` in the metrics. The client's turn and the
/// backend's gate are held by the work itself: a client that goes away before the answer does
/// not free them while the work it asked for still runs.
async fn run<T: Send + 'static>(
    state: &State,
    client: &Caller,
    operation: &'static str,
    placement: Placement,
    mut op: impl FnMut(&Keystore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let who = client.name_arc();
    let metrics = Arc::clone(&state.metrics);
    let label = placement
        .backend
        .clone()
        .unwrap_or_else(|| Arc::clone(&state.no_backend));
    run_blocking(state, client, placement, move |ks| {
        let done = op(ks);
        // A quick call that would have waited is no outcome: it is made again on the pool.
        if !crate::keystore::would_wait() {
            let outcome = done.as_ref().map_or_else(ApiError::code, |_| "ok");
            metrics.record(operation, &label, &who, outcome, started.elapsed());
        }
        done
    })
    .await?
}

/// Where `operation` on the key `id` runs if the caller may do it and sees the key's namespace
/// ([`Placement`]: its backend, and whether it is quick); a key
/// it does not see is answered as one that does not exist. The namespace is the ID's,
/// authenticated without reading the store: nothing about a key the caller does not see is
/// looked up (no due work run, no device asked, no other error told), and no body read.
fn authorize(
    state: &State,
    client: &Caller,
    operation: Operation,
    id: &str,
) -> Result<Placement, ApiError> {
    let checked = client.may(operation).and_then(|()| {
        let fields = state.keystore.authenticate_id(id)?;
        if client.sees(&fields.namespace) {
            Ok(state.placement(operation, &fields))
        } else {
            Err(ApiError::no_such_key())
        }
    });
    if let Err(e) = &checked {
        // Refused here, the keystore never saw it: the audit log and the metrics are told.
        let who = client.name_arc();
        crate::audit::on_behalf_of(&who, || {
            state
                .keystore
                .audit_refusal(operation.as_str(), id, e.code());
        });
        state.metrics.record(
            operation.as_str(),
            &state.no_backend,
            &who,
            e.code(),
            Duration::ZERO,
        );
    }
    checked
}

async fn health(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    _: NoQuery,
) -> Answer {
    let verified = *state
        .verified
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut answer = json!({
        "status": if verified.is_some_and(Verified::failed) { "degraded" } else { "ok" },
        "client": client.name,
        "sealer": state.keystore.sealer_kind(),
    });
    if let Some(v) = verified {
        answer["verified"] = json!({
            "at": crate::time::format_utc(v.at),
            "status": v.status,
        });
    }
    Ok(Json(answer))
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    _: NoQuery,
) -> Result<(StatusCode, [(header::HeaderName, &'static str); 1], String), ApiError> {
    client.may(Operation::Metrics)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    ))
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
    client: Caller,
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
    let keys = run(&state, &client, "list", Placement::pool(None), move |ks| {
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
    let (client, request) = new_key_granted(&state, caller, request, Operation::Create).await?;
    // Read as a key action's body: an empty one is `{}` (and so lacks the required fields).
    let body: CreateBody = Input::Bytes(&json_bytes(request, &state).await?).parse()?;
    new_key_namespace(&state, &client, Operation::Create, &body.namespace)?;
    let (request, options) = body.request(crate::time::now())?;
    // The backend the keystore is asked of, named or not: its gate, as every call on it.
    let backend = state.backend(request.backend_name());
    let info = run(
        &state,
        &client,
        "create",
        Placement::pool(backend),
        move |ks| Ok(ks.create_key_with(&request, &options)?),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(info.to_json())))
}

/// The client asking for a new key (`operation`: create or import), if it is granted it (else
/// 403, as [`granted`]); a refusal for the grant is audited as the keystore audits a failed
/// creation.
async fn new_key_granted(
    state: &State,
    caller: Result<Caller, ApiError>,
    request: Request,
    operation: Operation,
) -> Result<(Caller, Request), ApiError> {
    let (client, request) = granted(caller, request, None).await?;
    match client.may(operation) {
        Ok(()) => Ok((client, request)),
        Err(e) => {
            let e = refused_new_key(state, &client, operation, "", e);
            Err(refuse(request, e).await)
        }
    }
}

/// Whether `client` sees `namespace`, where it asks for a new key (`operation`: create or
/// import): 403 if not, audited as the keystore audits a failed creation.
fn new_key_namespace(
    state: &State,
    client: &Caller,
    operation: Operation,
    namespace: &str,
) -> Result<(), ApiError> {
    if client.sees(namespace) {
        return Ok(());
    }
    let verb = match operation {
        Operation::Import => "import keys into",
        _ => "make keys in",
    };
    let e = ApiError::forbidden(format!(
        "client `{}` may not {verb} namespace `{namespace}`",
        client.name
    ));
    Err(refused_new_key(state, client, operation, namespace, e))
}

/// `e`, the refusal of a new key in `namespace` (empty if not read yet) before the keystore is
/// asked, audited.
fn refused_new_key(
    state: &State,
    client: &Caller,
    operation: Operation,
    namespace: &str,
    e: ApiError,
) -> ApiError {
    crate::audit::on_behalf_of(&client.name_arc(), || {
        state
            .keystore
            .audit_new_key_refusal(operation.as_str(), namespace, e.code());
    });
    e
}

/// `POST /v1/keys/import`: a key brought in, as a creation with `key` (in base64) the key file:
/// wrapped, unwrapped with the key `unwrap_with` (which the client must see), else a PKCS#8
/// private key (PEM or DER) or an AES or HMAC key's 32 raw bytes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    namespace: String,
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    purpose: Option<String>,
    backend: Option<String>,
    padding: Option<String>,
    rotate_after: Option<String>,
    activate_at: Option<String>,
    deactivate_at: Option<String>,
    /// Let the key leave again, wrapped.
    #[serde(default)]
    extractable: bool,
    key: B64,
    unwrap_with: Option<String>,
}

async fn import(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (client, request) = new_key_granted(&state, caller, request, Operation::Import).await?;
    let body: ImportBody = Input::Bytes(&json_bytes(request, &state).await?).parse()?;
    new_key_namespace(&state, &client, Operation::Import, &body.namespace)?;
    let (key, unwrap_with) = (body.key, body.unwrap_with);
    let (request, options) = CreateBody {
        namespace: body.namespace,
        name: body.name,
        key_type: body.key_type,
        purpose: body.purpose,
        backend: body.backend,
        padding: body.padding,
        rotate_after: body.rotate_after,
        activate_at: body.activate_at,
        deactivate_at: body.deactivate_at,
        extractable: body.extractable,
    }
    .request(crate::time::now())?;
    let key = key.decode("key")?;
    let backend = state.backend(request.backend_name());
    let asker = client.client();
    let info = run(
        &state,
        &client,
        "import",
        Placement::pool(backend),
        move |ks| {
            if let Some(id) = &unwrap_with {
                super::ops::sees_other_key(ks, &asker, "unwrap", id).inspect_err(|e| {
                    ks.audit_new_key_refusal("import", &request.namespace, e.code());
                })?;
            }
            Ok(ks.import_key(&request, &key, unwrap_with.as_deref(), &options)?)
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(info.to_json())))
}

async fn show(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    PathOf(id): PathOf<String>,
    _: NoQuery,
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

/// `GET /v1/keys/{id}/public[?version=N]` and `GET /v1/keys/{id}/history` (no query); a key
/// action is 405 (`Allow: POST`).
async fn read(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    PathOf((id, what)): PathOf<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Answer {
    match what.as_str() {
        "public" => {
            let query: ReadQuery = super::api::query(raw.as_deref())?;
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
            super::api::no_query(raw.as_deref())?;
            let backend = authorize(&state, &client, Operation::History, &id)?;
            let events = run(&state, &client, "history", backend, move |ks| {
                Ok(ks.history(&id)?)
            })
            .await?;
            Ok(Json(Value::Array(
                events.iter().map(crate::KeyEvent::to_json).collect(),
            )))
        }
        other => Err(match key_path_allows(other) {
            Ok(allow) => ApiError::method_not_allowed_but(allow),
            Err(_) => ApiError::no_endpoint(format!(
                "GET /v1/keys/ID/{other}: a key's readable parts are `public` and `history`"
            )),
        }),
    }
}

/// `POST /v1/keys/{id}/{action}`: checked, then the body read, then run ([`Action`]).
async fn act(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    PathOf((id, action)): PathOf<(String, String)>,
    request: Request,
) -> Result<axum::response::Response, ApiError> {
    let (client, request) = granted(caller, request, None).await?;
    let parsed = Action::parse(&action).map_err(|e| match key_path_allows(&action) {
        // A readable part: it is there, for GET.
        Ok(allow) => ApiError::method_not_allowed_but(allow),
        Err(_) => e,
    });
    let checked = parsed.and_then(|action| {
        let backend = authorize(&state, &client, action.operation(), &id)?;
        Ok((action, backend))
    });
    let (action, backend) = match checked {
        Ok(checked) => checked,
        Err(e) => return Err(refuse(request, e).await),
    };
    let body = json_bytes(request, &state).await?;
    let placement = backend.for_body(body.len());
    let asker = client.client();
    let answer = run(&state, &client, action.name(), placement, move |ks| {
        action.run(ks, &asker, &id, Input::Bytes(&body))
    })
    .await?;
    let mut written = Vec::with_capacity(ANSWER_CAPACITY);
    answer.write_json(&mut written)?;
    Ok(super::api::json_response(written))
}

/// The client asking, if it is one and is granted `operation` (any, for `None`), on a POST
/// path (which takes no query parameter: one given is refused, never ignored); else the
/// refusal, once the body is dropped ([`refuse`]).
async fn granted(
    caller: Result<Caller, ApiError>,
    request: Request,
    operation: Option<Operation>,
) -> Result<(Caller, Request), ApiError> {
    let checked = caller.and_then(|client| {
        operation.map_or(Ok(()), |op| client.may(op))?;
        super::api::no_query(request.uri().query())?;
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
    drain(request, super::MAX_BODY).await;
    e
}

/// Reads and drops at most `limit` bytes of the request's body; whether it ended within them.
pub(super) async fn drain(request: Request, limit: usize) -> bool {
    use axum::body::HttpBody;
    let mut body = request.into_body();
    let mut seen = 0usize;
    while let Some(Ok(frame)) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        seen = seen.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
        if seen > limit {
            return false;
        }
    }
    true
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
    let body: RandomBody = Input::Bytes(&json_bytes(request, &state).await?).parse()?;
    let data = crate::keystore::random_bytes(body.bytes)?;
    Ok(Json(json!({ "data": b64(&data) })))
}
