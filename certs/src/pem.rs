//! Reading and writing PEM files: the loaders other crates use to build rustls configs,
//! and the atomic, mode-aware writer this crate uses for keys, certificates and CRLs.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::CertError;

/// Reads a whole file, naming it (and what it is) in the error. A path that names no
/// regular file is refused ([`read_regular_file`]).
pub(crate) fn read(what: &str, path: &Path) -> Result<Vec<u8>, CertError> {
    read_regular_file(path, what).map_err(|e| CertError::io(format!("read {what}"), path, e))
}

/// Reads the whole of a certificate, CA or CRL file, `what` naming it in the error when
/// the path names something other than a regular file. A FIFO is not waited on: opening
/// one for reading waits for a writer, and a path set to one by mistake hung the start of
/// a broker or node with no word. (The private key has its own checks: [`read_key_file`].)
pub fn read_regular_file(path: &Path, what: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let (mut file, _) = open_regular_file(path, &format!("the {what} file"), "")?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens `path` for reading without waiting, and refuses it unless it is a regular file,
/// naming what to give instead (`expected`, then `hint`). The metadata is the file's
/// opened, not of what the path names a moment later.
fn open_regular_file(
    path: &Path,
    expected: &str,
    hint: &str,
) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking: opening a FIFO for reading waits for a writer; it is opened at once
    // and refused below. (A regular file ignores the flag.)
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(file) => file,
        // (a socket cannot be opened at all: "No such device or address" said nothing of
        // what the path names)
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
            return Err(match std::fs::metadata(path) {
                Ok(metadata) if !metadata.is_file() => {
                    not_a_regular_file(path, &metadata, expected, hint)
                }
                _ => e,
            });
        }
        Err(e) => return Err(e),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_a_regular_file(path, &metadata, expected, hint));
    }
    Ok((file, metadata))
}

/// Permission bits a private key file may not have: any access by other users, and
/// write access by the group. A group may read it (`0640`, a key kept by root for the
/// group a service runs as, see [`read_key_file`]); `0600` is what this crate writes.
pub const KEY_MODE_FORBIDDEN: u32 = 0o027;

/// A private key file as read by [`read_key_file`].
#[derive(Debug)]
pub enum KeyFile {
    /// Its contents.
    Read(Vec<u8>),
    /// Other users may read it, or its group change it ([`KEY_MODE_FORBIDDEN`]): it was
    /// not read. `mode` holds its permission bits.
    Exposed {
        /// The permission bits.
        mode: u32,
    },
}

/// Reads a private key file unless other users may read it or its group change it: the
/// key would not be secret (a copy made with the wrong umask, usually). The mode is the
/// one of the file read, not of whatever the path names a moment later.
///
/// A key file owned by another user than this process's (effective) user and root is
/// refused too (unless this process runs as root), as an error of kind `PermissionDenied`
/// that names the owner and the fix: its owner may read it or put another key in its place
/// whatever its mode (a copy made as a login user, `cp` without `-p` run by someone else).
/// That holds whatever the file's group: a key `alice:trmx 0640` for a service running as
/// `trmx:trmx` is alice's to read, rewrite or `chmod` at any time, and any member of `trmx`
/// (or anyone who can create files in a setgid `trmx` directory) can make such a file, so
/// the group cannot tell a key granted on purpose from one planted. The rule is
/// PostgreSQL's for `ssl_key_file`: owned by this user, or by root, who may give it to the
/// service's group (`root:trmx 0640`).
pub fn read_key_file(path: &Path) -> std::io::Result<KeyFile> {
    let me = rustix::process::geteuid().as_raw();
    let my_group = rustix::process::getegid().as_raw();
    read_key_file_as(path, me, my_group)
}

/// [`read_key_file`] for a process running as `me` in group `my_group` (tests pass others;
/// the group only names the fix in the error).
fn read_key_file_as(path: &Path, me: u32, my_group: u32) -> std::io::Result<KeyFile> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    // (not waited on when a FIFO: a key path that named one hung the start with no word)
    let (mut file, metadata) = open_regular_file(
        path,
        "the private key file",
        " (a PEM file of mode 600 owned by the user this runs as)",
    )?;
    let mode = metadata.mode() & 0o7777;
    if mode & KEY_MODE_FORBIDDEN != 0 {
        return Ok(KeyFile::Exposed { mode });
    }
    // The mode bits do not show what an access ACL grants named users and groups (`ls -l`
    // shows only a `+`, the group bits its mask): a `0640` key may be readable by anyone.
    let acl = acl_grants_others(&file, &metadata, me, my_group).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot read its POSIX access ACL (`getfacl {}` shows it): {e}",
                path.display()
            ),
        )
    })?;
    if acl {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "it carries a POSIX access ACL that lets other users or groups read or change \
                 it, which its mode {mode:04o} does not show (`getfacl {0}` lists them): \
                 `setfacl -b {0}` removes the ACL (then its mode and owner say who reads it: \
                 the service's user as owner, mode 600, or root as owner and the service's \
                 group, `root:trmx` mode 640)",
                path.display()
            ),
        ));
    }
    let owner = metadata.uid();
    // (root is exempt: in a container a broker or node often runs as root on a mounted
    // directory whose files keep the host user's uid, and root reads any key anyway)
    if me != 0 && owner != me && owner != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "it is owned by {}, not by the user this runs as ({}) or root, and its owner \
                 can read it or replace the key whatever its mode or group: `chown {me} {2}` \
                 (or run as its owner), or, to keep it out of the service user's hands, \
                 `chown root:{my_group} {2} && chmod 640 {2}`",
                user_name(owner),
                user_name(me),
                path.display()
            ),
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(KeyFile::Read(bytes))
}

/// The error for a path that names something other than a regular file: what it is and
/// what to give instead (a directory was called "mode 0755 lets other users read it").
fn not_a_regular_file(
    path: &Path,
    metadata: &std::fs::Metadata,
    expected: &str,
    hint: &str,
) -> std::io::Error {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = metadata.file_type();
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    let within = if kind.is_dir() {
        format!(" in {}", path.display())
    } else {
        String::new()
    };
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file: give the path of {expected}{within}{hint}"),
    )
}

/// Whether `file` carries a POSIX access ACL (`system.posix_acl_access`) whose named user
/// or group entries grant others read or write access, once limited by its mask. A file
/// without one, or on a file system without ACLs, has none.
///
/// The rule is the mode's: the owner and the user this runs as (`me`) are no others, and
/// a group that may read the key by its mode (the file's group, `root:trmx 0640`) may by a
/// named entry too (`setfacl -m g:trmx:r`), as may `my_group`; only its write counts. A
/// root-owned key granted to the service's user by `setfacl -m u:trmx:r`, the ACL's way to
/// write `root:trmx 0640`, was refused as readable by others.
fn acl_grants_others(
    file: &std::fs::File,
    metadata: &std::fs::Metadata,
    me: u32,
    my_group: u32,
) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    // (the kernel's format, `posix_acl_xattr.h`: a version word, then entries of a tag,
    // permissions and an id; tags of named users and groups, and the mask)
    const ACL_USER: u16 = 0x02;
    const ACL_GROUP: u16 = 0x08;
    const ACL_MASK: u16 = 0x10;
    const NAME: &str = "system.posix_acl_access";
    // room for 64 entries; a longer ACL is read whole at its size (an ACL of many
    // entries that grant nothing, say for every member of a team, is no reason to refuse)
    let mut buf = vec![0u8; 4 + 8 * 64];
    let len = loop {
        match rustix::fs::fgetxattr(file, NAME, &mut buf[..]) {
            Ok(len) => break len,
            Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => {
                return Ok(false);
            }
            // (the ACL may grow again meanwhile)
            Err(e) if e == rustix::io::Errno::RANGE => match xattr_size(file, NAME) {
                Ok(size) => buf.resize(size.max(buf.len() + 1), 0),
                // (removed since: none now)
                Err(e) if e == rustix::io::Errno::NODATA => return Ok(false),
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        }
    };
    let entries = buf[..len].get(4..).unwrap_or_default();
    let mut entries = entries.chunks_exact(8).map(|entry| {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let perm = u16::from_le_bytes([entry[2], entry[3]]);
        let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        (tag, perm, id)
    });
    let mask = entries
        .clone()
        .find(|&(tag, _, _)| tag == ACL_MASK)
        .map_or(0o7, |(_, perm, _)| perm);
    // (read 4, write 2)
    Ok(entries.any(|(tag, perm, id)| {
        let forbidden = match tag {
            ACL_USER if id == metadata.uid() || id == me => 0,
            ACL_GROUP if id == metadata.gid() || id == my_group => 0o2,
            ACL_USER | ACL_GROUP => 0o6,
            _ => 0,
        };
        perm & mask & forbidden != 0
    }))
}

/// The size of `file`'s extended attribute `name`. (`rustix::fs::fgetxattr` given an
/// empty buffer answers 0, not the size: a long ACL was then read again a byte larger
/// each time, up to thousands of reads.)
fn xattr_size(file: &std::fs::File, name: &str) -> rustix::io::Result<usize> {
    rustix::fs::fgetxattr_query(file, name)
}

/// `uid 1000 (alice)`, or `uid 1000` for a uid the user database does not name.
fn user_name(uid: u32) -> String {
    // (the user database as a file: no libc call for one name in an error message)
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let found = fields.nth(1)?.parse::<u32>().ok()? == uid;
                found.then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// [`read_key_file`], with this crate's errors.
pub(crate) fn read_secret(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    match read_key_file(path).map_err(|e| CertError::io(format!("read {what}"), path, e))? {
        KeyFile::Read(bytes) => Ok(bytes),
        KeyFile::Exposed { mode } => Err(CertError::KeyExposed {
            what,
            path: path.to_path_buf(),
            mode,
        }),
    }
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
            no_certificate_block(&bytes),
        ));
    }
    Ok(certs)
}

/// `no CERTIFICATE block`, and what the file holds instead when that is something else of
/// ours: a key or a CRL given where a certificate belongs is a swap of two paths.
fn no_certificate_block(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let holds = |label: &str| text.contains(&format!("-----BEGIN {label}"));
    let instead = if holds("PRIVATE KEY") || text.contains(" PRIVATE KEY-----") {
        " (it holds a private key: are the certificate and key paths swapped?)"
    } else if holds("X509 CRL") {
        " (it holds a CRL: give the certificate's .pem)"
    } else if holds("CERTIFICATE REQUEST") {
        " (it holds a certificate request: give the certificate issued for it)"
    } else {
        ""
    };
    format!("no CERTIFICATE block{instead}")
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file that other users
/// may not read (`read_secret`).
pub fn load_key_pem(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read_secret("private key", path)?;
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
    let file = NewFile {
        what,
        path,
        contents,
        mode,
    };
    let staged = file.stage()?;
    let dir = staged.dir.clone();
    staged.persist(overwrite)?;
    sync_dir(&dir);
    Ok(())
}

/// A file to write with [`write_atomic`] or [`write_pair_atomic`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewFile<'a> {
    /// What it is, for errors: `private key`, `certificate`, ...
    pub(crate) what: &'a str,
    /// Where it goes.
    pub(crate) path: &'a Path,
    /// Its contents.
    pub(crate) contents: &'a [u8],
    /// Its permissions.
    pub(crate) mode: Mode,
}

/// Writes two files that belong together (a private key and its certificate) so that the
/// pair on disk is, as far as a file system allows, either the old pair or the new one:
///
/// 1. both are written and synced to temporary files beside their targets (a key created
///    `0600`); a failure here (disk full, read-only directory, ...) removes both temporaries
///    and leaves the old pair untouched;
/// 2. the existing `first` (if any) is kept under a temporary hard link (or, where the file
///    system allows none, as a copy with `first`'s mode), so that it can be put back;
/// 3. `first` is renamed into place, then `second`. If renaming `second` fails, `first` is
///    put back as it was (or removed, if there was none) and the temporaries are removed;
/// 4. the backup is removed and the directories synced. (If putting `first` back fails, the
///    backup is kept and named in [`CertError::PairIncomplete`].)
///
/// What remains: a crash (power loss, `kill -9`) in the instant between the two renames
/// leaves the new `first` beside the old `second`. Nothing is lost then: the new `second`
/// and the old `first` are still in `.trmx-certs-*.tmp` files in their directories (the
/// old key is mode `0600` like the key itself), to be renamed by hand. A crash at any other
/// moment leaves the old pair or the new one in place, at worst with such temporaries
/// beside it. Without `overwrite`, neither target may exist ([`CertError::AlreadyExists`]).
pub(crate) fn write_pair_atomic(
    first: NewFile<'_>,
    second: NewFile<'_>,
    overwrite: bool,
) -> Result<(), CertError> {
    let staged_first = first.stage()?;
    let staged_second = second.stage()?;
    let backup = if overwrite { Backup::of(&first)? } else { None };
    let (first_dir, second_dir) = (staged_first.dir.clone(), staged_second.dir.clone());
    staged_first.persist(overwrite)?;
    if let Err(cause) = staged_second.persist(overwrite) {
        // put the old `first` back, or remove the new one that has no `second` beside it
        let replaced = backup.is_some();
        let undone = match backup {
            Some(backup) => backup.restore(first.path),
            None => std::fs::remove_file(first.path).map_err(|e| (e, None)),
        };
        sync_dir(&first_dir);
        return match undone {
            Ok(()) => Err(cause),
            Err((e, kept)) => Err(CertError::PairIncomplete {
                path: first.path.to_path_buf(),
                what: first.what.to_string(),
                undo: crate::error::io_message(&e),
                replaced,
                kept,
                cause: Box::new(cause),
            }),
        };
    }
    drop(backup);
    sync_dir(&first_dir);
    if second_dir != first_dir {
        sync_dir(&second_dir);
    }
    Ok(())
}

/// The file a [`write_pair_atomic`] replaces, kept aside in its directory until the new
/// pair is in place, then removed (when dropped).
enum Backup {
    /// A second name (hard link) of the file itself.
    Link(tempfile::NamedTempFile<()>),
    /// A copy with the same contents and the new file's mode, where the file system
    /// (vfat, some network mounts) or `fs.protected_hardlinks` allow no hard link.
    Copy(tempfile::NamedTempFile),
}

impl Backup {
    /// The backup of the file `file` replaces; `None` when there is no file there.
    fn of(file: &NewFile<'_>) -> Result<Option<Backup>, CertError> {
        Backup::made_with(file, |path, backup| std::fs::hard_link(path, backup))
    }

    /// [`Backup::of`], linking with `link` (tests make it fail).
    fn made_with(
        file: &NewFile<'_>,
        link: impl Fn(&Path, &Path) -> std::io::Result<()>,
    ) -> Result<Option<Backup>, CertError> {
        let (what, path) = (file.what, file.path);
        let linked = tempfile::Builder::new()
            .prefix(".trmx-certs-")
            .suffix(".old.tmp")
            .make_in(parent_dir(path), |backup| link(path, backup));
        let link_error = match linked {
            Ok(backup) => return Ok(Some(Backup::Link(backup))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => e,
        };
        let old = match std::fs::read(path) {
            Ok(old) => old,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CertError::io(
                    format!(
                        "keep the replaced {what} while replacing (no hard link: {}; no copy)",
                        crate::error::io_message(&link_error)
                    ),
                    path,
                    e,
                ));
            }
        };
        let copy = NewFile {
            contents: &old,
            ..*file
        }
        .stage()?;
        Ok(Some(Backup::Copy(copy.tmp)))
    }

    /// Puts the replaced file back at `path`. On failure the backup is kept (not
    /// removed), and its path returned with the error, to be moved back by hand.
    fn restore(self, path: &Path) -> Result<(), (std::io::Error, Option<PathBuf>)> {
        fn kept<F>(e: tempfile::PersistError<F>) -> (std::io::Error, Option<PathBuf>) {
            (e.error, e.file.keep().ok().map(|(_, kept)| kept))
        }
        match self {
            Backup::Link(backup) => backup.persist(path).map(drop).map_err(kept),
            Backup::Copy(backup) => backup.persist(path).map(drop).map_err(kept),
        }
    }
}

/// A [`NewFile`] written and synced under a temporary name in its target's directory, not
/// yet in place. Dropping it removes the temporary file.
struct Staged<'a> {
    file: NewFile<'a>,
    dir: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl<'a> NewFile<'a> {
    fn stage(self) -> Result<Staged<'a>, CertError> {
        let what = self.what;
        let dir = parent_dir(self.path);
        let mut builder = tempfile::Builder::new();
        builder.prefix(".trmx-certs-").suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let bits = match self.mode {
                Mode::Secret => 0o600,
                Mode::Public => 0o644,
            };
            builder.permissions(std::fs::Permissions::from_mode(bits));
        }
        let mut tmp = builder
            .tempfile_in(dir)
            .map_err(|e| CertError::io(format!("create a temporary file for {what} in"), dir, e))?;
        tmp.write_all(self.contents)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| CertError::io(format!("write {what}"), tmp.path(), e))?;
        Ok(Staged {
            file: self,
            dir: dir.to_path_buf(),
            tmp,
        })
    }
}

impl Staged<'_> {
    /// Renames the temporary file to the target (on failure it is removed).
    fn persist(self, overwrite: bool) -> Result<(), CertError> {
        let Staged { file, tmp, .. } = self;
        let persisted = if overwrite {
            tmp.persist(file.path)
        } else {
            tmp.persist_noclobber(file.path)
        };
        persisted.map(drop).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::AlreadyExists {
                    path: file.path.to_path_buf(),
                }
            } else {
                CertError::io(format!("write {}", file.what), file.path, e.error)
            }
        })
    }
}

/// The directory `path` is in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes renames in `dir` durable; failure here is not worth failing the operation for.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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

    /// Names in `dir` of temporary files a write left behind.
    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".trmx-certs-"))
            .collect()
    }

    fn file<'a>(what: &'a str, path: &'a Path, contents: &'a [u8], mode: Mode) -> NewFile<'a> {
        NewFile {
            what,
            path,
            contents,
            mode,
        }
    }

    /// Where no hard link can be made (vfat, some network mounts), the replaced file is
    /// kept as a copy; a backup that cannot be put back is kept and named, never removed.
    #[cfg(unix)]
    #[test]
    fn a_backup_is_a_copy_without_hard_links_and_is_kept_when_it_cannot_go_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("n.key");
        std::fs::write(&key, b"old key").unwrap();
        let new = file("private key", &key, b"new key", Mode::Secret);
        let no_links = |_: &Path, _: &Path| Err(std::io::Error::other("no hard links here"));
        let Some(backup @ Backup::Copy(_)) = Backup::made_with(&new, no_links).unwrap() else {
            panic!("expected a copy");
        };
        std::fs::write(&key, b"new key").unwrap();
        backup.restore(&key).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"old key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(temporaries(dir.path()).is_empty());

        let backup = Backup::of(&new).unwrap().unwrap();
        let nowhere = dir.path().join("gone").join("n.key");
        let (_, kept) = backup.restore(&nowhere).unwrap_err();
        let kept = kept.expect("the backup is kept");
        assert_eq!(std::fs::read(&kept).unwrap(), b"old key");
        assert_eq!(temporaries(dir.path()).len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_pair_is_replaced_together_and_leaves_no_temporary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (k, c) = (dir.path().join("n.key"), dir.path().join("n.pem"));
        let pair = |key: &'static [u8], cert: &'static [u8], overwrite| {
            write_pair_atomic(
                file("private key", &k, key, Mode::Secret),
                file("certificate", &c, cert, Mode::Public),
                overwrite,
            )
        };
        pair(b"key 1", b"cert 1", false).unwrap();
        let e = pair(b"key 2", b"cert 2", false).unwrap_err();
        assert!(matches!(e, CertError::AlreadyExists { .. }), "{e}");
        pair(b"key 2", b"cert 2", true).unwrap();
        assert_eq!(std::fs::read(&k).unwrap(), b"key 2");
        assert_eq!(std::fs::read(&c).unwrap(), b"cert 2");
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    }

    /// The second file cannot be renamed into place (a directory is in the way): the first
    /// is put back as it was, or removed if it is new, and no temporary stays.
    #[test]
    fn a_pair_whose_second_rename_fails_leaves_the_old_first() {
        let dir = tempfile::tempdir().unwrap();
        let (k, c) = (dir.path().join("n.key"), dir.path().join("n.pem"));
        std::fs::create_dir(&c).unwrap();
        for (old, overwrite) in [(None, true), (None, false), (Some(b"old key"), true)] {
            if let Some(old) = old {
                std::fs::write(&k, old).unwrap();
            }
            let e = write_pair_atomic(
                file("private key", &k, b"new key", Mode::Secret),
                file("certificate", &c, b"new cert", Mode::Public),
                overwrite,
            )
            .unwrap_err();
            match old {
                Some(old) => assert_eq!(std::fs::read(&k).unwrap(), old),
                None => assert!(!k.exists(), "the new key without its certificate stayed"),
            }
            let expected = if overwrite {
                format!("cannot write certificate {}: ", c.display())
            } else {
                format!("refusing to overwrite {}", c.display())
            };
            assert!(e.to_string().starts_with(&expected), "{e}");
            assert!(c.is_dir());
            assert_eq!(temporaries(dir.path()), Vec::<String>::new());
        }
    }

    /// The second file cannot even be written (its directory is missing): the first target
    /// is untouched and its temporary removed.
    #[test]
    fn a_pair_whose_second_write_fails_leaves_the_old_first() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("n.key");
        let c = dir.path().join("missing/n.pem");
        std::fs::write(&k, b"old key").unwrap();
        let e = write_pair_atomic(
            file("private key", &k, b"new key", Mode::Secret),
            file("certificate", &c, b"new cert", Mode::Public),
            true,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot create a temporary file for certificate in"),
            "{e}"
        );
        assert_eq!(std::fs::read(&k).unwrap(), b"old key");
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    }

    /// A key owned by another user than the process's and root was read as long as its
    /// mode was `0600`: its owner could read it or swap it. It is refused, naming the
    /// owner and the fix; one owned by the process's user or by root is read.
    #[test]
    fn a_key_owned_by_another_user_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let mut owner = std::fs::metadata(&key).unwrap().uid();
        let as_root = owner == 0;
        if as_root {
            // (root's keys are read by anyone allowed to: give this one to somebody else)
            owner = 4_000_000;
            std::os::unix::fs::chown(&key, Some(owner), None).unwrap();
        }
        let other = owner + 1;
        let other_group = std::fs::metadata(&key).unwrap().gid() + 1;
        assert!(matches!(
            read_key_file_as(&key, owner, other_group),
            Ok(KeyFile::Read(_))
        ));
        let e = read_key_file_as(&key, other, other_group).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("it is owned by uid {owner}")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "not by the user this runs as (uid {other}) or root"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("`chown {other} {}`", key.display())),
            "{text}"
        );
        // through the crate's error: one line naming the file
        let e = CertError::io("read private key", &key, e).to_string();
        assert!(
            e.starts_with(&format!(
                "cannot read private key {}: it is owned",
                key.display()
            )),
            "{e}"
        );
        if as_root {
            // a key of root's is read by any user allowed to
            std::os::unix::fs::chown(&key, Some(0), None).unwrap();
            assert!(matches!(
                read_key_file_as(&key, other, other_group),
                Ok(KeyFile::Read(_))
            ));
        }
    }

    /// A key of another user given to the group this process runs as (`alice:trmx 0640`,
    /// the service running as `trmx:trmx`) was read: its owner, any member of that group
    /// (who can `chgrp` a file of their own to it), could read the key, or replace it and so
    /// control the node's TLS identity. It is refused like any key of another user, naming
    /// the fix that keeps it for the group: owned by root, mode 0640, which is read.
    #[test]
    fn a_key_of_another_owner_given_to_this_group_is_refused() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let as_root = std::fs::metadata(&key).unwrap().uid() == 0;
        if as_root {
            // (run as root: root's keys are read by anyone allowed to; give this one to an
            // ordinary account)
            std::os::unix::fs::chown(&key, Some(1000), None).unwrap();
        }
        let meta = std::fs::metadata(&key).unwrap();
        let (owner, group) = (meta.uid(), meta.gid());
        // the service: neither the owner nor root, running with the key's group
        let service = owner + 1;
        for mode in [0o640, 0o600] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_key_file_as(&key, service, group).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{mode:o}");
            assert!(
                e.to_string().contains(&format!(
                    "`chown root:{group} {0} && chmod 640 {0}`",
                    key.display()
                )),
                "{e}"
            );
        }
        // never one the group may change, nor one others may read
        for mode in [0o660, 0o644] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(matches!(
                read_key_file_as(&key, service, group),
                Ok(KeyFile::Exposed { .. })
            ));
        }
        // the service's own key, or root's, may be given to the group (0640)
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_key_file_as(&key, owner, group),
            Ok(KeyFile::Read(_))
        ));
        if as_root {
            std::os::unix::fs::chown(&key, Some(0), None).unwrap();
            match read_key_file_as(&key, service, group) {
                Ok(KeyFile::Read(bytes)) => assert_eq!(bytes, b"key"),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A broker or node run as root in a container, on a mounted directory whose key keeps
    /// the host user's uid, refused to start (`it is owned by uid 1000`): root reads any
    /// key anyway, so a process running as root takes a key of any owner.
    #[test]
    fn a_process_running_as_root_reads_a_key_of_any_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        if std::fs::metadata(&key).unwrap().uid() == 0 {
            // (run as root: give the key to the host user of a mounted directory)
            std::os::unix::fs::chown(&key, Some(1000), None).unwrap();
        }
        assert_ne!(std::fs::metadata(&key).unwrap().uid(), 0);
        match read_key_file_as(&key, 0, 0) {
            Ok(KeyFile::Read(bytes)) => assert_eq!(bytes, b"key"),
            other => panic!("{other:?}"),
        }
    }

    /// A directory given as the key was "mode 0755 lets other users read it"; it is said
    /// to be a directory.
    #[test]
    fn a_directory_given_as_the_key_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_key_file(dir.path()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            format!(
                "it is a directory, not a regular file: give the path of the private key file \
                 in {} (a PEM file of mode 600 owned by the user this runs as)",
                dir.path().display()
            )
        );
    }

    /// What `read` answers for a FIFO made at `name` in a new directory, run on a thread.
    /// (A reader blocked in its open is let go by a writer: it then reads nothing and the
    /// test fails on what it returned, instead of hanging.)
    fn read_of_a_fifo<T: Send + 'static>(
        name: &str,
        read: fn(&Path) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || read(&fifo))
        };
        while !reader.is_finished() {
            let writer = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&fifo);
            if writer.is_ok() {
                break;
            }
            std::thread::yield_now();
        }
        reader.join().unwrap()
    }

    /// A key path naming a FIFO blocked the open until something wrote to it: a start that
    /// hung without a word. It is refused at once, saying what it is.
    #[test]
    fn a_fifo_given_as_the_key_is_refused_without_waiting_for_a_writer() {
        let e = read_of_a_fifo("k.key", read_key_file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(
            e.to_string()
                .starts_with("it is a FIFO (named pipe), not a regular file: give the path"),
            "{e}"
        );
    }

    /// So was a certificate, CA or CRL path naming one (read by a broker's or node's
    /// start, and by this crate's commands): refused at once too, naming the file wanted.
    #[test]
    fn a_fifo_given_as_a_certificate_is_refused_without_waiting_for_a_writer() {
        let e =
            read_of_a_fifo("ca.pem", |path| read_regular_file(path, "CA certificate")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert_eq!(
            e.to_string(),
            "it is a FIFO (named pipe), not a regular file: give the path of the CA \
             certificate file"
        );
        let e = read_of_a_fifo("crl.pem", |path| {
            read("CRL", path).map_err(|e| std::io::Error::other(e.to_string()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("a FIFO (named pipe)"), "{e}");
    }

    /// A key path that is a symbolic link (a Kubernetes secret volume's `tls.key ->
    /// ..data/tls.key`) is read as the file it names, with that file's mode: the checks
    /// of what the path is are made on the file opened, not on the link.
    #[test]
    fn a_symbolic_link_to_a_key_is_read_as_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink("k.key", &link).unwrap();
        match read_key_file(&link) {
            Ok(KeyFile::Read(bytes)) => assert_eq!(bytes, b"key"),
            other => panic!("{other:?}"),
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_key_file(&link),
            Ok(KeyFile::Exposed { mode: 0o644 })
        ));
    }

    /// A socket given as the key cannot be opened: the error was "No such device or
    /// address", naming nothing. It is said to be a socket, as a FIFO is.
    #[test]
    fn a_socket_given_as_the_key_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("k.key");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let e = read_key_file(&socket).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(
            e.to_string()
                .starts_with("it is a socket, not a regular file: give the path"),
            "{e}"
        );
    }

    /// Sets the POSIX access ACL of `path` as `setfacl` would: `entries` of (tag,
    /// permissions, id) in the kernel's format (a version word, then the entries, which must
    /// come in tag order, named ones by id).
    fn set_access_acl(path: &Path, entries: &[(u16, u16, u32)]) -> rustix::io::Result<()> {
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        rustix::fs::setxattr(
            path,
            "system.posix_acl_access",
            &acl,
            rustix::fs::XattrFlags::empty(),
        )
    }

    /// A POSIX ACL granting another user read access shows only in the group bits (its
    /// mask): a `0640` key readable by someone else was read. It is refused, naming the
    /// fix; an ACL whose named entries the mask cuts off grants nothing, and is read.
    #[test]
    fn a_key_whose_acl_lets_another_user_read_it_is_refused() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let meta = std::fs::metadata(&key).unwrap();
        let (me, group) = (meta.uid(), meta.gid());
        let other = me + 1;
        // (`setfacl -m u:OTHER:r,m::MASK`, in the kernel's format: version 2, then tag,
        // permissions and id of each entry, in tag order)
        let set_acl = |mask: u16| {
            set_access_acl(
                &key,
                &[
                    (0x01, 6, u32::MAX),
                    (0x02, 4, other),
                    (0x04, 0, u32::MAX),
                    (0x10, mask, u32::MAX),
                    (0x20, 0, u32::MAX),
                ],
            )
        };
        match set_acl(4) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOTSUP => {
                eprintln!("skipped: the file system of {} has no ACLs", key.display());
                return;
            }
            Err(e) => panic!("setxattr: {e}"),
        }
        // (the mask is the group bits)
        let mode = std::fs::metadata(&key).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let e = read_key_file_as(&key, me, group).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "it carries a POSIX access ACL that lets other users or groups read or change \
                 it, which its mode 0640 does not show (`getfacl {0}` lists them): `setfacl -b \
                 {0}` removes the ACL (then its mode and owner say who reads it: the service's \
                 user as owner, mode 600, or root as owner and the service's group, \
                 `root:trmx` mode 640)",
                key.display()
            )
        );
        // through the crate's error
        assert!(matches!(
            read_secret("private key", &key),
            Err(CertError::Io { .. })
        ));
        // the mask cuts the named user off (mode 0600): nothing granted, read
        set_acl(0).unwrap();
        match read_key_file_as(&key, me, group) {
            Ok(KeyFile::Read(bytes)) => assert_eq!(bytes, b"key"),
            other => panic!("{other:?}"),
        }
    }

    /// Named ACL entries for no other user: the key's owner, the user this runs as (a
    /// root-owned key given to the service's user with `setfacl -m u:trmx:r`, the ACL's
    /// `root:trmx 0640`), the file's own group or this process's reading. They were refused
    /// as "lets other users or groups read"; they are read, and a named entry for anyone
    /// else is still refused.
    #[test]
    fn named_acl_entries_for_the_owner_the_service_user_or_its_group_are_no_others() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let meta = std::fs::metadata(&key).unwrap();
        let (owner, group) = (meta.uid(), meta.gid());
        // (`setfacl -m TAG:ID:PERM,m::r`, in the kernel's format, in tag order)
        let set_acl = |tag: u16, perm: u16, id: u32| {
            let mut entries = [
                (0x01, 6, u32::MAX),
                (tag, perm, id),
                (0x04, 0, u32::MAX),
                (0x10, 4, u32::MAX),
                (0x20, 0, u32::MAX),
            ];
            entries.sort_by_key(|&(tag, _, _)| tag);
            set_access_acl(&key, &entries)
        };
        match set_acl(0x02, 6, owner) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOTSUP => {
                eprintln!("skipped: the file system of {} has no ACLs", key.display());
                return;
            }
            Err(e) => panic!("setxattr: {e}"),
        }
        let read = |me: u32, my_group: u32| match read_key_file_as(&key, me, my_group) {
            Ok(KeyFile::Read(bytes)) => {
                assert_eq!(bytes, b"key");
                Ok(())
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let service = owner + 1000;
        // the owner's own name
        read(owner, group).unwrap();
        // the file's group, and this process's, reading
        set_acl(0x08, 4, group).unwrap();
        read(owner, group).unwrap();
        set_acl(0x08, 4, group + 1000).unwrap();
        read(owner, group + 1000).unwrap();
        // the service's user, on a key root owns (another owner is refused as such)
        set_acl(0x02, 4, service).unwrap();
        if owner == 0 {
            read(service, group).unwrap();
        }
        // anyone else
        for (tag, id) in [(0x02, service), (0x08, group + 1000)] {
            set_acl(tag, 4, id).unwrap();
            let e = read(owner, group).unwrap_err();
            assert!(e.starts_with("it carries a POSIX access ACL"), "{e}");
        }
    }

    /// An ACL of more than 64 entries was refused whatever they granted (it did not fit the
    /// buffer it was read into). It is read whole: named entries the mask cuts off grant
    /// nothing, and one that grants another user read access, the last, is still found.
    #[test]
    fn a_long_acl_is_read_whole() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_atomic("key", &key, b"key", Mode::Secret, false).unwrap();
        let meta = std::fs::metadata(&key).unwrap();
        let (me, group) = (meta.uid(), meta.gid());
        // 100 named users, then the mask (in the kernel's format, in tag and id order)
        let set_acl = |mask: u16| {
            let mut entries = vec![(0x01, 6, u32::MAX)];
            entries.extend((0..100).map(|i| (0x02, 4, me + 1 + i)));
            entries.extend([
                (0x04, 0, u32::MAX),
                (0x10, mask, u32::MAX),
                (0x20, 0, u32::MAX),
            ]);
            set_access_acl(&key, &entries)
        };
        match set_acl(0) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOTSUP || e == rustix::io::Errno::NOSPC => {
                eprintln!(
                    "skipped: the file system of {} holds no such ACL",
                    key.display()
                );
                return;
            }
            Err(e) => panic!("setxattr: {e}"),
        }
        // (its size, asked to read it whole at once, is its size: it was 0, and the ACL
        // was read again a byte larger each time until it fitted)
        let file = std::fs::File::open(&key).unwrap();
        assert_eq!(
            xattr_size(&file, "system.posix_acl_access").unwrap(),
            4 + 8 * 104
        );
        match read_key_file_as(&key, me, group) {
            Ok(KeyFile::Read(bytes)) => assert_eq!(bytes, b"key"),
            other => panic!("{other:?}"),
        }
        set_acl(4).unwrap();
        let e = read_key_file_as(&key, me, group).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
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
