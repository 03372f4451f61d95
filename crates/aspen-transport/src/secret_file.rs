//! Reading a cluster secret or client token from a file, the way every Aspen binary takes
//! secrets so that none has to appear on a command line (where every local user can read
//! it): the file's contents without surrounding whitespace, bounded in size, with a warning
//! when users other than the file's owner can read it. The node's `--*-file` settings and
//! aspen-cli's `--token-file`, `--admin-token-file` and cluster-dir token files all read
//! through here.

use std::io::Read;
use std::path::Path;

use aspen_api::Secret;

/// Largest file a secret or token is read from: a secret is a line, so anything bigger is
/// the wrong file.
pub const SECRET_FILE_BYTES_MAX: u64 = 4096;
/// Permission bits that give users other than a file's owner any access to it; a file
/// holding a secret should have none of them (mode 0600).
pub const NOT_OWNER_MODE_BITS: u32 = 0o077;

/// Why a secret file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than any secret can be.
    #[error("{path} is larger than {SECRET_FILE_BYTES_MAX} bytes: not a secret file")]
    TooLarge {
        /// The file.
        path: String,
    },
}

impl SecretFileError {
    /// Whether the file does not exist (callers with a fallback treat that as "not given").
    pub fn is_not_found(&self) -> bool {
        matches!(self, SecretFileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Reads a secret from `path`: its contents without surrounding whitespace (so a trailing
/// newline does not count), at most [`SECRET_FILE_BYTES_MAX`] bytes. Warns, naming `what`
/// the file holds, when users other than the owner can read it.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Secret, SecretFileError> {
    let read_error = |source: std::io::Error| SecretFileError::Read { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    file.take(SECRET_FILE_BYTES_MAX + 1).read_to_string(&mut text).map_err(read_error)?;
    if text.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(SecretFileError::TooLarge { path: path.display().to_string() });
    }
    warn_if_exposed(path, what);
    Ok(Secret::new(text.trim()))
}

/// The permission bits of `path` when users other than its owner have any access to it
/// (`mode & 0o077 != 0`), else `None`. Always `None` where there are no Unix modes.
pub fn exposed_mode(path: &Path) -> std::io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
        Ok((mode & NOT_OWNER_MODE_BITS != 0).then_some(mode))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).map(|_| None)
    }
}

/// Logs a warning when `path`, which holds `what` (a secret or token), can be read by users
/// other than its owner. Returns whether it warned.
pub fn warn_if_exposed(path: &Path, what: &str) -> bool {
    match exposed_mode(path) {
        Ok(Some(mode)) => {
            tracing::warn!(
                file = %path.display(),
                "{} holds {what} but has mode {mode:04o}: users other than its owner can read it; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
            true
        }
        Ok(None) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Writes `text` to `name` in `dir` with `mode`.
    fn file_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn files_open_to_group_or_others_are_exposed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [(0o600, None), (0o400, None), (0o640, Some(0o640)), (0o644, Some(0o644)), (0o604, Some(0o604))];
        for (mode, expected) in cases {
            let path = file_with_mode(dir.path(), &format!("f{mode:o}"), "x", mode);
            assert_eq!(exposed_mode(&path).expect("stat"), expected, "mode {mode:o}");
            assert_eq!(warn_if_exposed(&path, "a token"), expected.is_some(), "mode {mode:o}");
        }
        assert!(exposed_mode(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_secret_file_is_trimmed_bounded_and_a_missing_one_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = file_with_mode(dir.path(), "token", "  the-token\r\n", 0o600);
        assert_eq!(read_secret_file(&path, "a token").expect("read").expose(), "the-token");
        let huge = file_with_mode(dir.path(), "huge", &"x".repeat(SECRET_FILE_BYTES_MAX as usize + 1), 0o600);
        assert!(matches!(read_secret_file(&huge, "a token"), Err(SecretFileError::TooLarge { .. })));
        let largest = file_with_mode(dir.path(), "largest", &"x".repeat(SECRET_FILE_BYTES_MAX as usize), 0o600);
        assert_eq!(read_secret_file(&largest, "a token").expect("read").len(), SECRET_FILE_BYTES_MAX as usize);
        let missing = read_secret_file(&dir.path().join("missing"), "a token").expect_err("missing");
        assert!(missing.is_not_found(), "{missing}");
        assert!(missing.to_string().contains("missing"), "the error names the file: {missing}");
        let directory = read_secret_file(dir.path(), "a token").expect_err("a directory");
        assert!(!directory.is_not_found(), "{directory}");
    }
}
