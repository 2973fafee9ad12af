//! Backups: the whole store (its database — records, sealed blobs, the sealed root — and its
//! audit log) in one file, encrypted and authenticated under a key derived from the root secret.
//!
//! A backup holds no key material in clear, and no more than the store does: software keys are
//! sealed under the root as in the store, token and TPM keys are references to their devices.
//! Its header (in clear, authenticated with the rest) carries the sealed root secret, so that a
//! backup restores wherever its sealer opens: the passphrase, the TPM (or its recovery
//! passphrase), the token — or recovery shares of the root.
//!
//! File: `KHBACKUP`, a 16-bit format version, a 32-bit header length, the header (JSON), a 96-bit
//! nonce, then AES-256-GCM over the database image followed by the audit log, with everything
//! before the nonce as associated data.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};

use super::root::{check_and_settle, check_store, derive_keys, settle, DerivedKeys};
use super::{anchor, Keystore};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::sealer::shares::{self, Share};
use crate::sealer::{SealedRoot, Sealer};
use crate::store::{FileAnchor, Staged, Store};

const MAGIC: &[u8; 8] = b"KHBACKUP";
const FORMAT: u16 = 1;
/// Backup files end in this.
pub const EXTENSION: &str = "khbackup";
/// A header is a few hundred bytes; anything near this is not a keyhold backup.
const MAX_HEADER: usize = 1 << 20;

/// What a backup's header says (in clear, authenticated with the body).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Header {
    store_id: String,
    generation: u64,
    created_at: i64,
    keyhold: String,
    keys: usize,
    sealer: String,
    sealer_params: String,
    sealed_root: String,
    database_bytes: u64,
    audit_bytes: u64,
}

/// A backup written by [`Keystore::backup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// The file.
    pub path: PathBuf,
    /// The store's ID, hex.
    pub store_id: String,
    /// The store's generation when the backup was taken.
    pub generation: u64,
    /// When (seconds since the epoch).
    pub created_at: i64,
    /// How many key records it holds (destroyed keys' tombstones included).
    pub keys: usize,
    /// Whether it holds an audit log.
    pub audit_log: bool,
}

/// Where the root secret of a backup comes from.
#[derive(Debug)]
pub enum RootSource<'a> {
    /// The backup's own seal, opened by this sealer (of the kind the seal records).
    Sealer(&'a dyn Sealer),
    /// Recovery shares of the root (`keyhold recovery split`), for a seal that cannot be opened.
    Shares(&'a [Share]),
}

/// What [`Backup::restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The store restored.
    pub store: PathBuf,
    /// The generation the backup was taken at.
    pub backup_generation: u64,
    /// The store's generation now: past the backup's and past its anchor's.
    pub generation: u64,
    /// How many key records came back.
    pub keys: usize,
    /// Whether the backup's audit log was put in place (only where the store had none: a
    /// store's own log is newer than any backup's, and is kept).
    pub audit_log_restored: bool,
}

impl Keystore {
    /// Writes a backup of this store into `dir` (made 0700 if absent): one file, 0600, named
    /// `keyhold-STOREID-gGENERATION-TIME.khbackup`, written under a temporary name and renamed
    /// once complete. Buffered audit entries are written first.
    ///
    /// # Errors
    /// I/O and storage errors.
    pub fn backup(&self, dir: &Path) -> Result<BackupInfo> {
        self.audit_sink().flush()?;
        let (image, facts) = self.store.image()?;
        let audit = match fs::read(self.store.dir().join(crate::audit::FILE)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("read the audit log for a backup", e)),
        };
        // What the image itself holds (read in its transaction): the seal and generation read at
        // open may be older.
        let created_at = crate::time::now();
        let header = Header {
            store_id: crate::hex::encode(&self.store_id),
            generation: facts.generation,
            created_at,
            keyhold: env!("CARGO_PKG_VERSION").to_owned(),
            keys: facts.keys,
            sealer: facts.sealed_root.sealer.clone(),
            sealer_params: crate::hex::encode(&facts.sealed_root.params),
            sealed_root: crate::hex::encode(&facts.sealed_root.blob),
            database_bytes: image.len() as u64,
            audit_bytes: audit.len() as u64,
        };
        let mut body = image;
        body.extend_from_slice(&audit);
        let bytes = seal_backup(&self.backup_key, &header, body)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("create the backup directory {}", dir.display()), e))?;
        let name = format!(
            "keyhold-{}-g{}-{}.{EXTENSION}",
            header.store_id,
            header.generation,
            crate::time::format_utc(created_at).replace([':', '-'], "")
        );
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("write the backup {}", path.display()), e));
        }
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        tracing::info!(backup = %path.display(), generation = header.generation, "backed up the store");
        self.audit_store_event("store-backup")?;
        Ok(BackupInfo {
            path,
            store_id: header.store_id,
            generation: header.generation,
            created_at,
            keys: header.keys,
            audit_log: !audit.is_empty(),
        })
    }
}

fn seal_backup(
    key: &crate::secret::SecretBytes,
    header: &Header,
    body: Vec<u8>,
) -> Result<Vec<u8>> {
    let header_json =
        serde_json::to_vec(header).map_err(|_| Error::crypto("encode a backup header"))?;
    let mut out = Vec::with_capacity(body.len() + header_json.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    out.extend_from_slice(&(header_json.len() as u32).to_be_bytes());
    out.extend_from_slice(&header_json);
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| Error::crypto("make a backup nonce"))?;
    let aead = aead_key(key)?;
    let mut sealed = body;
    aead.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(out.as_slice()),
        &mut sealed,
    )
    .map_err(|_| Error::crypto("encrypt a backup"))?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn aead_key(key: &crate::secret::SecretBytes) -> Result<LessSafeKey> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.expose())
            .map_err(|_| Error::crypto("load the backup key"))?,
    ))
}

/// A backup file, read and parsed (its header only: nothing is decrypted yet).
#[derive(Debug)]
pub struct Backup {
    path: PathBuf,
    header: Header,
    store_id: [u8; 16],
    sealed_root: SealedRoot,
    /// Where the nonce starts: everything before is the associated data.
    body_at: usize,
    bytes: Vec<u8>,
}

impl Backup {
    /// Reads the backup at `path`, or, for a directory, its newest backup (highest generation,
    /// then latest time).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a file that is not a keyhold backup (or a directory without
    /// one); I/O errors.
    pub fn open(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            newest_in(path)?
        } else {
            path.to_path_buf()
        };
        let bytes =
            fs::read(&file).map_err(|e| Error::io(format!("read {}", file.display()), e))?;
        let not_backup = |why: &str| {
            Error::InvalidInput(format!(
                "{} is not a keyhold backup ({why})",
                file.display()
            ))
        };
        if bytes.len() < 14 || &bytes[..8] != MAGIC {
            return Err(not_backup("no keyhold backup header"));
        }
        let format = u16::from_be_bytes([bytes[8], bytes[9]]);
        if format != FORMAT {
            return Err(not_backup(&format!(
                "format {format}: this keyhold reads format {FORMAT}; use the keyhold that made it"
            )));
        }
        let len = u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]) as usize;
        let body_at = 14 + len;
        if len > MAX_HEADER || bytes.len() < body_at + NONCE_LEN + 16 {
            return Err(not_backup("cut short or damaged"));
        }
        let header: Header = serde_json::from_slice(&bytes[14..body_at])
            .map_err(|_| not_backup("its header is damaged"))?;
        let decode = |hex: &str, what: &str| {
            crate::hex::decode(hex).ok_or_else(|| not_backup(&format!("its {what} is damaged")))
        };
        let store_id: [u8; 16] = decode(&header.store_id, "store ID")?
            .try_into()
            .map_err(|_| not_backup("its store ID is damaged"))?;
        let sealed_root = SealedRoot {
            sealer: header.sealer.clone(),
            params: decode(&header.sealer_params, "seal")?,
            blob: decode(&header.sealed_root, "seal")?,
        };
        Ok(Self {
            path: file,
            header,
            store_id,
            sealed_root,
            body_at,
            bytes,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The seal of the root secret, as the header carries it (authenticated once opened).
    pub fn sealed_root(&self) -> &SealedRoot {
        &self.sealed_root
    }

    /// The store's ID.
    pub fn store_id(&self) -> [u8; 16] {
        self.store_id
    }

    /// The generation the backup was taken at (authenticated once opened).
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// Verifies the whole backup under its root secret — the encryption's tag, the database's
    /// metadata MAC, every row's MAC and the commitment — and only then puts it in place as the
    /// store in `to` (a store of the same ID, replaced; or a new or empty directory). The
    /// restored store's generation is taken past the backup's and past the anchor file's, and it
    /// is anchored afresh (a TPM counter of the configuration or the sealer): a restore is the
    /// legitimate way back to an older state.
    ///
    /// # Errors
    /// [`Error::Unseal`] (the seal does not open, the shares are not of this root);
    /// [`Error::Integrity`] for a backup changed or damaged (nothing is changed then);
    /// [`Error::InvalidInput`] for a directory holding another store, or not empty; I/O,
    /// storage and device errors.
    pub fn restore(&self, root: RootSource<'_>, to: &Path, config: &Config) -> Result<Restored> {
        let (root, sealer) = match root {
            RootSource::Sealer(sealer) => (
                sealer.unseal(&self.sealed_root, &self.store_id)?,
                Some(sealer),
            ),
            RootSource::Shares(shares) => (shares::combine(shares, &self.store_id)?, None),
        };
        let keys = derive_keys(&root, &self.store_id)?;
        let body = self.open_body(&keys)?;
        let database_bytes = usize::try_from(self.header.database_bytes)
            .ok()
            .filter(|&n| n <= body.len())
            .ok_or_else(|| self.damaged("its lengths do not add up"))?;
        let (image, audit) = body.split_at(database_bytes);
        if to.join(crate::store::DB_FILE).exists() {
            // A database that does not open is not replaced blindly: it may be another store's.
            let existing = Store::open(to)?;
            if existing.meta().store_id != self.store_id {
                return Err(Error::InvalidInput(format!(
                    "{} holds another store ({}), not the one backed up ({}): restore into a new \
                     or empty directory with --to",
                    to.display(),
                    crate::hex::encode(&existing.meta().store_id),
                    self.header.store_id
                )));
            }
        }
        let staged = Staged::new(to, image)?;
        let (keys_count, generation) = self.check_staged(&staged, &keys, to, config, sealer)?;
        let audit_path = to.join(crate::audit::FILE);
        let audit_log_restored = !audit.is_empty() && !audit_path.exists();
        if audit_log_restored {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&audit_path)
                .and_then(|mut f| f.write_all(audit).and_then(|()| f.sync_all()))
                .map_err(|e| Error::io(format!("write {}", audit_path.display()), e))?;
        }
        staged.install()?;
        // Opened as every command opens it: the commitment again, the anchor file (now behind
        // it), and a TPM counter bound afresh.
        let mut store = Store::open(to)?;
        check_and_settle(&mut store, &keys, config.store.anchor_dir().as_deref())?;
        anchor::bind(&mut store, sealer, config, &keys)?;
        if audit_log_restored {
            // The log put back ends where the backup's did, before what the anchor file may
            // recorded of the lost one: its head is the one to compare with from now on.
            let verified = crate::audit::AuditLog::new(&audit_path, &keys.audit_mac).verify()?;
            if let (Some(anchor), true) = (store.anchor(), verified.entries > 0) {
                anchor.set_audit(crate::audit::Head {
                    seq: verified.entries,
                    hash: verified.head,
                })?;
            }
        }
        tracing::info!(
            store = %to.display(),
            backup = %self.path.display(),
            generation,
            "restored the store from a backup"
        );
        Keystore::with_root(store, &keys, config)?.audit_store_event("store-restore")?;
        Ok(Restored {
            store: to.to_path_buf(),
            backup_generation: self.header.generation,
            generation,
            keys: keys_count,
            audit_log_restored,
        })
    }

    /// Opens the staged database under the root: its metadata (the same seal as the header's),
    /// every row and the commitment; then takes its generation past the anchor file's.
    fn check_staged(
        &self,
        staged: &Staged,
        keys: &DerivedKeys,
        to: &Path,
        config: &Config,
        sealer: Option<&dyn Sealer>,
    ) -> Result<(usize, u64)> {
        let mut store = Store::open(staged.dir())?;
        let meta = store.meta();
        if meta.store_id != self.store_id || meta.sealed_root != self.sealed_root {
            return Err(self.damaged("its header and its database disagree"));
        }
        let checked = check_store(&store, keys, None)?;
        settle(&mut store, keys, checked)?;
        if store.meta().state.as_ref().map(|s| s.generation) != Some(self.header.generation) {
            return Err(self.damaged("its header and its database disagree"));
        }
        // Past every generation this store is known to have had here: its anchor file's, and the
        // store being replaced (read unauthenticated, only ever to go higher).
        let anchored = config
            .store
            .anchor_dir()
            .and_then(|dir| FileAnchor::new(&dir, &self.store_id).read().ok().flatten())
            .unwrap_or(0);
        let replaced = Store::open(to)
            .ok()
            .and_then(|s| s.meta().state.as_ref().map(|st| st.generation))
            .unwrap_or(0);
        // A restore is accepted as current: with a TPM, bound to the counter where it stands.
        let rebind_at = super::anchor::counter_for(&store, sealer, config, keys)?.map(|c| c.at());
        let generation =
            store.restart_generation(anchored.max(replaced).saturating_add(1), rebind_at)?;
        Ok((store.keys(None)?.len(), generation))
    }

    fn open_body(&self, keys: &DerivedKeys) -> Result<Vec<u8>> {
        let aad = &self.bytes[..self.body_at];
        let nonce: [u8; NONCE_LEN] = self.bytes[self.body_at..self.body_at + NONCE_LEN]
            .try_into()
            .map_err(|_| self.damaged("cut short"))?;
        let mut body = self.bytes[self.body_at + NONCE_LEN..].to_vec();
        let plain_len = aead_key(&keys.backup_key)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| {
                self.damaged(
                    "it fails its authentication: it was changed or damaged, or it is not of \
                     this root secret",
                )
            })?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }

    fn damaged(&self, why: &str) -> Error {
        Error::Integrity {
            what: format!(
                "the backup {} {why}; nothing was restored",
                self.path.display()
            ),
        }
    }
}

/// The newest backup in `dir`: the highest generation its header states (authenticated when it is
/// opened, unlike the file's name), then the latest time.
fn newest_in(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<((u64, i64), PathBuf)> = None;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))? {
        let path = entry
            .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
            .path();
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("keyhold-") && n.ends_with(&format!(".{EXTENSION}")));
        if !named {
            continue;
        }
        // A file that is not a backup (or is damaged) is passed over here; restoring it by name
        // says what is wrong with it.
        let Ok(backup) = Backup::open(&path) else {
            continue;
        };
        let key = (backup.header.generation, backup.header.created_at);
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, path));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} holds no keyhold backup (keyhold-….{EXTENSION})",
            dir.display()
        ))
    })
}
