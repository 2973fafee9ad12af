//! The root secret: the keys derived from it, unsealing it, and checking the store under it
//! (metadata MAC and every record) before the store is used.

use aws_lc_rs::{constant_time, hkdf, hmac};

use crate::error::{Error, Result};
use crate::sealer::{RootSecret, Sealer};
use crate::secret::SecretBytes;
use crate::store::{
    tampered, CommitKeys, FileAnchor, KeyRecord, Mismatch, Recomputed, RowKind, Store, StoreMeta,
    StoreState,
};

/// Keys derived from the root secret, each for one job (HKDF-SHA256, salt = store ID).
pub(super) struct DerivedKeys {
    pub(super) key_id_mac: SecretBytes,
    pub(super) record_mac: SecretBytes,
    pub(super) software_kek: SecretBytes,
    pub(super) tpm_auth_kek: SecretBytes,
    pub(super) meta_mac: SecretBytes,
    pub(super) audit_mac: SecretBytes,
    pub(super) commit_prf: SecretBytes,
    pub(super) state_mac: SecretBytes,
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    pub(super) counter_auth: SecretBytes,
    #[cfg_attr(not(feature = "pkcs11"), allow(dead_code))]
    pub(super) token_counter_mac: SecretBytes,
    pub(super) backup_key: SecretBytes,
    /// The key a service's bearer tokens are hashed under (only the hash is stored).
    pub(super) client_token: SecretBytes,
}

impl DerivedKeys {
    /// The keys of the store's commitment.
    pub(super) fn commit_keys(&self, store_id: [u8; 16]) -> CommitKeys {
        CommitKeys::new(self.commit_prf.expose(), self.state_mac.expose(), store_id)
    }
}

pub(super) fn derive_keys(root: &RootSecret, store_id: &[u8; 16]) -> Result<DerivedKeys> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, store_id).extract(root.expose());
    let expand = |info: &'static [u8]| -> Result<SecretBytes> {
        let mut out = SecretBytes::zeroed(32);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.expose_mut()))
            .map_err(|_| Error::crypto("derive the store's keys"))?;
        Ok(out)
    };
    Ok(DerivedKeys {
        key_id_mac: expand(b"keyhold v1 key-id mac")?,
        record_mac: expand(b"keyhold v1 record mac")?,
        software_kek: expand(b"keyhold v1 software kek")?,
        tpm_auth_kek: expand(b"keyhold v1 tpm auth kek")?,
        meta_mac: expand(b"keyhold v1 store meta mac")?,
        audit_mac: expand(b"keyhold v1 audit mac")?,
        commit_prf: expand(b"keyhold v1 commitment prf")?,
        state_mac: expand(b"keyhold v1 store state mac")?,
        counter_auth: expand(b"keyhold v1 tpm counter auth")?,
        token_counter_mac: expand(b"keyhold v1 token counter mac")?,
        backup_key: expand(b"keyhold v1 backup key")?,
        client_token: expand(b"keyhold v1 client token hash")?,
    })
}

/// The metadata MAC format keyhold writes: 2, "the store has a committed state".
const META_FORMAT: u8 = 2;

/// The MAC of a store's metadata under the key derived for it (format 2).
pub(super) fn meta_mac(keys: &DerivedKeys, meta: &StoreMeta) -> Vec<u8> {
    meta_mac_in(keys, meta, META_FORMAT)
}

/// The format of the metadata MAC `meta` carries, if it is one keyhold made under `keys`.
pub(super) fn meta_format(keys: &DerivedKeys, meta: &StoreMeta) -> Option<u8> {
    [META_FORMAT, 1].into_iter().find(|&format| {
        !meta.mac.is_empty()
            && constant_time::verify_slices_are_equal(&meta_mac_in(keys, meta, format), &meta.mac)
                .is_ok()
    })
}

fn meta_mac_in(keys: &DerivedKeys, meta: &StoreMeta, format: u8) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, keys.meta_mac.expose());
    hmac::sign(&key, &meta.mac_input(format)).as_ref().to_vec()
}

/// A new store's first state: generation 0, no rows.
pub(super) fn initial_state(keys: &DerivedKeys, store_id: [u8; 16], meta_mac: &[u8]) -> StoreState {
    keys.commit_keys(store_id).state(
        0,
        Recomputed::default().total(&keys.commit_keys(store_id)),
        None,
        None,
        meta_mac,
    )
}

/// Whether `record` carries its MAC under `key` (the record-MAC key) for store `store_id`.
pub(super) fn record_mac_ok(key: &hmac::Key, store_id: &[u8; 16], record: &KeyRecord) -> bool {
    record
        .mac_input(store_id)
        .is_some_and(|input| mac_ok(key, &input, &record.mac))
}

/// Whether `mac` is the MAC of `input` under `key`, compared in constant time.
pub(super) fn mac_ok(key: &hmac::Key, input: &[u8], mac: &[u8]) -> bool {
    let expected = hmac::sign(key, input);
    constant_time::verify_slices_are_equal(expected.as_ref(), mac).is_ok()
}

/// Checks, right after unsealing and before anything is written or re-sealed, that the root
/// secret is the one the store's records were made under and that the metadata (sealer kind and
/// parameters: PCRs, SRK Name, recovery seal, KDF settings) is what keyhold wrote.
///
/// Whoever can write the store directory can put in a seal of a root they chose, and a MAC under
/// it: the metadata MAC alone cannot tell that seal from ours. The records can: they were MAC'd
/// under the old root, so under a replaced one none of them verifies. Every record is checked
/// (an HMAC each), and any failure refuses the store: a replaced root with one record forged
/// under it must not open either, or new keys would be made under a key-encryption key the
/// intruder knows. (A replaced root in a store whose records were all deleted cannot be told
/// from a new store; the sealer the user states, not the store, is the defence there.)
///
/// Returns what the commitment check ([`settle`]) needs: the metadata MAC's format and every
/// row's term, computed in the same pass, with the state and digests read in the same read
/// transaction as the rows (another process may be writing: the rows, digests and state it
/// sees are one state of the store), and the anchor file in `anchor_dir` read before them (so
/// that a change made in between cannot make the rows look older than their anchor).
pub(super) fn check_store(
    store: &Store,
    keys: &DerivedKeys,
    anchor_dir: Option<&std::path::Path>,
) -> Result<Checked> {
    let meta = store.meta();
    let record_mac = hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose());
    let commit = keys.commit_keys(meta.store_id);
    let mut rows = Recomputed::default();
    let anchor = anchor_dir.map(|dir| FileAnchor::new(dir, &meta.store_id));
    let anchored = match anchor.as_ref().map(FileAnchor::read).transpose() {
        Ok(recorded) => recorded.flatten(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store's anchor file: rollback not checked");
            None
        }
    };
    let all = store.all_rows()?;
    // The metadata read with the rows. Another process that re-sealed the store (or adopted one
    // made before the commitment) since the open's first read wrote new metadata, under a MAC
    // of the same root, and the state read now is bound to it: go on with it. Metadata changed
    // without the root counts for nothing: the metadata as first read is checked, as before.
    let now = all.meta?;
    let newer = (now.mac != store.meta().mac && meta_format(keys, &now).is_some()).then_some(now);
    let meta = newer.as_ref().unwrap_or(store.meta());
    let records = all.keys?;
    let failed: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| !record_mac_ok(&record_mac, &meta.store_id, r))
        .collect();
    // Every record failing means a root the records were not made under, unless the seal is one
    // only the user's secret opens: a passphrase seal that opened is genuine, so its records
    // were changed.
    if !records.is_empty()
        && failed.len() == records.len()
        && meta.sealed_root.sealer != crate::sealer::PassphraseSealer::KIND
    {
        return Err(Error::Unseal {
            reason: format!(
                "none of the store's {} key records verifies under the root secret the `{}` \
                 sealer gave back: its sealed root secret was replaced (someone who can write \
                 the store directory and use the device put in a seal of their own), or every \
                 record was changed; do not create keys in this store, and restore it from a \
                 backup",
                records.len(),
                meta.sealed_root.sealer
            ),
        });
    }
    let Some(meta_format) = meta_format(keys, meta) else {
        return Err(Error::Integrity {
            what: format!(
                "the store's sealer metadata (sealer `{}`, its parameters such as PCRs, SRK Name \
                 and recovery seal) {}; keyhold changed nothing: restore the store from a backup",
                meta.sealed_root.sealer,
                if meta.mac.is_empty() {
                    "carries no MAC (stores made by development builds before the metadata MAC \
                     lack one and do not open with this version; a store made since always has \
                     one, so a missing MAC was removed)"
                } else {
                    "failed its MAC"
                }
            ),
        });
    };
    for r in &records {
        rows.add(&commit, RowKind::Key, &r.uuid, &r.mac);
    }
    // The lifecycle's rows: a key's later versions, its history, its AES-GCM counters.
    let (versions, events, counters) = (all.versions?, all.events?, all.counters?);
    for v in &versions {
        rows.add(&commit, RowKind::Version, &v.uuid, &v.mac);
    }
    for e in &events {
        rows.add(&commit, RowKind::Event, &e.uuid, &e.mac);
    }
    for c in &counters {
        rows.add(&commit, RowKind::Counter, &c.uuid, &c.mac);
    }
    let clients = all.clients?;
    for c in &clients {
        rows.add(&commit, RowKind::Client, &c.uuid, &c.mac);
    }
    let mut bad: Vec<String> =
        super::verify::failing_rows(&record_mac, &meta.store_id, &versions, &events, &counters)
            .iter()
            .map(ToString::to_string)
            .collect();
    bad.extend(super::clients::failing_clients(
        &record_mac,
        &meta.store_id,
        &clients,
    ));
    if let Some(first) = bad.first() {
        return Err(Error::Integrity {
            what: format!(
                "{} of the store's version, history, counter and token client rows fail their \
                 MAC (the first: {first})",
                bad.len()
            ),
        });
    }
    if let Some(first) = failed.first() {
        return Err(Error::Integrity {
            what: format!(
                "{} of the store's {} key records fail their MAC (the first: key {}): they were \
                 changed outside keyhold, or the sealed root secret was replaced and records \
                 were added under it",
                failed.len(),
                records.len(),
                crate::hex::encode(&first.uuid)
            ),
        });
    }
    let names = labels(&records, &clients);
    Ok(Checked {
        meta_format,
        rows,
        names,
        state: all.state?,
        digests: all.digests?,
        data_version: all.data_version?,
        newer_meta: newer,
        anchor,
        anchored,
    })
}

/// [`check_store`] then [`settle`]: the store checked whole under `keys`, and made writable.
///
/// # Errors
/// As those two.
pub(super) fn check_and_settle(
    store: &mut Store,
    keys: &DerivedKeys,
    anchor_dir: Option<&std::path::Path>,
) -> Result<()> {
    let checked = check_store(store, keys, anchor_dir)?;
    settle(store, keys, checked)
}

/// How messages name each uuid of the commitment: ``key `NS/NAME` `` or ``token client `NAME` ``.
fn labels(
    records: &[KeyRecord],
    clients: &[crate::store::ClientRecord],
) -> std::collections::BTreeMap<[u8; 16], String> {
    let keys = records
        .iter()
        .map(|r| (r.uuid, format!("key `{}/{}`", r.namespace, r.name)));
    let clients = clients
        .iter()
        .map(|c| (c.uuid, format!("token client `{}`", c.name)));
    keys.chain(clients).collect()
}

/// What [`check_store`] found, for [`settle`].
pub(super) struct Checked {
    /// The format of the metadata MAC that verified (1: made before the commitment).
    meta_format: u8,
    /// Every row's term, by key.
    rows: Recomputed,
    /// What each uuid is (``key `NS/NAME` ``, ``token client `NAME` ``), for messages.
    names: std::collections::BTreeMap<[u8; 16], String>,
    /// The committed state, read with the rows (its MAC not checked yet).
    state: Option<StoreState>,
    /// Every key's digest, read with the rows.
    digests: std::collections::BTreeMap<[u8; 16], crate::store::Sum>,
    /// SQLite's `data_version` in that read.
    data_version: i64,
    /// Metadata that another process wrote under the same root since the open's first read.
    newer_meta: Option<StoreMeta>,
    /// The anchor file, if there is one, and the generation it recorded (read before the rows).
    anchor: Option<FileAnchor>,
    anchored: Option<u64>,
}

/// Checks that the rows present are exactly those committed and that the store is not older
/// than its anchor, then lets the store be written ([`Store::attach`]). A store made before the
/// commitment (metadata MAC format 1, no state) is adopted: its rows, all just verified, become
/// the committed set at generation 1.
pub(super) fn settle(store: &mut Store, keys: &DerivedKeys, mut checked: Checked) -> Result<()> {
    if let Some(meta) = checked.newer_meta.take() {
        store.replace_meta(meta);
    }
    let commit = keys.commit_keys(store.meta().store_id);
    let (anchor, anchored) = (checked.anchor.take(), checked.anchored);
    let state =
        match (checked.state.clone(), checked.meta_format) {
            (Some(state), META_FORMAT) => {
                if !commit.state_ok(&state, &store.meta().mac) {
                    return Err(tampered(
                        "the store's committed state (its generation and commitment) fails its MAC"
                            .into(),
                    ));
                }
                let found = checked.rows.compare(&commit, &checked.digests, &state);
                if !found.is_empty() {
                    return Err(tampered(describe(&found, &checked.names)));
                }
                state
            }
            (None, 1) if anchored.is_some() => {
                // Adopted before on this machine: the state was deleted and the old metadata MAC put
                // back, to have a tampered set of rows adopted.
                return Err(tampered(format!(
                    "its committed state (generation and commitment) was deleted and its metadata \
                 put back from before keyhold kept one, but this machine recorded generation {} \
                 for it",
                    anchored.unwrap_or_default()
                )));
            }
            (None, 1) => {
                let mac = meta_mac_in(keys, store.meta(), META_FORMAT);
                let Some(state) = store.adopt(&commit, &checked.rows, &mac)? else {
                    return Err(Error::StoreUnusable {
                        path: store.dir().to_path_buf(),
                        reason: "another keyhold process was upgrading it at the same moment: run \
                             the command again"
                            .into(),
                        source: None,
                    });
                };
                tracing::info!(
                    store = %store.dir().display(),
                    keys = checked.names.len(),
                    "the store now has a committed state: rows deleted or put back from now on are \
                     detected"
                );
                state
            }
            (None, _) => {
                return Err(tampered(
                    "its committed state (generation and commitment) was deleted, though its \
                 metadata says it has one"
                        .into(),
                ))
            }
            (Some(_), _) => return Err(tampered(
                "it has a committed state, but its metadata MAC is of the format written before \
                 there was one: the metadata was put back from an older copy"
                    .into(),
            )),
        };
    if let Some(anchor) = &anchor {
        check_anchor(anchor, anchored, state.generation)?;
    }
    // Adopted or compared, the digests add up to the state's total as read (an adopted store's
    // were written by this connection, which leaves `data_version` as it is).
    store.attach(commit, &state, anchor, Some(checked.data_version));
    Ok(())
}

/// The store at `generation` against its anchor file: older is refused; newer (a crash between
/// a change and the anchor's update, or changes made with another state directory) brings the
/// file up to date.
fn check_anchor(anchor: &FileAnchor, recorded: Option<u64>, generation: u64) -> Result<()> {
    match recorded {
        Some(recorded) if generation < recorded => Err(tampered(format!(
            "it is older than its anchor: it is at generation {generation}, but {} \
             recorded generation {recorded} here: it was restored from a copy (or the anchor \
             file was changed); if you put this copy back on purpose, `keyhold store reanchor \
             --yes` accepts it",
            anchor.path().display()
        ))),
        Some(recorded) if generation == recorded => Ok(()),
        recorded => {
            match recorded {
                Some(r) if generation > r + 1 => tracing::info!(
                    generation,
                    anchor = r,
                    "the store is ahead of its anchor file by more than one change (changed with \
                     another state directory?): bringing the file up to date"
                ),
                None if generation > 0 => tracing::info!(
                    generation,
                    anchor = %anchor.path().display(),
                    "no anchor file for this store here: starting one"
                ),
                _ => {}
            }
            if let Err(e) = anchor.advance(generation) {
                tracing::warn!(error = %e, "cannot write the store's anchor file");
            }
            Ok(())
        }
    }
}

/// The message naming what differs.
fn describe(found: &[Mismatch], names: &std::collections::BTreeMap<[u8; 16], String>) -> String {
    let parts: Vec<String> = found.iter().map(|m| describe_one(m, names)).collect();
    format!(
        "{} that the store's rows are not the ones keyhold committed: {}",
        if parts.len() == 1 {
            "1 finding says".to_owned()
        } else {
            format!("{} findings say", parts.len())
        },
        parts.join("; ")
    )
}

/// One difference, naming its key.
fn describe_one(m: &Mismatch, names: &std::collections::BTreeMap<[u8; 16], String>) -> String {
    let key = |uuid: &[u8; 16]| match names.get(uuid) {
        Some(label) => format!("{label} (record {})", crate::hex::encode(uuid)),
        None => format!("key record {}", crate::hex::encode(uuid)),
    };
    match m {
        Mismatch::Changed {
            uuid,
            has_record: true,
        } => format!(
            "{}: its rows are not the ones committed (one deleted, put back from an older copy, \
             or duplicated)",
            key(uuid)
        ),
        Mismatch::Changed {
            uuid,
            has_record: false,
        } => format!(
            "{}: its record was deleted (some of its other rows are left)",
            key(uuid)
        ),
        Mismatch::Uncommitted { uuid } => format!(
            "{}: its rows were never committed by this store (added from elsewhere)",
            key(uuid)
        ),
        Mismatch::Vanished { uuid } => format!("{}: every row of it was deleted", key(uuid)),
        Mismatch::Digests => "the keys' digests were changed too (rows and digests put back \
                              together from an older copy): the store cannot tell which key"
            .into(),
    }
}

/// What the commitment check of `store verify` found: each problem with its key's uuid when it
/// is about one.
pub(super) struct CommitmentReport {
    /// What was compared.
    pub(super) summary: String,
    /// Problems, each with its key's uuid if it is about one.
    pub(super) problems: Vec<(Option<[u8; 16]>, String)>,
    /// The state, when it is present and carries keyhold's MAC (for the counter's check).
    pub(super) state: Option<StoreState>,
}

/// What the commitment check reads, all from one read transaction ([`Store::all_rows`]).
pub(super) struct CommitInputs<'a> {
    pub(super) state: Option<StoreState>,
    pub(super) digests: &'a std::collections::BTreeMap<[u8; 16], crate::store::Sum>,
    pub(super) keys: &'a [KeyRecord],
    pub(super) versions: &'a [crate::store::VersionRecord],
    pub(super) events: &'a [crate::store::EventRecord],
    pub(super) counters: &'a [crate::store::CounterRecord],
    pub(super) clients: &'a [crate::store::ClientRecord],
}

/// [`settle`]'s checks, reporting instead of refusing and writing nothing: the metadata MAC's
/// format against the state, the state's MAC, the rows against the commitment, the generation
/// against the anchor file's value (`anchored`: read before the rows, so that a change made in
/// between cannot make the rows look older than it). (The TPM counter is the caller's.)
pub(super) fn check_commitment(
    meta: &StoreMeta,
    commit: &CommitKeys,
    meta_format: Option<u8>,
    anchored: Option<(std::path::PathBuf, Result<Option<u64>>)>,
    inputs: CommitInputs<'_>,
) -> CommitmentReport {
    let mut report = CommitmentReport {
        summary: String::new(),
        problems: Vec::new(),
        state: None,
    };
    let state = match (inputs.state, meta_format) {
        (None, Some(1)) => {
            report.summary = "made before keyhold kept a commitment: it is adopted at its next \
                              open, then checked"
                .into();
            return report;
        }
        (None, _) => {
            report.problems.push((
                None,
                "its committed state (generation and commitment) was deleted, though its metadata \
                 says it has one"
                    .into(),
            ));
            return report;
        }
        (Some(_), Some(1)) => {
            report.problems.push((
                None,
                "it has a committed state, but its metadata MAC is of the format written before \
                 there was one: the metadata was put back from an older copy"
                    .into(),
            ));
            return report;
        }
        (Some(state), _) if !commit.state_ok(&state, &meta.mac) => {
            report.problems.push((
                None,
                "the store's committed state (its generation and commitment) fails its MAC".into(),
            ));
            return report;
        }
        (Some(state), _) => state,
    };
    let mut rows = Recomputed::default();
    let records = inputs.keys;
    for r in records {
        rows.add(commit, RowKind::Key, &r.uuid, &r.mac);
    }
    for v in inputs.versions {
        rows.add(commit, RowKind::Version, &v.uuid, &v.mac);
    }
    for e in inputs.events {
        rows.add(commit, RowKind::Event, &e.uuid, &e.mac);
    }
    for c in inputs.counters {
        rows.add(commit, RowKind::Counter, &c.uuid, &c.mac);
    }
    for c in inputs.clients {
        rows.add(commit, RowKind::Client, &c.uuid, &c.mac);
    }
    let names = labels(records, inputs.clients);
    for m in rows.compare(commit, inputs.digests, &state) {
        let uuid = match &m {
            Mismatch::Changed { uuid, .. }
            | Mismatch::Uncommitted { uuid }
            | Mismatch::Vanished { uuid } => Some(*uuid),
            Mismatch::Digests => None,
        };
        report.problems.push((uuid, describe_one(&m, &names)));
    }
    report.summary = format!(
        "generation {}, {} keys' digests against the committed total",
        state.generation,
        records.len()
    );
    if let Some((path, recorded)) = anchored {
        match recorded {
            Ok(Some(recorded)) if state.generation < recorded => report.problems.push((
                None,
                format!(
                    "it is older than its anchor: it is at generation {}, but {} recorded \
                     generation {recorded} here: it was restored from a copy",
                    state.generation,
                    path.display()
                ),
            )),
            Ok(Some(recorded)) => {
                report
                    .summary
                    .push_str(&format!("; anchor file at generation {recorded}"));
            }
            Ok(None) => report.summary.push_str("; no anchor file here"),
            Err(e) => report
                .summary
                .push_str(&format!("; the anchor file could not be read ({e})")),
        }
    }
    report.state = Some(state);
    report
}
/// Unseals `store`'s root secret with `sealer`, which must be the kind that sealed it, and checks
/// the store against it ([`check_store`]).
///
/// The caller's sealer is the expectation the store cannot forge: a store that records another
/// kind is refused before anything is unsealed, whatever its metadata says.
pub(super) fn unseal_root(
    store: &mut Store,
    sealer: &dyn Sealer,
    anchor_dir: Option<&std::path::Path>,
) -> Result<(RootSecret, DerivedKeys)> {
    let (root, keys) = unseal_unchecked(store, sealer)?;
    check_and_settle(store, &keys, anchor_dir)?;
    Ok((root, keys))
}

/// [`unseal_root`] without [`check_store`] and [`settle`]: for `store verify` alone, which reports
/// every record that fails rather than refusing the store at the first, and writes nothing.
pub(super) fn unseal_unchecked(
    store: &Store,
    sealer: &dyn Sealer,
) -> Result<(RootSecret, DerivedKeys)> {
    let meta = store.meta();
    if meta.sealed_root.sealer != sealer.kind() {
        return Err(Error::Unseal {
            reason: format!(
                "the store records a `{}` seal, but the caller expects a `{}` seal: keyhold does \
                 not follow a change of sealer it did not make (`keyhold reseal` makes one); if \
                 nobody changed it, its sealed root secret was replaced",
                meta.sealed_root.sealer,
                sealer.kind()
            ),
        });
    }
    let root = sealer.unseal(&meta.sealed_root, &meta.store_id)?;
    let keys = derive_keys(&root, &meta.store_id)?;
    Ok((root, keys))
}
