//! `POST /v1/batch`: many key actions in one request, each checked and answered as its own
//! request would be.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use serde::Deserialize;
use serde_json::{json, Value};

use super::placement::{run_blocking, Placement};
use super::{authorize, granted, json_bytes, State};
use crate::service::api::ApiError;
use crate::service::auth::Caller;
use crate::service::ops::{Action, Input, Reply};

/// The most operations one `/v1/batch` request may hold.
pub const MAX_BATCH: usize = 1000;

/// A batch's body up to this size is read on the thread that serves its connection.
const INLINE_BATCH_BODY: usize = 64 * 1024;

/// The most quick operations of a batch run one after the other before the thread serving the
/// batch lets its other tasks run ([`super::Placement`]): 8 ECDSA P-256 signatures take about a
/// quarter of a millisecond.
const QUICK_RUN: usize = 8;

/// `POST /v1/batch`: `{"operations":[{"op":ACTION,"key":ID,…its body's fields}, …]}`, at most
/// [`MAX_BATCH`]; each answered in order as `{"status":N,"result":…}` or
/// `{"status":N,"error":{…}}`. Each is checked as its own request would be (grant, namespace);
/// those allowed run in runs of consecutive operations on one backend, each behind that
/// backend's gate alone. Runs of uses may run at once (on as many threads as are free), one on
/// the request's turn and each other on a turn its client has to spare ([`Caller::spare_turn`]);
/// an operation that changes its key runs alone, after every operation before it and before
/// any after it.
///
/// The body is read once for where each operation is and its `op` and `key` (up to
/// [`INLINE_BATCH_BODY`] on the thread that serves the connection, a larger one off it); an
/// operation's own fields are read only when it runs, so a batch costs the memory of its bytes
/// and of one operation per thread running it.
pub(super) async fn batch(
    axum::extract::State(state): axum::extract::State<State>,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Result<axum::response::Response, ApiError> {
    let (client, request) = granted(caller, request, None).await?;
    let body = json_bytes(request, &state).await?;
    // A small body is read where it is (a few operations take microseconds); a large one off
    // the threads that serve connections.
    let items = if body.len() <= INLINE_BATCH_BODY {
        batch_items(&body)?
    } else {
        let read = body.clone();
        tokio::task::spawn_blocking(move || batch_items(&read))
            .await
            .map_err(|e| ApiError::internal(format!("the batch was not read: {e}")))??
    };
    // Each operation checked as its own request; those refused are answered at once.
    let mut results: Vec<Option<ItemReply>> =
        std::iter::repeat_with(|| None).take(items.len()).collect();
    let mut ready = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let checked = item.and_then(|item| {
            let placement = authorize(&state, &client, item.action.operation(), &item.key)?
                .for_body(item.at.len());
            // A run holds many uses: a device's are never run where the batch was read.
            let placement = Placement {
                device_use: false,
                ..placement
            };
            Ok((i, item, placement))
        });
        match checked {
            Ok(ready_item) => ready.push(ready_item),
            Err(e) => results[i] = Some(ItemReply::Failed(item_error(&e))),
        }
    }
    // Then run, a run of consecutive operations on one backend at a time, each run behind its
    // backend's gate alone. A run of quick operations (at most QUICK_RUN) runs where a worker
    // takes it, from memory only, one after the other, until one would have to wait: that one
    // and the rest of the run go on to the pool. Other runs go to one thread of the blocking
    // pool. Runs of uses are tasks of their own, taken by whichever worker is free, so that one
    // batch may use every CPU, as far as its client's turns allow; an operation that changes its
    // key (rotate, state, destroy, policy) waits for those before it to end and runs alone,
    // before any after it.
    let mut ready = ready.into_iter().peekable();
    let mut running = tokio::task::JoinSet::new();
    // The request's own turn runs one run at a time; each other run at once holds a turn of
    // the client's to spare (`max_concurrent`), or waits for a run to end.
    let mut own_turn_free = true;
    while let Some(first) = ready.next() {
        let placement = first.2.clone();
        let alone = first.1.action.changes_key();
        let mut group = vec![first];
        let full = |len: usize| alone || (placement.quick && len >= QUICK_RUN);
        while let Some(next) = ready.next_if(|next| {
            !full(group.len()) && !next.1.action.changes_key() && next.2 == placement
        }) {
            group.push(next);
        }
        if alone {
            while let Some(answered) = running.join_next().await {
                answer(&mut results, joined(answered)?.0);
            }
            own_turn_free = true;
            let run = run_group(
                state.clone(),
                client.clone(),
                body.clone(),
                placement,
                group,
            );
            answer(&mut results, run.await?);
            continue;
        }
        let (caller, own) = loop {
            if own_turn_free {
                own_turn_free = false;
                break (client.clone(), true);
            }
            if let Some(spare) = client.spare_turn() {
                break (spare, false);
            }
            // Every turn this batch may hold is in use: the next run waits for one to end.
            match running.join_next().await {
                Some(ended) => {
                    let (answered, own) = joined(ended)?;
                    own_turn_free |= own;
                    answer(&mut results, answered);
                }
                None => own_turn_free = true,
            }
        };
        let run = run_group(state.clone(), caller, body.clone(), placement, group);
        running.spawn(async move { run.await.map(|answered| (answered, own)) });
    }
    while let Some(answered) = running.join_next().await {
        answer(&mut results, joined(answered)?.0);
    }
    Ok(crate::service::api::json_response(written(&results)?))
}

/// Each operation's outcome, by its place in the batch.
type Answered = Vec<(usize, Result<Reply, ApiError>)>;

/// Runs `group`, operations of `body` on one backend with one placement, one after the other
/// ([`run_blocking`]): their outcomes.
async fn run_group(
    state: State,
    client: Caller,
    body: axum::body::Bytes,
    placement: Placement,
    group: Vec<(usize, Item, Placement)>,
) -> Result<Answered, ApiError> {
    let (metrics, who, asker) = (
        Arc::clone(&state.metrics),
        client.name_arc(),
        client.client(),
    );
    let label = placement
        .backend
        .clone()
        .unwrap_or_else(|| Arc::clone(&state.no_backend));
    // What is done survives an attempt here that stopped, for the pool to go on from.
    let (mut done, mut next) = (Vec::with_capacity(group.len()), 0);
    run_blocking(&state, &client, placement, move |ks| {
        while let Some((i, item, _)) = group.get(next) {
            let started = Instant::now();
            let fields = &body[item.at.clone()];
            let outcome = item.action.run(ks, &asker, &item.key, Input::Item(fields));
            if crate::keystore::would_wait() {
                // Not done: this one again, and those after it, on the pool.
                return Vec::new();
            }
            let code = outcome.as_ref().map_or_else(ApiError::code, |_| "ok");
            metrics.record(item.action.name(), &label, &who, code, started.elapsed());
            done.push((*i, outcome));
            next += 1;
        }
        std::mem::take(&mut done)
    })
    .await
}

/// A run's outcomes and whether it held the request's own turn, or why its task did not end.
fn joined(
    ended: Result<Result<(Answered, bool), ApiError>, tokio::task::JoinError>,
) -> Result<(Answered, bool), ApiError> {
    ended.map_err(|e| ApiError::internal(format!("a run of the batch did not finish: {e}")))?
}

/// Puts `answered` in its places of `results`.
fn answer(results: &mut [Option<ItemReply>], answered: Answered) {
    for (i, outcome) in answered {
        results[i] = Some(match outcome {
            Ok(reply) => ItemReply::Done(reply),
            Err(e) => ItemReply::Failed(item_error(&e)),
        });
    }
}

/// What a batch answers for one operation: `{"status":200,"result":REPLY}`, or its failure
/// ([`item_error`]).
pub(super) enum ItemReply {
    Done(Reply),
    Failed(Value),
}

/// A batch's answer: `{"results":[…]}`, one per operation, in order.
fn written(results: &[Option<ItemReply>]) -> Result<Vec<u8>, ApiError> {
    let unwritten =
        |e: serde_json::Error| ApiError::internal(format!("an answer not written: {e}"));
    let mut out = Vec::with_capacity(results.len().saturating_mul(160).saturating_add(16));
    out.extend_from_slice(br#"{"results":["#);
    for (i, result) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match result {
            Some(ItemReply::Done(reply)) => {
                out.extend_from_slice(br#"{"result":"#);
                reply.write_json(&mut out)?;
                out.extend_from_slice(br#","status":200}"#);
            }
            Some(ItemReply::Failed(value)) => {
                serde_json::to_writer(&mut out, value).map_err(unwritten)?;
            }
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// An operation of a batch: its action, its key, and where its JSON is in the body.
struct Item {
    action: Action,
    key: String,
    at: std::ops::Range<usize>,
}

/// The operations of a batch's body, each as an [`Item`] or why it cannot be run; more than
/// [`MAX_BATCH`] is refused while reading, before the rest is.
fn batch_items(body: &[u8]) -> Result<Vec<Result<Item, ApiError>>, ApiError> {
    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde_json::value::RawValue;

    /// The operations, each its JSON text in the body, at most [`MAX_BATCH`].
    struct Operations<'a>(Vec<&'a RawValue>);

    impl<'de: 'a, 'a> Deserialize<'de> for Operations<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Each<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for Each<'a> {
                type Value = Operations<'a>;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    write!(f, "a list of at most {MAX_BATCH} operations")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut all = Vec::new();
                    while let Some(op) = seq.next_element::<&'a RawValue>()? {
                        if all.len() == MAX_BATCH {
                            return Err(A::Error::custom(format!(
                                "a batch holds at most {MAX_BATCH} operations"
                            )));
                        }
                        all.push(op);
                    }
                    Ok(Operations(all))
                }
            }
            d.deserialize_seq(Each(std::marker::PhantomData))
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch<'a> {
        #[serde(borrow)]
        operations: Operations<'a>,
    }

    /// An operation's `op` and `key`; its other fields are skipped, not read.
    #[derive(Deserialize)]
    struct Head {
        op: Option<String>,
        key: Option<String>,
    }

    // An empty body is `{}`, as a key action's: it lacks `operations`.
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let batch: Batch<'_> = serde_json::from_slice(body).map_err(|e| ApiError::body(&e))?;
    let base = body.as_ptr() as usize;
    Ok(batch
        .operations
        .0
        .into_iter()
        .map(|raw| {
            let text = raw.get();
            // The operation's text is a slice of the body: its place in it.
            let start = (text.as_ptr() as usize).saturating_sub(base);
            let head: Head = serde_json::from_str(text).map_err(|e| ApiError::body(&e))?;
            // As a request's body without a required field: JSON of the wrong shape.
            let need = |field: Option<String>, name: &str| {
                field.ok_or_else(|| {
                    ApiError::unprocessable(format!(
                        "each operation of a batch needs `{name}`, a string"
                    ))
                })
            };
            let action = Action::parse(&need(head.op, "op")?)?;
            Ok(Item {
                action,
                key: need(head.key, "key")?,
                at: start..start + text.len(),
            })
        })
        .collect())
}

/// A batch item's failure: `{"status":N,"error":{…}}`.
fn item_error(e: &ApiError) -> Value {
    let mut value = e.to_json();
    value["status"] = json!(e.status().as_u16());
    value
}
