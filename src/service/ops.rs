//! What a client asks of one key (`POST /v1/keys/{id}/ACTION`, or an item of `/v1/batch`): each
//! action's body, the operation a client must be granted for it, and running it on the keystore.
//!
//! Everything here is synchronous and runs where the service places the call (`routes::Placement`:
//! a quick use of a software key where its request was read, anything else on the blocking pool):
//! reading the JSON body and decoding its base64 (in one step), the keystore call. The answer
//! ([`Reply`]) is written where it is sent from, its base64 encoded straight into the answer.
//! Decoded inputs, decrypted plaintexts and data keys are held in zeroizing buffers; the HTTP
//! layer's buffers are not zeroized (docs/service.md, What stays in memory).

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::api::{push_b64, ApiError, B64};
use super::auth::Client;
use crate::config::Operation;
use crate::key::KeyState;
use crate::keystore::{ExportTo, Keystore, PolicyText, Transition, UseOptions, Used};
use crate::secret::SecretBytes;
use crate::SignatureFormat;

/// How long `destroy` waits unless told (as `keyhold key destroy`).
const DEFAULT_DESTROY_AFTER: &str = "7d";

/// An action on a key, by the last segment of its path (or a batch item's `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Sign,
    Verify,
    Encrypt,
    Decrypt,
    Rewrap,
    Mac,
    MacVerify,
    Datakey,
    DatakeyWrapped,
    Export,
    Rotate,
    State(Transition),
    Destroy,
    CancelDestroy,
    Policy,
}

impl Action {
    /// Every action, for the names.
    const ALL: [Action; 18] = [
        Self::Sign,
        Self::Verify,
        Self::Encrypt,
        Self::Decrypt,
        Self::Rewrap,
        Self::Mac,
        Self::MacVerify,
        Self::Datakey,
        Self::DatakeyWrapped,
        Self::Export,
        Self::Rotate,
        Self::State(Transition::Suspend),
        Self::State(Transition::Resume),
        Self::State(Transition::Deactivate),
        Self::State(Transition::Compromise),
        Self::Destroy,
        Self::CancelDestroy,
        Self::Policy,
    ];

    /// The action called `name`, or 404 naming those there are.
    pub fn parse(name: &str) -> Result<Self, ApiError> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                ApiError::no_endpoint(format!(
                    "no key action `{name}`: the actions are {}",
                    names.join(", ")
                ))
            })
    }

    /// Its name in paths and batches.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Rewrap => "rewrap",
            Self::Mac => "mac",
            Self::MacVerify => "mac-verify",
            Self::Datakey => "datakey",
            Self::DatakeyWrapped => "datakey-wrapped",
            Self::Export => "export",
            Self::Rotate => "rotate",
            Self::State(Transition::Suspend) => "suspend",
            Self::State(Transition::Resume) => "resume",
            Self::State(Transition::Deactivate) => "deactivate",
            Self::State(Transition::Compromise) => "compromise",
            Self::Destroy => "destroy",
            Self::CancelDestroy => "cancel-destroy",
            Self::Policy => "policy",
        }
    }

    /// Whether it changes its key (its versions, state or schedule), rather than using it.
    pub fn changes_key(self) -> bool {
        match self {
            Self::Sign
            | Self::Verify
            | Self::Encrypt
            | Self::Decrypt
            | Self::Rewrap
            | Self::Mac
            | Self::MacVerify
            | Self::Datakey
            | Self::DatakeyWrapped
            | Self::Export => false,
            Self::Rotate | Self::State(_) | Self::Destroy | Self::CancelDestroy | Self::Policy => {
                true
            }
        }
    }

    /// What a client must be granted to ask for it.
    pub fn operation(self) -> Operation {
        match self {
            Self::Sign => Operation::Sign,
            Self::Verify => Operation::Verify,
            Self::Encrypt => Operation::Encrypt,
            Self::Decrypt => Operation::Decrypt,
            Self::Rewrap => Operation::Rewrap,
            Self::Mac => Operation::Mac,
            Self::MacVerify => Operation::MacVerify,
            Self::Datakey => Operation::Datakey,
            Self::DatakeyWrapped => Operation::DatakeyWrapped,
            Self::Export => Operation::Export,
            Self::Rotate => Operation::Rotate,
            Self::State(_) => Operation::State,
            Self::Destroy | Self::CancelDestroy => Operation::Destroy,
            Self::Policy => Operation::Policy,
        }
    }

    /// Runs the action of `client` on the key `id` with its JSON body `input`: the answer's
    /// JSON. The client is checked to see the key already; another key its body names (an
    /// export's wrapping key) is checked here.
    pub fn run(
        self,
        ks: &Keystore,
        client: &Client,
        id: &str,
        input: Input<'_>,
    ) -> Result<Reply, ApiError> {
        match self {
            Self::Sign => {
                let body: SignBody = input.parse()?;
                let format = signature_format(body.format.as_deref())?;
                let data = body.data.decode("data")?;
                let used = ks.sign_with(id, &data, format, &UseOptions::new())?;
                Ok(Reply::used(used, "signature", Output::Public))
            }
            Self::Verify => {
                let body: VerifyBody = input.parse()?;
                let format = signature_format(body.format.as_deref())?;
                let data = body.data.decode("data")?;
                let signature = body.signature.decode("signature")?;
                let options = process(body.version, body.allow_compromised);
                let checked = ks.verify_with(id, &data, &signature, format, &options);
                validity(checked)
            }
            Self::Encrypt => {
                let body: EncryptBody = input.parse()?;
                let plaintext = body.plaintext.decode("plaintext")?;
                let aad = body.aad.decode("aad")?;
                let used = ks.encrypt_with(id, &plaintext, &aad, &UseOptions::new())?;
                Ok(Reply::used(used, "envelope", Output::Public))
            }
            Self::Decrypt => {
                let body: EnvelopeBody = input.parse()?;
                let (envelope, aad) = (body.envelope.decode("envelope")?, body.aad.decode("aad")?);
                let used =
                    ks.decrypt_with(id, &envelope, &aad, &process(None, body.allow_compromised))?;
                Ok(Reply::used(used, "plaintext", Output::Secret))
            }
            Self::Rewrap => {
                let body: EnvelopeBody = input.parse()?;
                let (envelope, aad) = (body.envelope.decode("envelope")?, body.aad.decode("aad")?);
                let used =
                    ks.rewrap(id, &envelope, &aad, &process(None, body.allow_compromised))?;
                Ok(Reply::used(used, "envelope", Output::Public))
            }
            Self::Mac => {
                let body: MacBody = input.parse()?;
                let data = body.data.decode("data")?;
                let used = ks.mac_with(id, &data, &UseOptions::new())?;
                Ok(Reply::used(used, "mac", Output::Public))
            }
            Self::MacVerify => {
                let body: MacVerifyBody = input.parse()?;
                let (data, tag) = (body.data.decode("data")?, body.mac.decode("mac")?);
                let options = process(body.version, body.allow_compromised);
                validity(ks.verify_mac_with(id, &data, &tag, &options))
            }
            Self::Datakey | Self::DatakeyWrapped => {
                let body: DatakeyBody = input.parse()?;
                let aad = body.aad.decode("aad")?;
                let wrapped_only = self == Self::DatakeyWrapped;
                let used = ks.data_key_with(id, &aad, wrapped_only, &UseOptions::new())?;
                let (key, envelope) = used.output;
                Ok(Reply::Used {
                    field: "envelope",
                    output: Output::Public(envelope),
                    plaintext: (!wrapped_only).then_some(key),
                    version: used.version,
                    state: used.state,
                })
            }
            Self::Export => export(ks, client, id, input.parse()?),
            Self::Rotate => {
                let body: ReasonBody = input.parse()?;
                Ok(Reply::Changed(
                    ks.rotate_key(id, body.reason.as_deref())?.to_json(),
                ))
            }
            Self::State(transition) => {
                let body: ReasonBody = input.parse()?;
                Ok(Reply::Changed(
                    ks.change_state(id, transition, body.reason.as_deref())?
                        .to_json(),
                ))
            }
            Self::Destroy => destroy(ks, id, input.parse()?).map(Reply::Changed),
            Self::CancelDestroy => {
                let body: ReasonBody = input.parse()?;
                Ok(Reply::Changed(
                    ks.cancel_destroy(id, body.reason.as_deref())?.to_json(),
                ))
            }
            Self::Policy => {
                let body: PolicyBody = input.parse()?;
                let reason = body.reason.clone();
                let text = body.policy();
                let (policy, said) = text.parse(crate::time::now())?;
                if said.is_empty() {
                    return Err(ApiError::bad_request(
                        "nothing to set: give rotate_after, deactivate_at, activate_at or \
                         min_decrypt_version"
                            .into(),
                    ));
                }
                Ok(Reply::Changed(
                    ks.set_policy(id, &policy, reason.as_deref())?.to_json(),
                ))
            }
        }
    }
}

/// An action's body: the bytes of a request, or an item of a batch.
#[derive(Debug)]
pub enum Input<'a> {
    /// A request's body; empty is `{}`.
    Bytes(&'a [u8]),
    /// A batch item's JSON object, read as its own request's body: its `op` and `key` are
    /// skipped (the batch read them).
    Item(&'a [u8]),
}

impl Input<'_> {
    /// The body as `T`: 400 for malformed JSON, 422 for JSON that does not say what `T` needs
    /// (as axum's JSON extractor answers).
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        let parsed = match self {
            Self::Bytes(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => {
                serde_json::from_value(Value::Object(serde_json::Map::new()))
            }
            Self::Bytes(bytes) => serde_json::from_slice(bytes),
            Self::Item(bytes) => {
                let mut json = serde_json::Deserializer::from_slice(bytes);
                T::deserialize(WithoutHead(&mut json)).and_then(|body| json.end().map(|()| body))
            }
        };
        parsed.map_err(|e| ApiError::body(&e))
    }
}

/// A batch item's object as the body it carries: `op` and `key` are skipped, every other field
/// is read as the body's type reads it (an unknown one refused, as in its own request), straight
/// from the batch's bytes.
struct WithoutHead<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for WithoutHead<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(HeadSkipped(visitor))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(HeadSkipped(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Hands the body's visitor the object's entries but `op` and `key`.
struct HeadSkipped<V>(V);

impl<'de, V: serde::de::Visitor<'de>> serde::de::Visitor<'de> for HeadSkipped<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Entries(map))
    }
}

struct Entries<A>(A);

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for Entries<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        use serde::de::IntoDeserializer as _;
        while let Some(key) = self.0.next_key::<String>()? {
            if key == "op" || key == "key" {
                self.0.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<S: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

/// What an action answers, written as JSON straight from here ([`Reply::write_json`]: no tree
/// of JSON values, and the outputs encoded in base64 into the answer itself). Its `Debug` leaves
/// the outputs out.
pub enum Reply {
    /// A use: `{"compromised": bool, FIELD: OUTPUT, "state": "…", "version": N}` (its output in
    /// base64, and what it answers besides, as the CLI's `--json` says it), with a data key's
    /// `plaintext`.
    Used {
        field: &'static str,
        output: Output,
        plaintext: Option<SecretBytes>,
        version: u32,
        state: KeyState,
    },
    /// A check: `{"compromised", "state", "valid": true, "version"}` with the version that
    /// passed, or `{"valid": false}`.
    Valid(Option<(u32, KeyState)>),
    /// A change of the key (rotate, a state change, destroy, its policy): what it answers.
    Changed(Value),
    /// An export: `{"wrapped": BASE64}`, the wrapped key.
    Wrapped(Vec<u8>),
}

/// A use's output: a signature, an envelope or a tag, or a plaintext (kept as the keystore
/// gave it, zeroized when dropped).
pub enum Output {
    Public(Vec<u8>),
    Secret(SecretBytes),
}

impl Output {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Public(bytes) => bytes,
            Self::Secret(secret) => secret.expose(),
        }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Used {
                field,
                plaintext,
                version,
                state,
                ..
            } => f
                .debug_struct("Used")
                .field("field", field)
                .field("output", &"[redacted]")
                .field("plaintext", &plaintext.as_ref().map(|_| "[redacted]"))
                .field("version", version)
                .field("state", state)
                .finish(),
            Self::Valid(valid) => f.debug_tuple("Valid").field(valid).finish(),
            Self::Changed(value) => f.debug_tuple("Changed").field(value).finish(),
            Self::Wrapped(_) => f.debug_tuple("Wrapped").finish_non_exhaustive(),
        }
    }
}

impl Reply {
    fn used<T>(used: Used<T>, field: &'static str, output: fn(T) -> Output) -> Self {
        Self::Used {
            field,
            output: output(used.output),
            plaintext: None,
            version: used.version,
            state: used.state,
        }
    }

    /// Appends its JSON to `out`: an object whose keys are in the order serde_json sorts them,
    /// as answers had them. The names and states are ASCII words and base64 needs no escape:
    /// only a change's answer goes through serde_json.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), ApiError> {
        let compromised = |out: &mut Vec<u8>, state: KeyState| {
            out.extend_from_slice(if state == KeyState::Compromised {
                br#"{"compromised":true,"#
            } else {
                br#"{"compromised":false,"#
            });
        };
        // `"state":"S",` then `between`, then `"version":N}`.
        let state_version = |out: &mut Vec<u8>, state: KeyState, between: &[u8], version: u32| {
            out.extend_from_slice(br#""state":""#);
            out.extend_from_slice(state.as_str().as_bytes());
            out.extend_from_slice(br#"","#);
            out.extend_from_slice(between);
            out.extend_from_slice(br#""version":"#);
            out.extend_from_slice(version.to_string().as_bytes());
            out.push(b'}');
        };
        match self {
            Self::Used {
                field,
                output,
                plaintext,
                version,
                state,
            } => {
                compromised(out, *state);
                out.push(b'"');
                out.extend_from_slice(field.as_bytes());
                out.extend_from_slice(b"\":\"");
                push_b64(out, output.bytes())?;
                out.extend_from_slice(b"\",");
                if let Some(plaintext) = plaintext {
                    // After `envelope`, its only companion.
                    out.extend_from_slice(br#""plaintext":""#);
                    push_b64(out, plaintext.expose())?;
                    out.extend_from_slice(b"\",");
                }
                state_version(out, *state, b"", *version);
            }
            Self::Valid(Some((version, state))) => {
                compromised(out, *state);
                state_version(out, *state, br#""valid":true,"#, *version);
            }
            Self::Valid(None) => out.extend_from_slice(br#"{"valid":false}"#),
            Self::Changed(value) => serde_json::to_writer(&mut *out, value)
                .map_err(|e| ApiError::internal(format!("an answer not written: {e}")))?,
            Self::Wrapped(wrapped) => {
                out.extend_from_slice(br#"{"wrapped":""#);
                push_b64(out, wrapped)?;
                out.extend_from_slice(br#""}"#);
            }
        }
        Ok(())
    }
}

/// A check's answer ([`Reply::Valid`]).
fn validity(checked: crate::Result<Used<()>>) -> Result<Reply, ApiError> {
    match checked {
        Ok(used) => Ok(Reply::Valid(Some((used.version, used.state)))),
        Err(crate::Error::VerificationFailed { .. }) => Ok(Reply::Valid(None)),
        Err(e) => Err(e.into()),
    }
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

/// `export`: the key `id` wrapped under the key `wrap_with` (which the client must see: one it
/// does not is answered, and audited, as one that does not exist), to the RSA public key
/// `to_public` (PEM or DER, in base64), or under the token's trusted key `wrap_with_trusted`;
/// exactly one of them.
fn export(ks: &Keystore, client: &Client, id: &str, body: ExportBody) -> Result<Reply, ApiError> {
    let public = body.to_public.map(|p| p.decode("to_public")).transpose()?;
    let to = match (&body.wrap_with, &public, &body.wrap_with_trusted) {
        (Some(kek), None, None) => {
            // Refused, the export is audited as refused too, as the keystore audits an export
            // whose wrapping key does not resolve.
            sees_other_key(ks, client, "wrap", kek)
                .inspect_err(|e| ks.audit_refusal("export", id, e.code()))?;
            ExportTo::Key(kek)
        }
        (None, Some(public), None) => ExportTo::Public(public),
        (None, None, Some(label)) => ExportTo::Trusted(label),
        _ => {
            return Err(ApiError::unprocessable(
                "give exactly one of `wrap_with` (a key ID), `to_public` (an RSA public key, \
                 PEM or DER, in base64) and `wrap_with_trusted` (a token key's label)"
                    .into(),
            ))
        }
    };
    Ok(Reply::Wrapped(ks.export_key(id, to)?))
}

/// Whether `client` sees the key `id` that a request names besides the key it acts on (an
/// export's wrapping key, an import's unwrapping key), for `operation`: a key it does not see,
/// or an ID that fails authentication, is refused before the keystore is asked, and the
/// refusal audited, as the request's own key is (`routes::authorize`).
pub fn sees_other_key(
    ks: &Keystore,
    client: &Client,
    operation: &'static str,
    id: &str,
) -> Result<(), ApiError> {
    let seen = match ks.authenticate_id(id) {
        Ok(fields) if client.sees(&fields.namespace) => Ok(()),
        Ok(_) => Err(ApiError::no_such_key()),
        Err(e) => Err(ApiError::from(e)),
    };
    if let Err(refused) = &seen {
        ks.audit_refusal(operation, id, refused.code());
    }
    seen
}

/// `destroy`: `{"now": true}` at once, `{"at": SECONDS}` then (now, if not in the future), else
/// after `after` (default 7 days, at least 1s).
fn destroy(ks: &Keystore, id: &str, body: DestroyBody) -> Result<Value, ApiError> {
    let reason = body.reason.as_deref();
    let given = [body.now, body.after.is_some(), body.at.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(ApiError::bad_request(
            "give one of `now`, `after` and `at`".into(),
        ));
    }
    let at = if body.now {
        crate::time::now()
    } else if let Some(at) = body.at {
        at
    } else {
        let after = body.after.as_deref().unwrap_or(DEFAULT_DESTROY_AFTER);
        let after = crate::time::duration_secs(crate::time::parse_duration(after)?)?;
        if after == 0 {
            return Err(ApiError::bad_request(
                "`after` must be at least 1s: to destroy the key at once, give \"now\": true"
                    .into(),
            ));
        }
        crate::time::now_ceil()
            .checked_add(after)
            .ok_or_else(|| ApiError::bad_request("`after` is too far in the future".into()))?
    };
    Ok(ks.schedule_destroy(id, at, reason)?.to_json())
}

/// The options of a use that checks or opens (verify, decrypt, rewrap, mac-verify): only the
/// given version (verify, mac-verify), and whether a compromised key may be used all the same
/// (every answer then says it was).
fn process(version: Option<u32>, allow_compromised: bool) -> UseOptions {
    UseOptions::new()
        .allow_compromised(allow_compromised)
        .version(version)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignBody {
    data: B64,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    data: B64,
    signature: B64,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    allow_compromised: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptBody {
    plaintext: B64,
    #[serde(default)]
    aad: B64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeBody {
    envelope: B64,
    #[serde(default)]
    aad: B64,
    #[serde(default)]
    allow_compromised: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MacBody {
    data: B64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MacVerifyBody {
    data: B64,
    mac: B64,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    allow_compromised: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatakeyBody {
    #[serde(default)]
    aad: B64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    #[serde(default)]
    wrap_with: Option<String>,
    #[serde(default)]
    to_public: Option<B64>,
    #[serde(default)]
    wrap_with_trusted: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyBody {
    #[serde(default)]
    now: bool,
    /// Seconds since the epoch; a time not in the future destroys the key now.
    #[serde(default)]
    at: Option<i64>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    #[serde(default)]
    rotate_after: Option<String>,
    #[serde(default)]
    deactivate_at: Option<String>,
    #[serde(default)]
    activate_at: Option<String>,
    #[serde(default)]
    min_decrypt_version: Option<u32>,
    #[serde(default)]
    reason: Option<String>,
}

impl PolicyBody {
    fn policy(self) -> PolicyText {
        PolicyText {
            rotate_after: self.rotate_after,
            deactivate_at: self.deactivate_at,
            activate_at: self.activate_at,
            min_decrypt_version: self.min_decrypt_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Each reply is written as the JSON value the service answered before replies were typed
    /// (serde_json sorts an object's keys): the same bytes.
    #[test]
    fn replies_are_written_as_their_json_values_were() {
        // "dGV4dA==" is "text" in base64, "a2V5" "key".
        let used = |field, plaintext: Option<&str>, state| Reply::Used {
            field,
            output: if field == "plaintext" {
                Output::Secret(SecretBytes::copy_from(b"text"))
            } else {
                Output::Public(b"text".to_vec())
            },
            plaintext: plaintext.map(|p| SecretBytes::copy_from(p.as_bytes())),
            version: 3,
            state,
        };
        let cases = [
            (
                used("signature", None, KeyState::Active),
                json!({"signature": "dGV4dA==", "version": 3, "state": "active", "compromised": false}),
            ),
            (
                used("plaintext", None, KeyState::Compromised),
                json!({"plaintext": "dGV4dA==", "version": 3, "state": "compromised",
                       "compromised": true}),
            ),
            (
                used("envelope", Some("key"), KeyState::Active),
                json!({"envelope": "dGV4dA==", "plaintext": "a2V5", "version": 3,
                       "state": "active", "compromised": false}),
            ),
            (
                Reply::Valid(Some((2, KeyState::Deactivated))),
                json!({"valid": true, "version": 2, "state": "deactivated", "compromised": false}),
            ),
            (Reply::Valid(None), json!({"valid": false})),
            (
                Reply::Changed(json!({"version": 4, "event": "rotated"})),
                json!({"version": 4, "event": "rotated"}),
            ),
            (
                Reply::Wrapped(b"wrapped".to_vec()),
                json!({"wrapped": "d3JhcHBlZA=="}),
            ),
        ];
        let shown = format!("{:?}", cases[2].0);
        assert!(
            !shown.contains("dGV4dA") && !shown.contains("a2V5"),
            "{shown}"
        );
        for (reply, value) in cases {
            let mut written = Vec::new();
            reply.write_json(&mut written).unwrap();
            assert_eq!(
                String::from_utf8(written).unwrap(),
                value.to_string(),
                "{reply:?}"
            );
        }
    }

    /// Base64 is decoded as the body is read, escapes and all; text that is not base64 is
    /// refused when its field is asked for, naming it; a field of another type is JSON of the
    /// wrong shape (422).
    #[test]
    fn base64_fields_are_decoded_as_read() {
        // "aGk/" is "hi?"; JSON may escape its `/`.
        for body in [&br#"{"data":"aGk/"}"#[..], br#"{"data":"aGk\/"}"#] {
            let sign: SignBody = Input::Bytes(body).parse().unwrap();
            assert_eq!(&*sign.data.decode("data").unwrap(), b"hi?");
        }
        let sign: SignBody = Input::Bytes(br#"{"data":"not base64!"}"#).parse().unwrap();
        let refused = sign.data.decode("data").unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(
            refused
                .to_json()
                .to_string()
                .contains("`data` is not base64"),
            "{refused:?}"
        );
        let wrong = Input::Bytes(br#"{"data":7}"#)
            .parse::<SignBody>()
            .unwrap_err();
        assert_eq!(wrong.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        // An omitted `aad` is empty.
        let encrypt: EncryptBody = Input::Bytes(br#"{"plaintext":""}"#).parse().unwrap();
        assert!(encrypt.aad.decode("aad").unwrap().is_empty());
    }
}
