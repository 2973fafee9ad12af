//! The routes on the whole store, for clients granted `admin`, `audit` or `maintain`: the
//! clients and namespaces, the audit log, the store's verification, due work.

use axum::extract::{RawQuery, Request};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::placement::Placement;
use super::{granted, json_bytes, run, Answer, State};
use crate::config::Operation;
use crate::keystore::Keystore;
use crate::service::api::{ApiError, NoQuery};
use crate::service::auth::Caller;
use crate::service::ops::Input;

/// `GET /v1/clients` (admin): the configured clients and the store's token clients.
pub(super) async fn clients(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    _: NoQuery,
) -> Answer {
    client.may(Operation::Admin)?;
    let tokens = run(&state, &client, "clients", Placement::pool(None), |ks| {
        Ok(ks.clients()?)
    })
    .await?;
    Ok(Json(state.clients.to_json(&tokens)))
}

/// `GET /v1/namespaces` (admin): every namespace that holds a key (destroyed ones too), by name,
/// with its count of keys, destroyed ones apart:
/// `[{"namespace":NS,"keys":N,"destroyed":M}, …]`. Every record's MAC is checked, as a listing's.
pub(super) async fn namespaces(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    _: NoQuery,
) -> Answer {
    client.may(Operation::Admin)?;
    let counts = run(&state, &client, "namespaces", Placement::pool(None), |ks| {
        let mut counts = std::collections::BTreeMap::<String, (u64, u64)>::new();
        for key in ks.list_all_keys(None)? {
            let (live, destroyed) = counts.entry(key.namespace).or_default();
            if key.state == crate::KeyState::Destroyed {
                *destroyed += 1;
            } else {
                *live += 1;
            }
        }
        Ok(counts)
    })
    .await?;
    Ok(Json(Value::Array(
        counts
            .into_iter()
            .map(|(namespace, (keys, destroyed))| {
                json!({ "namespace": namespace, "keys": keys, "destroyed": destroyed })
            })
            .collect(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// The entries of this key only (a genuine ID; the key may be destroyed).
    key: Option<String>,
    /// Entries at or after this time only: RFC 3339 UTC.
    since: Option<String>,
}

/// `GET /v1/audit[?key=ID][&since=TIME]` (`audit`): the audit log's entries, oldest first, each as
/// `keyhold audit show --json` gives it.
pub(super) async fn audit(
    axum::extract::State(state): axum::extract::State<State>,
    client: Caller,
    RawQuery(raw): RawQuery,
) -> Answer {
    client.may(Operation::Audit)?;
    let query: AuditQuery = crate::service::api::query(raw.as_deref())?;
    let since = query
        .since
        .as_deref()
        .map(|t| crate::time::parse_instant(t, crate::time::now()))
        .transpose()?;
    let entries = run(&state, &client, "audit", Placement::pool(None), move |ks| {
        Ok(crate::StoreAdmin::audit_entries(
            ks,
            query.key.as_deref(),
            since,
        )?)
    })
    .await?;
    Ok(Json(Value::Array(
        entries.iter().map(crate::audit::Entry::to_json).collect(),
    )))
}

/// A body that says nothing: empty, or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

/// `POST /v1/audit/verify` (`audit`): the audit log's MACs and chain verified, as `keyhold audit
/// verify --json` says it; a log that fails is the error it is.
pub(super) async fn audit_verify(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Answer {
    let verified = admin_check(
        &state,
        caller,
        request,
        Operation::Audit,
        "audit-verify",
        |ks| Ok(ks.verify_audit()?),
    );
    Ok(Json(verified.await?.to_json()))
}

/// `POST /v1/store/verify` (`audit`): the whole store verified (records, audit log, key material,
/// commitment), the report as `keyhold store verify --json` gives it. What fails a check is in
/// the report, not an error.
pub(super) async fn store_verify(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Answer {
    let report = admin_check(
        &state,
        caller,
        request,
        Operation::Audit,
        "store-verify",
        |ks| Ok(ks.verify_store(&|_| {})?),
    );
    Ok(Json(report.await?.to_json()))
}

/// `POST /v1/maintain` (`maintain`): the work every key's schedule makes due now, done, as `keyhold
/// maintain` does it: `{"done":[{"key","action"}],"failed":[{"key","status","error":{"code",
/// "message"}}]}`;
/// a key whose work failed is in `failed`, and the others' work is done all the same.
pub(super) async fn maintain(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Answer {
    let report = admin_check(
        &state,
        caller,
        request,
        Operation::Maintain,
        "maintain",
        |ks| Ok(ks.maintain()?),
    );
    let report = report.await?;
    let done: Vec<Value> = report
        .done
        .iter()
        .map(|d| json!({ "key": d.key, "action": d.action }))
        .collect();
    let failed: Vec<Value> = report
        .failed
        .into_iter()
        .map(|(key, e)| {
            let e = ApiError::from(e);
            let mut failure = e.to_json();
            failure["key"] = key.into();
            failure["status"] = e.status().as_u16().into();
            failure
        })
        .collect();
    Ok(Json(json!({ "done": done, "failed": failed })))
}

/// A check or work on the whole store (a POST of no body) by a client granted `grant`, run on
/// the pool as `operation`.
pub(super) async fn admin_check<T: Send + 'static>(
    state: &State,
    caller: Result<Caller, ApiError>,
    request: Request,
    grant: Operation,
    operation: &'static str,
    check: fn(&Keystore) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let (client, request) = granted(caller, request, Some(grant)).await?;
    let _: NoBody = Input::Bytes(&json_bytes(request, state).await?).parse()?;
    run(state, &client, operation, Placement::pool(None), check).await
}
