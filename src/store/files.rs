//! The store's directory and file: made private, checked private, and SQLite told to erase
//! what is deleted.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Destroyed keys' sealed blobs must not linger in the file's free pages, where a copy of the
/// file (a backup, a stolen disk) would still hold them: SQLite overwrites deleted content with
/// zeros. Set on every connection, as SQLite keeps it per connection.
pub(super) fn secure_delete(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "secure_delete", "ON")
}

/// Makes `dir` the store's private directory: created 0700 by one `mkdir` (its parents as usual),
/// or, if it already exists, accepted only when it is a real directory of this user and empty,
/// then made 0700.
///
/// One `mkdir` of the final directory, not a check followed by a create: under a shared parent,
/// someone else could create the directory in between and own it.
pub(super) fn make_private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(
                format!("create store directory {}", dir.display()),
                e,
            ))
        }
    }
    let meta =
        fs::symlink_metadata(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            format!("{} exists and is not a directory", dir.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::InvalidInput(format!(
            "{} belongs to uid {}, not to you (uid {me}): give init a directory of your own",
            dir.display(),
            meta.uid()
        )));
    }
    // Only an empty directory becomes a store (and private): `init --store ~` must not change
    // the permissions of a directory that holds other things.
    let empty = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .next()
        .is_none();
    if !empty {
        return Err(Error::InvalidInput(format!(
            "{} is not empty: give init a new or empty directory for the store",
            dir.display()
        )));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("make {} private", dir.display()), e))
}

/// Refuses a store directory or database that another user owns or that group or others may
/// write: whoever can write them can replace the sealed root secret or the records.
pub(super) fn check_private(dir: &Path, path: &Path, what: &str, mode: &str) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let me = rustix::process::geteuid().as_raw();
    let reason = if meta.uid() != me {
        format!(
            "the {what} {} belongs to uid {}, not to you (uid {me}): run keyhold as its owner, \
             or `chown {me} {}` if the store is yours",
            path.display(),
            meta.uid(),
            path.display()
        )
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "the {what} {} is writable by group or others (mode {:o}): anyone who can write it \
             can replace the store's keys; run `chmod {mode} {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        )
    } else {
        return Ok(());
    };
    Err(Error::StoreUnusable {
        path: dir.to_path_buf(),
        reason,
        source: None,
    })
}
