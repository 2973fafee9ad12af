//! A client of `keyhold serve`: [`RemoteKeystore`] does what a [`Keystore`](crate::Keystore)
//! does ([`KeyService`]) by asking the service, so an application holds key IDs and, at most, a
//! credential; never a key, a PIN or the root secret.
//!
//! Blocking, like the keystore: each call is one HTTP/1.1 request on a kept-alive connection
//! (one per concurrent caller, reused), written and read on the caller's own thread with
//! blocking socket calls: no runtime, and no thread is woken to carry a request or its answer.
//! The service's refusals come back as [`Error::Remote`], whose kind is the service's error kind
//! (so the command line exits as it would have on the store itself).

use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use hyper::Method;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::api::B64;
use crate::backend::KeyOptions;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyState, KeyType, SignatureFormat};
use crate::keystore::{
    check_not_oversized, ExportTo, KeyEvent, KeyInfo, KeyRequest, KeyService, PolicyChange,
    Transition, UseOptions, Used, MAX_ENVELOPE, MAX_INPUT,
};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;
use crate::time::format_utc;

mod admin;
mod conn;
mod remote;

use conn::Conn;
pub use remote::Remote;

/// The keys of a `keyhold serve`, used through it.
pub struct RemoteKeystore {
    remote: Remote,
    /// `Authorization: Bearer TOKEN`, sent with every request if there is a token (else the
    /// service knows the caller by its peer credentials or certificate): made once; `Err` for a
    /// token a header cannot carry, said at the first call.
    bearer: Option<std::result::Result<Zeroizing<String>, ()>>,
    /// The TLS an https remote is reached with.
    tls: Option<super::tls::ClientTls>,
    /// Connections not in use, kept alive for the next call.
    idle: Mutex<Vec<Conn>>,
    /// How long a call may take, from sending to the whole answer.
    timeout: std::time::Duration,
    /// The lookup of an https remote's host name under way, shared by the calls that need it.
    lookups: conn::Lookups,
}

impl std::fmt::Debug for RemoteKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeystore")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The connections kept for reuse at most.
const MAX_IDLE: usize = 16;

/// How long a call may take unless [`RemoteKeystore::with_timeout`] says otherwise: above the
/// service's own body and drain timeouts, so that it is the service that says why.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl RemoteKeystore {
    /// A client of the service at `remote`. Nothing is sent until the first call.
    ///
    /// # Errors
    /// None: a client that cannot reach its service says so at its first call.
    pub fn new(remote: Remote) -> Result<Self> {
        Ok(Self {
            remote,
            bearer: None,
            tls: None,
            idle: Mutex::new(Vec::new()),
            timeout: DEFAULT_TIMEOUT,
            lookups: conn::Lookups::new(),
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every request (`keyhold client add` made
    /// it).
    #[must_use]
    pub fn with_token(mut self, token: SecretString) -> Self {
        let value = Zeroizing::new(format!("Bearer {}", token.expose_secret()));
        // What a header's value may hold (RFC 9110 §5.5): visible ASCII, spaces and tabs; no
        // line break that would end it and start another.
        let carried = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        self.bearer = Some(if carried { Ok(value) } else { Err(()) });
        self
    }

    /// Reaches an https remote with `tls`: the CA its certificate is verified against, and this
    /// client's certificate if any (an https remote without it is refused at the first call).
    #[must_use]
    pub fn with_tls(mut self, tls: super::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Gives up a call that takes longer than `timeout` ([`Error::Timeout`]); the service may
    /// still carry it out.
    #[must_use]
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the service is.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// Asks `GET /v1/health`: the client name the service knows this caller by.
    ///
    /// # Errors
    /// As every call: the service unreachable ([`Error::Io`]) or refusing ([`Error::Remote`]).
    pub fn health(&self) -> Result<String> {
        let answer = self.call(Method::GET, "/v1/health", None)?;
        Ok(text(&answer, "client")?.to_owned())
    }

    /// `METHOD path` with `body`: the JSON answer, or the service's error.
    fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let answer = self.ask(method, path, body)?;
        if answer.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer).map_err(|e| self.not_json(e))
    }

    /// `METHOD path` with `body`: the answer's bytes (zeroized when dropped, as they may hold a
    /// plaintext) if the service did it, else the service's error.
    fn ask<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let request = self.request(&method, path, body)?;
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut conn = reused.unwrap_or_else(Conn::new);
        let exchanged = self.exchange_on(&mut conn, &request);
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        let (status, answer) = exchanged?;
        if status >= 400 {
            let value: Value = if answer.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&answer).map_err(|e| {
                    Error::InvalidInput(format!(
                        "the service at {} answered {status} with something that is not JSON: {e}",
                        self.remote
                    ))
                })?
            };
            let code = value["error"]["code"].as_str().unwrap_or("remote");
            let message = value["error"]["message"]
                .as_str()
                .map_or_else(|| format!("the service answered {status}"), str::to_owned);
            return Err(Error::remote(code, status, message));
        }
        Ok(answer)
    }

    fn not_json(&self, e: serde_json::Error) -> Error {
        Error::InvalidInput(format!(
            "the service at {} answered with something that is not JSON: {e}",
            self.remote
        ))
    }

    /// The bytes of `METHOD path` with `body` as JSON, zeroized once sent: the body, which may
    /// hold a plaintext, is written once, into a buffer made its exact size (a buffer that grew
    /// would leave copies of the body, or the token, in the memory it gave back).
    fn request<B: Serialize + ?Sized>(
        &self,
        method: &Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        // Paths are made here, from checked IDs and encoded queries: never a byte that would
        // end the request line.
        if !path.starts_with('/') || !path.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
            return Err(Error::InvalidInput(format!(
                "`{path}` is not a path a request can carry"
            )));
        }
        let unwritable =
            |e: serde_json::Error| Error::InvalidInput(format!("a request's JSON: {e}"));
        // The body's length, counted without writing it anywhere.
        let body_len = match body {
            Some(body) => {
                let mut counted = Counted(0);
                serde_json::to_writer(&mut counted, body).map_err(unwritable)?;
                counted.0
            }
            None => 0,
        };
        // The inputs are checked against their limits; this catches the rest (a large `aad`)
        // before it is uploaded to be refused.
        if body_len > super::MAX_BODY {
            return Err(Error::InvalidInput(format!(
                "the request would be {body_len} bytes of JSON, more than keyhold serve reads \
                 ({} bytes: a 64 MiB input in base64 and 64 KiB more): nothing was sent",
                super::MAX_BODY
            )));
        }
        let head =
            format!("{method} {path} HTTP/1.1\r\nHost: keyhold\r\nContent-Length: {body_len}\r\n");
        const JSON: &[u8] = b"Content-Type: application/json\r\n";
        let bearer_len = self
            .bearer
            .as_ref()
            .and_then(|b| b.as_ref().ok())
            .map_or(0, |b| b"Authorization: \r\n".len() + b.len());
        let json_len = if body.is_some() { JSON.len() } else { 0 };
        let size = head.len() + json_len + bearer_len + 2 + body_len;
        let mut request = Zeroizing::new(Vec::with_capacity(size));
        request.extend_from_slice(head.as_bytes());
        if body.is_some() {
            request.extend_from_slice(JSON);
        }
        if let Some(bearer) = &self.bearer {
            let value = bearer.as_ref().map_err(|()| {
                Error::InvalidInput("the bearer token has characters a header cannot carry".into())
            })?;
            request.extend_from_slice(b"Authorization: ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            serde_json::to_writer(&mut *request, body).map_err(unwritable)?;
        }
        // Serializing is deterministic: the second writing is the length the first counted.
        if request.len() != size {
            return Err(Error::InvalidInput(
                "a request's JSON changed between its counting and its writing".into(),
            ));
        }
        Ok(request)
    }

    /// `POST /v1/keys/{id}/{action}` with `body`.
    fn act<B: Serialize + ?Sized>(&self, id: &str, action: &str, body: &B) -> Result<Value> {
        let answer = self.act_bytes(id, action, body)?;
        serde_json::from_slice(&answer).map_err(|e| self.not_json(e))
    }

    /// [`Self::act`]'s answer as bytes, for an answer read straight from them (a use's).
    fn act_bytes<B: Serialize + ?Sized>(
        &self,
        id: &str,
        action: &str,
        body: &B,
    ) -> Result<Zeroizing<Vec<u8>>> {
        check_id(id)?;
        self.ask(Method::POST, &format!("/v1/keys/{id}/{action}"), Some(body))
    }

    /// A use's answer (to `POST /v1/keys/{id}/{action}` with `body`): its output in `field`
    /// (base64), version and state, read straight from the answer's bytes.
    fn used<B: Serialize + ?Sized>(
        &self,
        id: &str,
        action: &str,
        body: &B,
        field: &str,
    ) -> Result<Used<Vec<u8>>> {
        let bytes = self.act_bytes(id, action, body)?;
        // An answer that is not JSON says so, naming the service; JSON of another shape is an
        // answer without a valid `field`.
        let mut answer: SecretAnswer = serde_json::from_slice(&bytes).map_err(|e| {
            if e.is_data() {
                malformed(field)
            } else {
                self.not_json(e)
            }
        })?;
        let (version, state) = answer.use_of()?;
        let output = match field {
            "signature" => answer.signature.take(),
            "envelope" => answer.envelope.take(),
            "mac" => answer.mac.take(),
            _ => None,
        };
        // Not a secret: moved out of its zeroizing buffer, which is left empty.
        let output = std::mem::take(&mut *SecretAnswer::secret(output, field)?);
        Ok(Used {
            output,
            version,
            state,
        })
    }

    /// A check's answer: `valid` true is its version and state; false is `what` failing.
    fn checked(answer: &Value, what: &'static str) -> Result<Used<()>> {
        if answer["valid"] == Value::Bool(true) {
            let (version, state) = use_of(answer)?;
            Ok(Used {
                output: (),
                version,
                state,
            })
        } else {
            Err(Error::VerificationFailed { what })
        }
    }

    fn keys(&self, namespace: Option<&str>, all: bool) -> Result<Vec<KeyInfo>> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(ns) = namespace {
            query.push(("namespace", ns));
        }
        if all {
            query.push(("all", "true"));
        }
        let answer = self.call(Method::GET, &with_query("/v1/keys", &query)?, None)?;
        key_list(&answer)
    }
}

/// Refuses, before anything is sent, an ID that could not be one (it would change the path).
fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::KeyIdAuthentication {
            reason: "not a key ID's characters",
        });
    }
    Ok(())
}

fn with_query(path: &str, query: &[(&str, &str)]) -> Result<String> {
    if query.is_empty() {
        return Ok(path.to_owned());
    }
    let encoded = serde_urlencoded::to_string(query)
        .map_err(|e| Error::InvalidInput(format!("a query: {e}")))?;
    Ok(format!("{path}?{encoded}"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 of `bytes` that may be secret (a plaintext, data to sign or MAC), zeroized when
/// dropped. base64's `encode` writes straight into a buffer of the exact size, which becomes the
/// string: no larger one leaves a copy behind as it grows, and no buffer between holds a part of
/// it (`encode_string`, by contrast, encodes through one on the stack, left as it was).
fn secret_b64(bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(b64(bytes))
}

/// Counts what a serializer writes, and keeps none of it.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A use's answer: its output (a secret in `plaintext` (decrypt) or `data` (random)), its
/// version and state (where it has them), read straight from the answer's bytes, never into a
/// JSON value whose strings would be freed without being zeroized. Other fields are not read.
/// Its base64 is the service's own `B64`, decoded as read: zeroized when dropped.
#[derive(Deserialize)]
struct SecretAnswer {
    plaintext: Option<B64>,
    data: Option<B64>,
    signature: Option<B64>,
    envelope: Option<B64>,
    mac: Option<B64>,
    version: Option<u32>,
    state: Option<String>,
}

impl SecretAnswer {
    /// The answer, or a malformed one naming `field`, the secret it was to hold.
    fn read(answer: &[u8], field: &str) -> Result<Self> {
        serde_json::from_slice(answer).map_err(|_| malformed(field))
    }

    /// The bytes of `secret`, the answer's `field`, or a malformed answer naming it.
    fn secret(secret: Option<B64>, field: &str) -> Result<Zeroizing<Vec<u8>>> {
        secret
            .ok_or_else(|| malformed(field))?
            .decode(field)
            .map_err(|_| malformed(field))
    }

    fn use_of(&self) -> Result<(u32, KeyState)> {
        let version = self.version.ok_or_else(|| malformed("version"))?;
        let state = self
            .state
            .as_deref()
            .ok_or_else(|| malformed("state"))?
            .parse()?;
        Ok((version, state))
    }
}

/// The service answered something other than its documented answer.
fn malformed(what: &str) -> Error {
    Error::InvalidInput(format!(
        "the service's answer has no valid `{what}`: is it a keyhold serve of this version?"
    ))
}

fn text<'a>(answer: &'a Value, field: &str) -> Result<&'a str> {
    answer[field].as_str().ok_or_else(|| malformed(field))
}

fn unb64(answer: &Value, field: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text(answer, field)?)
        .map_err(|_| malformed(field))
}

fn use_of(answer: &Value) -> Result<(u32, KeyState)> {
    let version = answer["version"]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| malformed("version"))?;
    let state = text(answer, "state")?.parse()?;
    Ok((version, state))
}

fn key_list(answer: &Value) -> Result<Vec<KeyInfo>> {
    answer
        .as_array()
        .ok_or_else(|| malformed("keys"))?
        .iter()
        .map(KeyInfo::from_json)
        .collect()
}

/// `{"reason"}`, or `{}`.
fn reason(reason: Option<&str>) -> Value {
    match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    }
}

fn format_name(format: SignatureFormat) -> &'static str {
    match format {
        SignatureFormat::Der => "der",
        SignatureFormat::Raw => "raw",
    }
}

impl KeyService for RemoteKeystore {
    fn create_key_with(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        let spec = request.spec;
        let mut body = json!({
            "namespace": request.namespace,
            "name": request.name,
            "type": spec.key_type().as_str(),
            "purpose": spec.purpose().as_str(),
            "extractable": options.extractable,
        });
        let mut set = |field: &str, value: Option<String>| {
            if let Some(value) = value {
                body[field] = Value::String(value);
            }
        };
        set("backend", request.backend.clone());
        set("padding", padding_name(spec.algorithm()).map(str::to_owned));
        let schedule = Schedule::of(options);
        set("rotate_after", schedule.rotate_after);
        set("activate_at", schedule.activate_at);
        set("deactivate_at", schedule.deactivate_at);
        KeyInfo::from_json(&self.call(Method::POST, "/v1/keys", Some(&body))?)
    }

    fn key_info(&self, id: &str) -> Result<KeyInfo> {
        check_id(id)?;
        KeyInfo::from_json(&self.call(Method::GET, &format!("/v1/keys/{id}"), None)?)
    }

    fn key_info_by_name(&self, namespace: &str, name: &str) -> Result<Option<KeyInfo>> {
        let path = with_query("/v1/keys", &[("namespace", namespace), ("name", name)])?;
        Ok(key_list(&self.call(Method::GET, &path, None)?)?
            .into_iter()
            .next())
    }

    fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.keys(namespace, false)
    }

    fn list_all_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.keys(namespace, true)
    }

    fn public_key_version(&self, id: &str, version: Option<u32>) -> Result<PublicKey> {
        check_id(id)?;
        let version = version.map(|v| v.to_string());
        let query: Vec<(&str, &str)> = version.iter().map(|v| ("version", v.as_str())).collect();
        let path = with_query(&format!("/v1/keys/{id}/public"), &query)?;
        let answer = self.call(Method::GET, &path, None)?;
        let key_type: KeyType = text(&answer, "type")?.parse()?;
        let algorithm: Algorithm = text(&answer, "algorithm")?.parse()?;
        Ok(PublicKey::from_spki_der(
            key_type,
            algorithm,
            unb64(&answer, "der")?,
        ))
    }

    fn sign_with(
        &self,
        id: &str,
        message: &[u8],
        format: SignatureFormat,
        _options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        check_not_oversized(message.len(), MAX_INPUT)?;
        let data = secret_b64(message);
        let body = SignBody {
            data: &data,
            format: format_name(format),
        };
        self.used(id, "sign", &body, "signature")
    }

    fn verify_with(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<()>> {
        check_not_oversized(message.len(), MAX_INPUT)?;
        let data = secret_b64(message);
        let body = VerifyBody {
            data: &data,
            signature: &b64(signature),
            format: format_name(format),
            version: options.version,
            allow_compromised: options.allow_compromised,
        };
        Self::checked(&self.act(id, "verify", &body)?, "signature")
    }

    fn encrypt_with(
        &self,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
        _options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        check_not_oversized(plaintext.len(), MAX_INPUT)?;
        let plaintext = secret_b64(plaintext);
        let body = EncryptBody {
            plaintext: &plaintext,
            aad: &b64(aad),
        };
        self.used(id, "encrypt", &body, "envelope")
    }

    fn decrypt_with(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<SecretBytes>> {
        check_not_oversized(input.len(), MAX_ENVELOPE)?;
        let body = json!({
            "envelope": b64(input),
            "aad": b64(aad),
            "allow_compromised": options.allow_compromised,
        });
        let answer = SecretAnswer::read(&self.act_bytes(id, "decrypt", &body)?, "plaintext")?;
        let (version, state) = answer.use_of()?;
        let plaintext = SecretAnswer::secret(answer.plaintext, "plaintext")?;
        Ok(Used {
            output: SecretBytes::from_zeroizing(plaintext),
            version,
            state,
        })
    }

    fn rewrap(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        check_not_oversized(input.len(), MAX_ENVELOPE)?;
        let body = json!({
            "envelope": b64(input),
            "aad": b64(aad),
            "allow_compromised": options.allow_compromised,
        });
        self.used(id, "rewrap", &body, "envelope")
    }

    fn mac_with(&self, id: &str, data: &[u8], _options: &UseOptions) -> Result<Used<Vec<u8>>> {
        check_not_oversized(data.len(), MAX_INPUT)?;
        let data = secret_b64(data);
        self.used(id, "mac", &MacBody { data: &data }, "mac")
    }

    fn verify_mac_with(
        &self,
        id: &str,
        data: &[u8],
        tag: &[u8],
        options: &UseOptions,
    ) -> Result<Used<()>> {
        check_not_oversized(data.len(), MAX_INPUT)?;
        let data = secret_b64(data);
        let body = MacVerifyBody {
            data: &data,
            mac: &b64(tag),
            version: options.version,
            allow_compromised: options.allow_compromised,
        };
        Self::checked(&self.act(id, "mac-verify", &body)?, "tag")
    }

    fn rotate_key(&self, id: &str, why: Option<&str>) -> Result<KeyInfo> {
        KeyInfo::from_json(&self.act(id, "rotate", &reason(why))?)
    }

    fn change_state(&self, id: &str, transition: Transition, why: Option<&str>) -> Result<KeyInfo> {
        let action = match transition {
            Transition::Suspend => "suspend",
            Transition::Resume => "resume",
            Transition::Deactivate => "deactivate",
            Transition::Compromise => "compromise",
        };
        KeyInfo::from_json(&self.act(id, action, &reason(why))?)
    }

    fn schedule_destroy(&self, id: &str, at: i64, why: Option<&str>) -> Result<KeyInfo> {
        let mut body = reason(why);
        body["at"] = json!(at);
        KeyInfo::from_json(&self.act(id, "destroy", &body)?)
    }

    fn cancel_destroy(&self, id: &str, why: Option<&str>) -> Result<KeyInfo> {
        KeyInfo::from_json(&self.act(id, "cancel-destroy", &reason(why))?)
    }

    fn set_policy(&self, id: &str, policy: &PolicyChange, why: Option<&str>) -> Result<KeyInfo> {
        let mut body = reason(why);
        if let Some(after) = policy.rotate_after {
            body["rotate_after"] =
                json!(after.map_or("never".to_owned(), |d| format!("{}s", d.as_secs())));
        }
        if let Some(at) = policy.activate_at {
            body["activate_at"] = json!(at.map_or("now".to_owned(), format_utc));
        }
        if let Some(at) = policy.deactivate_at {
            body["deactivate_at"] = json!(at.map_or("never".to_owned(), format_utc));
        }
        if let Some(min) = policy.min_decrypt_version {
            body["min_decrypt_version"] = json!(min);
        }
        KeyInfo::from_json(&self.act(id, "policy", &body)?)
    }

    fn history(&self, id: &str) -> Result<Vec<KeyEvent>> {
        check_id(id)?;
        let answer = self.call(Method::GET, &format!("/v1/keys/{id}/history"), None)?;
        answer
            .as_array()
            .ok_or_else(|| malformed("history"))?
            .iter()
            .map(KeyEvent::from_json)
            .collect()
    }

    fn export_key(&self, id: &str, to: ExportTo<'_>) -> Result<Vec<u8>> {
        let body = match to {
            ExportTo::Key(kek) => {
                check_id(kek)?;
                json!({ "wrap_with": kek })
            }
            ExportTo::Public(public) => json!({ "to_public": b64(public) }),
            ExportTo::Trusted(label) => json!({ "wrap_with_trusted": label }),
        };
        unb64(&self.act(id, "export", &body)?, "wrapped")
    }

    fn import_key(
        &self,
        request: &KeyRequest,
        input: &[u8],
        unwrap_with: Option<&str>,
        options: &KeyOptions,
    ) -> Result<KeyInfo> {
        if let Some(id) = unwrap_with {
            check_id(id)?;
        }
        check_not_oversized(input.len(), MAX_INPUT)?;
        let key = secret_b64(input);
        let spec = request.spec;
        let body = ImportBody {
            namespace: &request.namespace,
            name: &request.name,
            key_type: spec.key_type().as_str(),
            purpose: spec.purpose().as_str(),
            backend: request.backend.as_deref(),
            padding: padding_name(spec.algorithm()),
            schedule: Schedule::of(options),
            extractable: options.extractable,
            key: &key,
            unwrap_with,
        };
        KeyInfo::from_json(
            &serde_json::from_slice(&self.ask(Method::POST, "/v1/keys/import", Some(&body))?)
                .map_err(|e| self.not_json(e))?,
        )
    }

    fn sealer_kind(&self) -> Result<String> {
        let answer = self.call(Method::GET, "/v1/health", None)?;
        Ok(text(&answer, "sealer")?.to_owned())
    }

    fn random(&self, n: usize) -> Result<Vec<u8>> {
        let answer = self.ask(Method::POST, "/v1/random", Some(&json!({ "bytes": n })))?;
        let data = SecretAnswer::secret(SecretAnswer::read(&answer, "data")?.data, "data")?;
        // The caller's own, as the keystore's `random` gives it.
        Ok(data.to_vec())
    }
}

/// The `padding` of a key's creation or import, for an RSA signing key.
fn padding_name(algorithm: Algorithm) -> Option<&'static str> {
    match algorithm {
        Algorithm::RsaPkcs1Sha256 => Some("pkcs1v15"),
        Algorithm::RsaPssSha256 => Some("pss"),
        _ => None,
    }
}

/// A key's schedule as its creation or import says it: `rotate_after` in seconds, the times in
/// RFC 3339 UTC.
#[derive(Serialize)]
struct Schedule {
    #[serde(skip_serializing_if = "Option::is_none")]
    rotate_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activate_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deactivate_at: Option<String>,
}

impl Schedule {
    fn of(options: &KeyOptions) -> Self {
        Self {
            rotate_after: options.rotate_after.map(|d| format!("{}s", d.as_secs())),
            activate_at: options.activate_at.map(format_utc),
            deactivate_at: options.deactivate_at.map(format_utc),
        }
    }
}

/// `POST /v1/keys/import`'s body; `key` is the key file in base64, zeroized by its owner.
#[derive(Serialize)]
struct ImportBody<'a> {
    namespace: &'a str,
    name: &'a str,
    #[serde(rename = "type")]
    key_type: &'static str,
    purpose: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    padding: Option<&'static str>,
    #[serde(flatten)]
    schedule: Schedule,
    extractable: bool,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unwrap_with: Option<&'a str>,
}

/// `sign`'s body; `data` is the message in base64, zeroized by its owner.
#[derive(Serialize)]
struct SignBody<'a> {
    data: &'a str,
    format: &'static str,
}

/// `verify`'s body.
#[derive(Serialize)]
struct VerifyBody<'a> {
    data: &'a str,
    signature: &'a str,
    format: &'static str,
    version: Option<u32>,
    allow_compromised: bool,
}

/// `encrypt`'s body.
#[derive(Serialize)]
struct EncryptBody<'a> {
    plaintext: &'a str,
    aad: &'a str,
}

/// `mac`'s body.
#[derive(Serialize)]
struct MacBody<'a> {
    data: &'a str,
}

/// `mac-verify`'s body.
#[derive(Serialize)]
struct MacVerifyBody<'a> {
    data: &'a str,
    mac: &'a str,
    version: Option<u32>,
    allow_compromised: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn client() -> RemoteKeystore {
        RemoteKeystore::new(Remote::Unix("/nonexistent/keyhold.sock".into()))
            .unwrap()
            .with_token(SecretString::from("kh_token_123"))
    }

    /// A request carrying a plaintext is written once, into a buffer of its exact size (no
    /// growth leaves a copy behind), and its body is the JSON the service reads.
    #[test]
    fn a_request_is_made_at_its_exact_size_with_the_json_of_its_body() {
        let plaintext = secret_b64(b"attack at dawn");
        assert_eq!(plaintext.len(), plaintext.capacity());
        let body = EncryptBody {
            plaintext: &plaintext,
            aad: &b64(b"aad"),
        };
        let request = client()
            .request(&Method::POST, "/v1/keys/kh1_x/encrypt", Some(&body))
            .unwrap();
        assert_eq!(request.len(), request.capacity());
        let text = std::str::from_utf8(&request).unwrap();
        let (head, json) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            format!(
                "POST /v1/keys/kh1_x/encrypt HTTP/1.1\r\nHost: keyhold\r\nContent-Length: {}\r\n\
                 Content-Type: application/json\r\nAuthorization: Bearer kh_token_123",
                json.len()
            )
        );
        let read: Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            read,
            json!({ "plaintext": b64(b"attack at dawn"), "aad": b64(b"aad") })
        );
        // Without a body: no JSON header, nothing after the head.
        let bare = client()
            .request::<Value>(&Method::GET, "/v1/health", None)
            .unwrap();
        assert_eq!(bare.len(), bare.capacity());
        assert!(bare.ends_with(b"Content-Length: 0\r\nAuthorization: Bearer kh_token_123\r\n\r\n"));
    }

    /// An answer holding a plaintext is read without a JSON value; what it lacks is said.
    #[test]
    fn an_answer_with_a_plaintext_is_read_field_by_field() {
        let answer = SecretAnswer::read(
            br#"{"compromised":false,"plaintext":"aGVsbG8=","state":"active","version":2}"#,
            "plaintext",
        )
        .unwrap();
        assert_eq!(answer.use_of().unwrap(), (2, KeyState::Active));
        assert_eq!(
            &SecretAnswer::secret(answer.plaintext, "plaintext").unwrap()[..],
            b"hello"
        );
        for (bad, field) in [
            (
                &br#"{"plaintext":"aGVsbG8=","state":"active"}"#[..],
                "version",
            ),
            (br#"{"plaintext":"aGVsbG8=","version":2}"#, "state"),
            (
                br#"{"plaintext":"not base64!","version":2,"state":"active"}"#,
                "plaintext",
            ),
            (br#"{"plaintext":7}"#, "plaintext"),
        ] {
            let refused = SecretAnswer::read(bad, "plaintext").and_then(|a| {
                a.use_of()?;
                SecretAnswer::secret(a.plaintext, "plaintext")
            });
            let e = refused.unwrap_err().to_string();
            assert!(e.contains(&format!("no valid `{field}`")), "{e}");
        }
    }
}
