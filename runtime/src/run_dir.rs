//! Guarding a run directory: the lock a live run holds, and what `--overwrite` may delete.
//!
//! **The lock.** A run takes an exclusive advisory lock (`flock` on Unix, `LockFileEx` on
//! Windows, through [`std::fs::File::try_lock`]) on `RUN_DIR/tandem.lock` before it touches
//! anything else in the directory, and holds it until the process is done with the directory.
//! The holder writes its pid into the file. A second run into the directory — fresh, with
//! `--overwrite`, or `--resume` — does not wait: it fails at once with an error naming the
//! directory and the holder's pid, having deleted and written nothing. The operating system
//! drops the lock when the holder exits, however it exits (SIGKILL included), so a crashed run
//! never leaves a stale lock behind; the file itself stays (removing it would let two processes
//! lock two different files of the same name).
//!
//! **Overwriting.** `--overwrite` deletes only what is recognisably a tandem run directory:
//! one whose `config.toml` is a resolved tandem config (`tandem run`'s has `steps` and
//! `[placement]`, `tandem sft`'s `[train] epochs` and `[placement]`, `tandem train-rm`'s has
//! `[model]`, `[train]` and `[placement]`) and that also
//! holds `tandem.lock`, `metrics.jsonl`, `checkpoints/` or `reward_model/`. Without
//! `--overwrite`, a directory that holds an earlier run is refused ([`refuse_earlier_run`]). Anything else that is not
//! empty is refused with an error that names the directory, as are the working directory and
//! its parents (so `--run-dir . --overwrite` cannot wipe the project it is run from). The lock
//! is taken before deleting, so a live run is never deleted; everything but the lock file is
//! removed, and the lock is kept for the new run.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = "tandem.lock";

/// An exclusive lock on a run directory, released when dropped (or when the process exits).
#[derive(Debug)]
pub struct RunDirLock {
    dir: PathBuf,
    // Held open for the lock's lifetime; closing it releases the lock.
    _file: File,
}

impl RunDirLock {
    /// Creates `run_dir` if needed and locks it for this process; fails with
    /// [`RuntimeError::Config`] naming the directory and the holder's pid when another process
    /// holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| RuntimeError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "a process whose pid is not written yet".to_string(),
                };
                return Err(RuntimeError::Config {
                    path: run_dir.to_path_buf(),
                    msg: format!(
                        "this run directory is in use by another tandem run ({holder} holds {LOCK_FILE}); \
                         nothing was changed. Wait for that run to finish or stop it (Ctrl-C or SIGTERM \
                         checkpoints it), or choose another --run-dir"
                    ),
                });
            }
            Err(TryLockError::Error(e)) => return Err(RuntimeError::io(&path, e)),
        }
        let wrote = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush());
        wrote.map_err(|e| RuntimeError::io(&path, e))?;
        Ok(Self {
            dir: run_dir.to_path_buf(),
            _file: file,
        })
    }

    /// `--overwrite`: checks that `run_dir` may be deleted ([`check_overwritable`]), locks it,
    /// and removes everything in it but the lock file.
    pub fn acquire_for_overwrite(run_dir: &Path) -> Result<Self, RuntimeError> {
        check_overwritable(run_dir)?;
        let lock = Self::acquire(run_dir)?;
        lock.clear()?;
        Ok(lock)
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes every entry of the directory except the lock file.
    fn clear(&self) -> Result<(), RuntimeError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| RuntimeError::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| RuntimeError::io(&self.dir, e))?;
            if entry.file_name() == LOCK_FILE {
                continue;
            }
            let path = entry.path();
            let is_dir = entry.file_type().map_err(|e| RuntimeError::io(&path, e))?.is_dir();
            let removed = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| RuntimeError::io(&path, e))?;
        }
        Ok(())
    }
}

/// Whether `dir` is recognisably a tandem run directory: a resolved tandem `config.toml` plus
/// the lock file, `metrics.jsonl` or `checkpoints/`.
pub fn is_run_dir(dir: &Path) -> bool {
    let config = match std::fs::read_to_string(dir.join("config.toml")) {
        Ok(text) => text,
        Err(_) => return false,
    };
    let resolved = toml::from_str::<toml::Table>(&config).is_ok_and(|t| {
        let table = |k: &str| t.get(k).is_some_and(|v| v.is_table());
        let run = t.get("steps").is_some_and(|v| v.is_integer()) && table("placement");
        let sft = t
            .get("train")
            .and_then(|x| x.get("epochs"))
            .is_some_and(|v| v.is_integer())
            && table("placement");
        let train_rm = table("model") && table("train") && table("placement");
        run || sft || train_rm
    });
    resolved
        && (dir.join(LOCK_FILE).is_file()
            || dir.join("metrics.jsonl").is_file()
            || dir.join("checkpoints").is_dir()
            || dir.join("reward_model").is_dir())
}

/// Refuses a fresh run into `run_dir` when it holds an earlier one: a non-empty
/// `metrics.jsonl`, `checkpoints/` or a trained `reward_model/` or `policy/`. Used by `tandem
/// train-rm` (a fresh `tandem run` checks the same through its resume point).
pub fn refuse_earlier_run(run_dir: &Path) -> Result<(), RuntimeError> {
    let has = |name: &str| {
        let p = run_dir.join(name);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => true,
            Ok(m) => m.len() > 0,
            Err(_) => false,
        }
    };
    match ["metrics.jsonl", "checkpoints", "reward_model", "policy"].into_iter().find(|n| has(n)) {
        Some(found) => Err(RuntimeError::Config {
            path: run_dir.to_path_buf(),
            msg: format!(
                "this run directory holds another run (it has {found}); replace it with --overwrite or choose another --run-dir"
            ),
        }),
        None => Ok(()),
    }
}

/// Refuses to let `--overwrite` delete `run_dir` unless it is missing, empty, or a tandem run
/// directory ([`is_run_dir`]); the working directory and its parents are always refused.
pub fn check_overwritable(run_dir: &Path) -> Result<(), RuntimeError> {
    let refuse = |msg: String| {
        Err(RuntimeError::Config {
            path: run_dir.to_path_buf(),
            msg,
        })
    };
    let meta = match std::fs::symlink_metadata(run_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RuntimeError::io(run_dir, e)),
    };
    if !meta.is_dir() {
        return refuse("--overwrite: this is not a directory (a symbolic link or a file); nothing was deleted".into());
    }
    let canonical = run_dir.canonicalize().map_err(|e| RuntimeError::io(run_dir, e))?;
    if let Ok(cwd) = std::env::current_dir().and_then(|d| d.canonicalize()) {
        if cwd.starts_with(&canonical) {
            return refuse(format!(
                "--overwrite: refusing to delete the working directory ({}) or one of its parents; nothing was deleted",
                cwd.display()
            ));
        }
    }
    let empty = std::fs::read_dir(run_dir)
        .map_err(|e| RuntimeError::io(run_dir, e))?
        .next()
        .is_none();
    if empty || is_run_dir(run_dir) {
        return Ok(());
    }
    refuse(format!(
        "--overwrite: this is not a tandem run directory (it has no resolved config.toml with \
         {LOCK_FILE}, metrics.jsonl or checkpoints/), so it is not deleted; remove it yourself or \
         choose another --run-dir"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(dir: &Path) {
        std::fs::create_dir_all(dir.join("checkpoints/step-2")).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            "steps = 4\n[placement]\nthreads_per_device = 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\":0}\n").unwrap();
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunDirLock::acquire(tmp.path()).unwrap();
        let err = RunDirLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");
        drop(first);
        RunDirLock::acquire(tmp.path()).unwrap();
    }

    #[test]
    fn overwrite_refuses_a_live_run_and_deletes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        fake_run(tmp.path());
        let _live = RunDirLock::acquire(tmp.path()).unwrap();
        let err = RunDirLock::acquire_for_overwrite(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another tandem run"), "{err}");
        assert!(tmp.path().join("metrics.jsonl").is_file());
        assert!(tmp.path().join("checkpoints/step-2").is_dir());
    }

    #[test]
    fn overwrite_clears_a_run_directory_but_keeps_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        fake_run(tmp.path());
        let lock = RunDirLock::acquire_for_overwrite(tmp.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(lock.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![LOCK_FILE.to_string()]);
    }

    #[test]
    fn overwrite_refuses_directories_that_are_not_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("precious.txt"), "keep me").unwrap();
        // A config.toml that is not tandem's does not make it a run directory either.
        std::fs::write(victim.join("config.toml"), "[package]\nname = \"x\"\n").unwrap();
        std::fs::write(victim.join("metrics.jsonl"), "").unwrap();
        let err = RunDirLock::acquire_for_overwrite(&victim).unwrap_err().to_string();
        assert!(err.contains("not a tandem run directory"), "{err}");
        assert_eq!(std::fs::read_to_string(victim.join("precious.txt")).unwrap(), "keep me");
        assert!(!victim.join(LOCK_FILE).exists());
        // Missing and empty directories are fine.
        check_overwritable(&tmp.path().join("missing")).unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        check_overwritable(&empty).unwrap();
    }

    #[test]
    fn overwrite_refuses_the_working_directory_and_its_parents() {
        let cwd = std::env::current_dir().unwrap();
        for dir in [Path::new("."), Path::new(".."), cwd.as_path()] {
            let err = check_overwritable(dir).unwrap_err().to_string();
            assert!(err.contains("working directory"), "{}: {err}", dir.display());
        }
    }
}
