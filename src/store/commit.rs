//! The store as one authenticated whole: a generation and a commitment over every row.
//!
//! Every row carries its own MAC, which proves that keyhold wrote it, not that it is still meant
//! to be there: a row deleted, an older copy of a row put back, or a row duplicated all pass their
//! MACs. The commitment closes that gap. Each row contributes `F(kind ‖ uuid ‖ row MAC)`, a PRF
//! (HMAC-SHA256 under a key derived from the root secret); a key's rows add up (mod 2^256) to its
//! *digest*, kept in `key_digests`; the digests add up, each through the PRF again with its uuid,
//! to the store's *total*, kept with a *generation* in the `store_state` metadata entry under its
//! own MAC (which also covers the metadata MAC, so the seal cannot be rolled back alone).
//!
//! Addition, not XOR: a row added twice does not cancel out. This is the keyed multiset hash
//! MSet-Add-Hash (Clarke et al., 2003); without the root nobody can compute a row's term, so
//! nobody can make a changed set of rows add up to the committed total. A write changes only the
//! digests of the keys it touches and the total by their difference, so no write rehashes the
//! store; opening the store recomputes everything (it already checks every row's MAC).
//!
//! The per-key digests let a mismatch name the key: keys whose rows no longer add up to their
//! digest are the ones changed. An intruder who also rewrites a key's digest (from an older copy
//! of the whole key) changes the total, which is detected, but cannot be traced to one key from
//! the store alone.

use std::collections::BTreeMap;

use aws_lc_rs::{constant_time, hmac};

use crate::audit::Head;
use crate::error::{Error, Result};

/// The metadata entry holding the [`StoreState`].
pub(super) const STATE_ENTRY: &str = "store_state";

/// The kinds of rows the commitment covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RowKind {
    /// A key record (`keys`).
    Key = 1,
    /// A version from 2 on (`key_versions`).
    Version = 2,
    /// A history entry (`key_events`).
    Event = 3,
    /// An AES-GCM invocation counter (`gcm_counters`).
    Counter = 4,
    /// A token client of the service (`clients`), under its own uuid.
    Client = 5,
}

/// A number mod 2^256, big-endian on disk.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sum([u64; 4]);

impl std::fmt::Debug for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex::encode(&self.to_bytes()))
    }
}

impl Sum {
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 32] = bytes.try_into().ok()?;
        let mut limbs = [0u64; 4];
        for (i, limb) in limbs.iter_mut().enumerate() {
            // Limb 0 is the least significant: the last eight bytes.
            let start = 24 - 8 * i;
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[start..start + 8]);
            *limb = u64::from_be_bytes(word);
        }
        Some(Self(limbs))
    }

    pub(crate) fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            let start = 24 - 8 * i;
            out[start..start + 8].copy_from_slice(&limb.to_be_bytes());
        }
        out
    }

    fn add(&mut self, other: Self) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            let (s, c1) = a.overflowing_add(b);
            let (s, c2) = s.overflowing_add(u64::from(carry));
            *a = s;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, other: Self) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            let (d, b1) = a.overflowing_sub(b);
            let (d, b2) = d.overflowing_sub(u64::from(borrow));
            *a = d;
            borrow = b1 || b2;
        }
    }
}

/// The store's generation and commitment, as the `store_state` entry holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    /// Incremented by every committed change.
    pub generation: u64,
    /// The total over every key's digest (see the module documentation), big-endian.
    pub total: [u8; 32],
    /// The counter outside the store that follows the generation, once there is one.
    pub counter: Option<CounterBinding>,
    /// The audit log's entry of the last change that wrote one: a log cut before it is refused.
    pub audit: Option<Head>,
    /// HMAC-SHA256 over all of the above and the metadata MAC.
    pub mac: Vec<u8>,
}

/// Where a store's counter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterAt {
    /// The TPM NV counter at this index.
    TpmNv(u32),
    /// The store's counter object on a PKCS#11 token (a private data object, found by a label
    /// made from the store ID).
    Token,
}

impl std::fmt::Display for CounterAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TpmNv(index) => write!(f, "the NV counter {index:#010x} of a TPM"),
            Self::Token => f.write_str("its counter object on a PKCS#11 token"),
        }
    }
}

/// Which counter follows a store's generation, and how: `count = generation + offset` (mod
/// 2^64). A counter starts where the TPM's counters have got to, not at the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterBinding {
    /// Where the counter is.
    pub at: CounterAt,
    /// `None` while the counter is being made (a crash then leaves the binding to finish).
    pub offset: Option<u64>,
}

impl CounterBinding {
    /// The count the counter must show at `generation`.
    pub fn expected(&self, generation: u64) -> Option<u64> {
        self.offset.map(|o| generation.wrapping_add(o))
    }

    fn encode(binding: Option<&Self>, out: &mut Vec<u8>) {
        match binding {
            None => out.push(0),
            Some(b) => {
                let (tag, index) = match b.at {
                    CounterAt::TpmNv(index) => (1, index),
                    CounterAt::Token => (3, 0),
                };
                out.push(if b.offset.is_some() { tag + 1 } else { tag });
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&b.offset.unwrap_or_default().to_be_bytes());
            }
        }
    }
}

fn encode_audit(audit: Option<&Head>, out: &mut Vec<u8>) {
    match audit {
        None => out.push(0),
        Some(head) => {
            out.push(1);
            out.extend_from_slice(&head.seq.to_be_bytes());
            out.extend_from_slice(&head.hash);
        }
    }
}

/// Reads `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (front, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(front)
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl StoreState {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 + 13 + 41 + 32);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.total);
        CounterBinding::encode(self.counter.as_ref(), &mut out);
        encode_audit(self.audit.as_ref(), &mut out);
        out.extend_from_slice(&self.mac);
        out
    }

    pub(super) fn decode(mut bytes: &[u8]) -> Option<Self> {
        let b = &mut bytes;
        let generation = be_u64(take(b, 8)?)?;
        let total: [u8; 32] = take(b, 32)?.try_into().ok()?;
        let counter = match take(b, 1)?[0] {
            0 => None,
            tag @ 1..=4 => {
                let index = u32::from_be_bytes(take(b, 4)?.try_into().ok()?);
                let offset = be_u64(take(b, 8)?)?;
                Some(CounterBinding {
                    at: if tag <= 2 {
                        CounterAt::TpmNv(index)
                    } else {
                        CounterAt::Token
                    },
                    offset: (tag % 2 == 0).then_some(offset),
                })
            }
            _ => return None,
        };
        let audit = match take(b, 1)?[0] {
            0 => None,
            1 => Some(Head {
                seq: be_u64(take(b, 8)?)?,
                hash: take(b, 32)?.try_into().ok()?,
            }),
            _ => return None,
        };
        let mac = take(b, 32)?.to_vec();
        if !b.is_empty() {
            return None;
        }
        Some(Self {
            generation,
            total,
            counter,
            audit,
            mac,
        })
    }

    /// The total as a number.
    pub(crate) fn total_sum(&self) -> Sum {
        Sum::from_bytes(&self.total).unwrap_or_default()
    }
}

/// The keys of the commitment, derived from the root secret by the keystore.
#[derive(Clone)]
pub struct CommitKeys {
    prf: hmac::Key,
    state: hmac::Key,
    store_id: [u8; 16],
}

impl std::fmt::Debug for CommitKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitKeys").finish_non_exhaustive()
    }
}

impl CommitKeys {
    /// Keys for the store `store_id`: `prf` for the rows' and digests' terms, `state` for the
    /// state's MAC (32 bytes each, from HKDF).
    pub fn new(prf: &[u8], state: &[u8], store_id: [u8; 16]) -> Self {
        Self {
            prf: hmac::Key::new(hmac::HMAC_SHA256, prf),
            state: hmac::Key::new(hmac::HMAC_SHA256, state),
            store_id,
        }
    }

    /// A row's term.
    pub(crate) fn row_term(&self, kind: RowKind, uuid: &[u8; 16], mac: &[u8]) -> Sum {
        let mut ctx = hmac::Context::with_key(&self.prf);
        ctx.update(b"keyhold commitment row v1\0");
        ctx.update(&[kind as u8]);
        ctx.update(uuid);
        ctx.update(mac);
        Self::sum_of(&ctx.sign())
    }

    /// A key's term in the total: its digest under its uuid.
    pub(crate) fn key_term(&self, uuid: &[u8; 16], digest: Sum) -> Sum {
        let mut ctx = hmac::Context::with_key(&self.prf);
        ctx.update(b"keyhold commitment key v1\0");
        ctx.update(uuid);
        ctx.update(&digest.to_bytes());
        Self::sum_of(&ctx.sign())
    }

    /// The total that `digests` (every key's) add up to.
    pub(crate) fn total_of(&self, digests: &BTreeMap<[u8; 16], Sum>) -> Sum {
        let mut total = Sum::default();
        for (uuid, digest) in digests {
            total.add(self.key_term(uuid, *digest));
        }
        total
    }

    fn sum_of(tag: &hmac::Tag) -> Sum {
        // HMAC-SHA256 tags are 32 bytes.
        Sum::from_bytes(tag.as_ref()).unwrap_or_default()
    }

    fn state_input(
        &self,
        generation: u64,
        total: &[u8; 32],
        counter: Option<&CounterBinding>,
        audit: Option<&Head>,
        meta_mac: &[u8],
    ) -> Vec<u8> {
        let mut input = Vec::with_capacity(192);
        input.extend_from_slice(b"keyhold store state v1\0");
        input.extend_from_slice(&self.store_id);
        input.extend_from_slice(&generation.to_be_bytes());
        input.extend_from_slice(total);
        CounterBinding::encode(counter, &mut input);
        encode_audit(audit, &mut input);
        input.extend_from_slice(&(meta_mac.len() as u32).to_be_bytes());
        input.extend_from_slice(meta_mac);
        input
    }

    /// The state for `generation`, `total`, `counter` and `audit`, MAC'd with the metadata MAC.
    pub(crate) fn state(
        &self,
        generation: u64,
        total: Sum,
        counter: Option<CounterBinding>,
        audit: Option<Head>,
        meta_mac: &[u8],
    ) -> StoreState {
        let total = total.to_bytes();
        let input = self.state_input(
            generation,
            &total,
            counter.as_ref(),
            audit.as_ref(),
            meta_mac,
        );
        let mac = hmac::sign(&self.state, &input);
        StoreState {
            generation,
            total,
            counter,
            audit,
            mac: mac.as_ref().to_vec(),
        }
    }

    /// Whether `state` carries keyhold's MAC (for this metadata MAC).
    pub(crate) fn state_ok(&self, state: &StoreState, meta_mac: &[u8]) -> bool {
        let expected = hmac::sign(
            &self.state,
            &self.state_input(
                state.generation,
                &state.total,
                state.counter.as_ref(),
                state.audit.as_ref(),
                meta_mac,
            ),
        );
        constant_time::verify_slices_are_equal(expected.as_ref(), &state.mac).is_ok()
    }
}

/// One row changed by a write: its MAC before (absent for a new row) and after (absent for a
/// deleted row).
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) kind: RowKind,
    pub(super) uuid: [u8; 16],
    pub(super) old: Option<Vec<u8>>,
    pub(super) new: Option<Vec<u8>>,
}

/// A key's (or token client's) uuid and its digest; `None` once none of its rows is left (a
/// client removed): the digest is deleted and adds nothing to the total, as for a uuid the store
/// never held.
pub(super) type Digest = ([u8; 16], Option<Sum>);

/// Applies `changes` to the digests (read with `digest`) and to `total`; returns the new digests
/// to write (or delete) and the new total.
pub(super) fn apply(
    keys: &CommitKeys,
    changes: &[Change],
    mut total: Sum,
    mut digest: impl FnMut(&[u8; 16]) -> Result<Option<Sum>>,
) -> Result<(Vec<Digest>, Sum)> {
    let mut by_key: BTreeMap<[u8; 16], Vec<&Change>> = BTreeMap::new();
    for change in changes {
        by_key.entry(change.uuid).or_default().push(change);
    }
    let mut digests = Vec::with_capacity(by_key.len());
    for (uuid, changes) in by_key {
        let old = digest(&uuid)?;
        let mut new = old.unwrap_or_default();
        if let Some(old) = old {
            total.sub(keys.key_term(&uuid, old));
        }
        for change in &changes {
            if let Some(mac) = &change.old {
                new.sub(keys.row_term(change.kind, &uuid, mac));
            }
            if let Some(mac) = &change.new {
                new.add(keys.row_term(change.kind, &uuid, mac));
            }
        }
        // Every row gone: only a removal makes the rows' terms add up to zero (else a chance of
        // 2^-256).
        let gone = new == Sum::default() && changes.iter().any(|c| c.new.is_none());
        if gone {
            digests.push((uuid, None));
        } else {
            total.add(keys.key_term(&uuid, new));
            digests.push((uuid, Some(new)));
        }
    }
    Ok((digests, total))
}

/// Recomputed from the rows present: every key's digest, and its rows by kind (for messages).
#[derive(Debug, Default)]
pub(crate) struct Recomputed {
    digests: BTreeMap<[u8; 16], (Sum, BTreeMap<RowKind, usize>)>,
}

impl Recomputed {
    /// Adds one row present in the store.
    pub(crate) fn add(&mut self, keys: &CommitKeys, kind: RowKind, uuid: &[u8; 16], mac: &[u8]) {
        let entry = self.digests.entry(*uuid).or_default();
        entry.0.add(keys.row_term(kind, uuid, mac));
        *entry.1.entry(kind).or_default() += 1;
    }

    /// The total these digests add up to.
    pub(crate) fn total(&self, keys: &CommitKeys) -> Sum {
        let mut total = Sum::default();
        for (uuid, (digest, _)) in &self.digests {
            total.add(keys.key_term(uuid, *digest));
        }
        total
    }

    /// Every key's digest.
    pub(crate) fn digests(&self) -> impl Iterator<Item = ([u8; 16], Sum)> + '_ {
        self.digests.iter().map(|(uuid, (d, _))| (*uuid, *d))
    }

    /// Compares with the stored digests and `state`: what differs, key by key.
    pub(crate) fn compare(
        &self,
        keys: &CommitKeys,
        stored: &BTreeMap<[u8; 16], Sum>,
        state: &StoreState,
    ) -> Vec<Mismatch> {
        let mut found = Vec::new();
        for (uuid, (digest, rows)) in &self.digests {
            match stored.get(uuid) {
                Some(expected) if expected == digest => {}
                Some(_) => found.push(Mismatch::Changed {
                    uuid: *uuid,
                    has_record: rows.contains_key(&RowKind::Key),
                }),
                None => found.push(Mismatch::Uncommitted { uuid: *uuid }),
            }
        }
        for uuid in stored.keys() {
            if !self.digests.contains_key(uuid) {
                found.push(Mismatch::Vanished { uuid: *uuid });
            }
        }
        let mut committed = Sum::default();
        for (uuid, digest) in stored {
            committed.add(keys.key_term(uuid, *digest));
        }
        if committed.to_bytes() != state.total {
            found.push(Mismatch::Digests);
        }
        found
    }
}

/// A difference between the rows present and the rows committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// The key's rows are not those committed: one deleted, re-inserted from an older copy, or
    /// duplicated (or, without `has_record`, its record deleted and other rows left).
    Changed { uuid: [u8; 16], has_record: bool },
    /// Rows of a key the store never committed (inserted from elsewhere).
    Uncommitted { uuid: [u8; 16] },
    /// A committed key none of whose rows is left.
    Vanished { uuid: [u8; 16] },
    /// The digests themselves were changed (rows and digests put back together, e.g. from an
    /// older copy): the store knows something changed, not which key.
    Digests,
}

/// The error for a store whose rows are not the committed ones.
pub(crate) fn tampered(what: String) -> Error {
    Error::StoreTampered { what }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn keys() -> CommitKeys {
        CommitKeys::new(&[1; 32], &[2; 32], [3; 16])
    }

    #[test]
    fn sums_carry_and_borrow_across_limbs_and_wrap() {
        let mut a = Sum::from_bytes(&[0xff; 32]).unwrap();
        let one = Sum::from_bytes(&{
            let mut b = [0u8; 32];
            b[31] = 1;
            b
        })
        .unwrap();
        a.add(one);
        assert_eq!(a.to_bytes(), [0u8; 32], "2^256 - 1 + 1 wraps to 0");
        a.sub(one);
        assert_eq!(a.to_bytes(), [0xff; 32], "0 - 1 wraps to 2^256 - 1");
        let mut b = Sum::from_bytes(&{
            let mut b = [0u8; 32];
            b[24..].copy_from_slice(&[0xff; 8]);
            b
        })
        .unwrap();
        b.add(one);
        let mut expected = [0u8; 32];
        expected[23] = 1;
        assert_eq!(b.to_bytes(), expected, "the carry reaches the next limb");
    }

    #[test]
    fn a_duplicated_row_does_not_cancel_out() {
        let k = keys();
        let uuid = [9; 16];
        let mut once = Recomputed::default();
        once.add(&k, RowKind::Event, &uuid, b"mac-a");
        let mut twice = Recomputed::default();
        twice.add(&k, RowKind::Event, &uuid, b"mac-a");
        twice.add(&k, RowKind::Event, &uuid, b"mac-a");
        let none = Recomputed::default();
        assert_ne!(twice.total(&k), once.total(&k));
        assert_ne!(twice.total(&k), none.total(&k));
    }

    #[test]
    fn incremental_changes_agree_with_recomputing() {
        let k = keys();
        let (a, b) = ([1; 16], [2; 16]);
        let change = |kind, uuid, old: Option<&[u8]>, new: Option<&[u8]>| Change {
            kind,
            uuid,
            old: old.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        let mut digests: BTreeMap<[u8; 16], Sum> = BTreeMap::new();
        let mut total = Sum::default();
        for batch in [
            vec![
                change(RowKind::Key, a, None, Some(b"a1")),
                change(RowKind::Event, a, None, Some(b"ae1")),
            ],
            vec![change(RowKind::Key, b, None, Some(b"b1"))],
            vec![
                change(RowKind::Key, a, Some(b"a1"), Some(b"a2")),
                change(RowKind::Version, a, None, Some(b"av2")),
                change(RowKind::Counter, a, None, Some(b"ac")),
            ],
            vec![
                change(RowKind::Version, a, Some(b"av2"), None),
                change(RowKind::Counter, a, Some(b"ac"), None),
            ],
        ] {
            let (new, t) = apply(&k, &batch, total, |u| Ok(digests.get(u).copied())).unwrap();
            total = t;
            for (uuid, digest) in new {
                match digest {
                    Some(d) => digests.insert(uuid, d),
                    None => digests.remove(&uuid),
                };
            }
        }
        let mut present = Recomputed::default();
        present.add(&k, RowKind::Key, &a, b"a2");
        present.add(&k, RowKind::Event, &a, b"ae1");
        present.add(&k, RowKind::Key, &b, b"b1");
        assert_eq!(present.total(&k), total);
        let state = k.state(4, total, None, None, b"meta");
        assert!(present.compare(&k, &digests, &state).is_empty());
        assert!(k.state_ok(&state, b"meta"));
        assert!(
            !k.state_ok(&state, b"other meta"),
            "the state covers the meta MAC"
        );

        // An older copy of a's record put back is named.
        let mut rolled = Recomputed::default();
        rolled.add(&k, RowKind::Key, &a, b"a1");
        rolled.add(&k, RowKind::Event, &a, b"ae1");
        rolled.add(&k, RowKind::Key, &b, b"b1");
        assert_eq!(
            rolled.compare(&k, &digests, &state),
            vec![Mismatch::Changed {
                uuid: a,
                has_record: true
            }]
        );
        // b deleted: vanished.
        let mut deleted = Recomputed::default();
        deleted.add(&k, RowKind::Key, &a, b"a2");
        deleted.add(&k, RowKind::Event, &a, b"ae1");
        assert_eq!(
            deleted.compare(&k, &digests, &state),
            vec![Mismatch::Vanished { uuid: b }]
        );
        // a's digest rolled back along with its rows: the total tells.
        let mut old_digests = digests.clone();
        let mut old_a = Recomputed::default();
        old_a.add(&k, RowKind::Key, &a, b"a1");
        old_a.add(&k, RowKind::Event, &a, b"ae1");
        old_digests.insert(a, old_a.digests().next().unwrap().1);
        assert_eq!(
            rolled.compare(&k, &old_digests, &state),
            vec![Mismatch::Digests]
        );
    }

    #[test]
    fn a_uuid_whose_every_row_is_removed_leaves_no_digest_and_nothing_in_the_total() {
        let k = keys();
        let client = [7; 16];
        let add = vec![Change {
            kind: RowKind::Client,
            uuid: client,
            old: None,
            new: Some(b"c1".to_vec()),
        }];
        let (added, total) = apply(&k, &add, Sum::default(), |_| Ok(None)).unwrap();
        let digest = added[0].1.unwrap();
        assert_ne!(total, Sum::default());
        let remove = vec![Change {
            kind: RowKind::Client,
            uuid: client,
            old: Some(b"c1".to_vec()),
            new: None,
        }];
        let (removed, total) = apply(&k, &remove, total, |_| Ok(Some(digest))).unwrap();
        assert_eq!(removed, vec![(client, None)]);
        assert_eq!(total, Recomputed::default().total(&k), "as if never added");
    }

    #[test]
    fn state_round_trips_and_rejects_other_lengths() {
        for counter in [
            None,
            Some(CounterBinding {
                at: CounterAt::TpmNv(0x0100_0001),
                offset: None,
            }),
            Some(CounterBinding {
                at: CounterAt::TpmNv(0x0100_0001),
                offset: Some(u64::MAX),
            }),
            Some(CounterBinding {
                at: CounterAt::Token,
                offset: None,
            }),
            Some(CounterBinding {
                at: CounterAt::Token,
                offset: Some(3),
            }),
        ] {
            let audit = counter.map(|_| Head {
                seq: 9,
                hash: [5; 32],
            });
            let s = keys().state(7, Sum::default(), counter, audit, b"m");
            assert_eq!(StoreState::decode(&s.encode()), Some(s.clone()));
            assert_eq!(StoreState::decode(&s.encode()[1..]), None);
            assert!(keys().state_ok(&s, b"m"));
        }
        let a = keys().state(7, Sum::default(), None, None, b"m");
        let mut b = a.clone();
        b.counter = Some(CounterBinding {
            at: CounterAt::TpmNv(1),
            offset: Some(0),
        });
        assert!(!keys().state_ok(&b, b"m"), "the binding is under the MAC");
        // Which device, too: the same offset on a token is another binding.
        let tpm = keys().state(7, Sum::default(), b.counter, None, b"m");
        let mut token = tpm.clone();
        token.counter = Some(CounterBinding {
            at: CounterAt::Token,
            offset: Some(0),
        });
        assert!(
            !keys().state_ok(&token, b"m"),
            "the device is under the MAC"
        );
        let mut c = a.clone();
        c.audit = Some(Head {
            seq: 1,
            hash: [0; 32],
        });
        assert!(
            !keys().state_ok(&c, b"m"),
            "the audit head is under the MAC"
        );
    }
}
