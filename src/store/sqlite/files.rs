//! The files of one SQLite store on disk, as the writer knows them: the database, its
//! write-ahead log and shared-memory index, and the serving lock.
//!
//! SQLite keeps writing into files that were unlinked under it (a cleanup job, a volume mixed
//! up, `rm -rf` of the data directory) and reports success; after a restart none of it exists.
//! The writer therefore remembers which files (device and inode) it opened and checks, after
//! each commit and before anyone is answered, that the paths still lead to them.

use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// A file's identity: the same path may later hold another file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    device: u64,
    inode: u64,
}

impl FileId {
    /// The identity of the file at `path`, or `None` when there is none.
    pub fn of(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(Self::from_metadata(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[cfg(unix)]
    fn from_metadata(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            device: meta.dev(),
            inode: meta.ino(),
        }
    }

    /// Elsewhere only presence is checked.
    #[cfg(not(unix))]
    fn from_metadata(_meta: &std::fs::Metadata) -> Self {
        Self {
            device: 0,
            inode: 0,
        }
    }
}

fn beside(database: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", database.display()))
}

/// What changed under the writer.
#[derive(Debug)]
pub enum Changed {
    /// The database file is gone or another one is at its path.
    Database(String),
    /// The database file is still there, but its log or index is not the one being written.
    Log(String),
}

/// The database's files as the writer's connection opened them.
#[derive(Debug, Clone)]
pub struct StoreFiles {
    database: FileId,
    /// The log and the index appear with the first transaction; `None` until then.
    wal: Option<FileId>,
    shm: Option<FileId>,
}

impl StoreFiles {
    /// Records the files at `path` just after a connection opened `database` there.
    pub fn read(path: &Path, database: FileId) -> Self {
        Self {
            database,
            wal: FileId::of(&beside(path, "-wal")).ok().flatten(),
            shm: FileId::of(&beside(path, "-shm")).ok().flatten(),
        }
    }

    /// Whether `path` still holds the database first opened (before opening it again).
    pub fn same_database(&self, path: &Path) -> Result<(), String> {
        match FileId::of(path) {
            Ok(Some(id)) if id == self.database => Ok(()),
            Ok(Some(_)) => Err(format!(
                "the database file {} was replaced by another file while labelhook was serving",
                path.display()
            )),
            Ok(None) => Err(format!(
                "the database file {} was removed while labelhook was serving",
                path.display()
            )),
            // Cannot look (directory unreadable for a moment): the next open tells.
            Err(_) => Ok(()),
        }
    }

    /// Whether every file written is still the one at its path.
    pub fn check(&mut self, path: &Path) -> Result<(), Changed> {
        self.same_database(path).map_err(Changed::Database)?;
        for (slot, suffix, what) in [
            (&mut self.wal, "-wal", "write-ahead log"),
            (&mut self.shm, "-shm", "shared-memory index"),
        ] {
            let file = beside(path, suffix);
            match (FileId::of(&file), *slot) {
                (Ok(Some(now)), Some(was)) if now == was => {}
                (Ok(Some(now)), None) => *slot = Some(now),
                (Ok(None), None) | (Err(_), _) => {}
                (Ok(_), Some(_)) => {
                    return Err(Changed::Log(format!(
                        "the {what} {} was removed or replaced while labelhook was serving",
                        file.display()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// `<database>.lock`, held for as long as this value lives: one server per SQLite database.
#[derive(Debug)]
pub struct ServingLock {
    path: PathBuf,
    id: Option<FileId>,
    _file: std::fs::File,
}

impl ServingLock {
    /// Takes the lock beside `database`, creating the directory and the file when missing.
    pub fn take(database: &Path) -> Result<Self, StoreError> {
        let path = beside(database, ".lock");
        let unavailable =
            |e: std::io::Error| StoreError::unavailable(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(unavailable)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(format!(
                    "another labelhook server is using {} (one server per SQLite database; \
                     use PostgreSQL for several)",
                    database.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(unavailable(e)),
        }
        let id = file
            .metadata()
            .ok()
            .map(|meta| FileId::from_metadata(&meta));
        Ok(Self {
            path,
            id,
            _file: file,
        })
    }

    /// Whether the path still leads to the locked file (nobody removed it to start another
    /// server).
    pub fn still_at_path(&self) -> bool {
        matches!(FileId::of(&self.path), Ok(Some(now)) if Some(now) == self.id)
    }
}
