//! Reading and writing PEM files: the loaders other crates use to build rustls configs,
//! and the atomic, mode-aware writer this crate uses for keys, certificates and CRLs.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::CertError;

/// Reads a whole file, naming it (and what it is) in the error.
pub(crate) fn read(what: &str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::io(format!("read {what}"), path, e))
}

/// Loads every `CERTIFICATE` block of a PEM file (a chain, or a CA bundle).
///
/// A file without any certificate is an error.
pub fn load_certs_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read("certificate", path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse("certificate", path, e))?;
    if certs.is_empty() {
        return Err(CertError::parse(
            "certificate",
            path,
            "no CERTIFICATE block",
        ));
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn load_key_pem(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| CertError::parse("private key", path, e))
}

/// Loads every `X509 CRL` block of a PEM file. A file with no CRL is an error.
pub fn load_crls_pem(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let bytes = read("CRL", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse("CRL", path, e))?;
    if crls.is_empty() {
        return Err(CertError::parse("CRL", path, "no X509 CRL block"));
    }
    Ok(crls)
}

/// `prefix` with `suffix` appended (`out/NL-NRM` + `.key`). Unlike
/// [`Path::with_extension`], it keeps what follows a dot in the prefix (`eu-1.b` stays).
pub(crate) fn suffixed(prefix: &Path, suffix: &str) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(suffix);
    path.into()
}

/// File permissions for what we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Private keys: `0600`, set when the file is created.
    Secret,
    /// Certificates, CRLs and the index: `0644`.
    Public,
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory (created
/// with the final mode, so a key is never readable by others, not even briefly), synced,
/// then renamed over the target. Without `overwrite`, an existing target is left alone and
/// the call fails with [`CertError::AlreadyExists`].
pub(crate) fn write_atomic(
    what: &str,
    path: &Path,
    contents: &[u8],
    mode: Mode,
    overwrite: bool,
) -> Result<(), CertError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".trmx-certs-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let bits = match mode {
            Mode::Secret => 0o600,
            Mode::Public => 0o644,
        };
        builder.permissions(std::fs::Permissions::from_mode(bits));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| CertError::io(format!("create a temporary file for {what} in"), dir, e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CertError::io(format!("write {what}"), tmp.path(), e))?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            CertError::io(format!("write {what}"), path, e.error)
        }
    })?;
    // Make the rename durable too; failure here is not worth failing the operation for.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn secret_files_are_0600_and_noclobber_keeps_content() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_atomic("key", &p, b"one", Mode::Secret, false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = write_atomic("key", &p, b"two", Mode::Secret, false).unwrap_err();
        assert!(matches!(e, CertError::AlreadyExists { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic("key", &p, b"three", Mode::Secret, true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        let c = dir.path().join("c.pem");
        write_atomic("certificate", &c, b"x", Mode::Public, false).unwrap();
        let mode = std::fs::metadata(&c).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // no temporary files left behind
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn missing_file_error_names_it() {
        let e = load_key_pem(Path::new("/nonexistent/x.key"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cannot read private key /nonexistent/x.key: No such file or directory"
        );
    }
}
