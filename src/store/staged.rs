//! A database image being restored (see `Keystore`'s restore): staged beside the store's
//! database, checked there, moved into place by one rename.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{make_private_dir, DB_FILE};
use crate::error::{Error, Result};

/// A database image being restored: written into a private directory beside the store's
/// database (so that the final rename stays on one filesystem), opened and checked from there,
/// and moved into place only by [`Staged::install`]. Dropped before, it is removed.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    target: PathBuf,
}

impl Staged {
    /// Stages `image` for the store directory `target` (made private if new: it must then be
    /// absent or empty, as for `init`).
    ///
    /// # Errors
    /// I/O errors; [`Error::InvalidInput`] for a directory that is not empty and holds no store.
    pub fn new(target: &Path, image: &[u8]) -> Result<Self> {
        if !target.join(DB_FILE).is_file() {
            make_private_dir(target)?;
        }
        // What an interrupted restore left behind (its staging directory: a database image and
        // nothing else) goes first.
        if let Ok(entries) = fs::read_dir(target) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".restore-") {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = target.join(format!(".restore-{}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let staged = Self {
            dir,
            target: target.to_path_buf(),
        };
        let db = staged.dir.join(DB_FILE);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&db)
            .map_err(|e| Error::io(format!("create {}", db.display()), e))?;
        std::io::Write::write_all(&mut file, image)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("write {}", db.display()), e))?;
        Ok(staged)
    }

    /// The directory to open the staged store from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged database into the store directory in one rename, replacing the store's
    /// (and dropping its rollback journal, which belongs to the database replaced).
    ///
    /// # Errors
    /// I/O errors; the store is then as it was.
    pub fn install(self) -> Result<()> {
        let db = self.target.join(DB_FILE);
        let journal = self.target.join(format!("{DB_FILE}-journal"));
        // Moved aside (not deleted) first: if the rename below fails, it goes back with the
        // database it belongs to.
        let aside = self.dir.join(format!("{DB_FILE}-journal.replaced"));
        let moved_aside = match fs::rename(&journal, &aside) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("move {} aside", journal.display()), e)),
        };
        if let Err(e) = fs::rename(self.dir.join(DB_FILE), &db) {
            if moved_aside {
                let _ = fs::rename(&aside, &journal);
            }
            return Err(Error::io(
                format!("move the restored database to {}", db.display()),
                e,
            ));
        }
        if let Ok(dir) = fs::File::open(&self.target) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
