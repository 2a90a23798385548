//! The CRL record: the newest CRL of each CA that a server has accepted, kept in a small
//! file (the broker keeps it in its data directory) so that a CRL older than one accepted
//! before is refused after a restart too, not only by a reload. A crl.pem restored from a
//! backup would otherwise silently un-revoke every certificate revoked since.
//!
//! The file is JSON:
//!
//! ```json
//! {
//!   "format": 2,
//!   "about": "…",
//!   "crls": [
//!     { "issuer": "CN=TRM Federation CA", "issuer_der": "30…", "issuer_key_id": "a1…",
//!       "crl_number": "7", "this_update": 1796083200, "sha256": "5e…" }
//!   ]
//! }
//! ```
//!
//! `issuer_der` (hex) and `issuer_key_id` (hex, or `null` when the CRL names no key) say
//! which CA; `issuer` is for people. `crl_number` is decimal (CRL numbers may be 20 bytes
//! long), `null` when the CRL has none; `this_update` is in Unix seconds. `sha256` (hex) is
//! the digest of the CRL (DER): a CRL of the recorded number with another digest is a
//! second CRL under one number (a CA restored from a backup), refused. Format 1, written
//! before records kept the digest, is read too: its digests are unknown, so the first CRL
//! taken after it fills them in, and nothing is refused for want of one.
//!
//! A missing file is an empty record: the first start, or a record deleted on purpose to go
//! back to an older CRL. A file that cannot be read or parsed is an error that names it,
//! never an empty record: that would silently accept any CRL.
//!
//! # Invariants
//! - For each CA, the recorded CRL only moves forward: `CrlRecord::take` keeps the newer
//!   of the recorded and the new, and callers check before they take. A server that read
//!   the record before it held the directory reads it again, and merges, before it first
//!   writes it (`CrlRecord::merge`), so it never writes an older record over a newer one.
//! - The file is replaced atomically (temporary file, fsync, rename, fsync of the
//!   directory): after a crash it holds the record before or after, never a mix.
//! - A CA once recorded stays recorded, also after it left the CRL file (the end of a
//!   rollover): a CRL of it that comes back later is checked all the same. One entry per CA
//!   ever trusted, so the file stays small.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trmx_durable::ReplaceStep;
use x509_parser::num_bigint::BigUint;

use crate::pem::{CrlVersion, Standing};
use crate::{CrlRecordStep, TransportError};

/// The format this version writes.
const FORMAT: u32 = 2;
/// The formats it reads: 1 lacks the digests (`sha256`).
const READS: [u32; 2] = [1, FORMAT];

/// What the file says about itself, for whoever opens it.
const ABOUT: &str = "The newest CRL of each CA that this trmx server has accepted. At start, a \
     CRL older than the one recorded here for its CA, or another CRL under its number, is \
     refused: it would un-revoke certificates. Delete this file only to go back to an older \
     CRL on purpose.";

/// The newest CRL of each CA accepted so far, and the file that keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlRecord {
    /// The file.
    path: PathBuf,
    newest: Vec<CrlVersion>,
    /// `newest` holds something the file does not (yet).
    unsaved: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    format: u32,
    about: String,
    crls: Vec<RecordedCrl>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordedCrl {
    issuer: String,
    issuer_der: String,
    issuer_key_id: Option<String>,
    crl_number: Option<String>,
    this_update: i64,
    /// Absent from format 1.
    #[serde(default)]
    sha256: Option<String>,
}

impl CrlRecord {
    /// Reads the record kept at `path`. A missing file is an empty record (and written at
    /// the first [`crate::ServerTls::save_crl_record`]); a file that cannot be read, or
    /// does not parse, is an error that names it.
    ///
    /// Reads a small file synchronously.
    pub fn read(path: &Path) -> Result<CrlRecord, TransportError> {
        Self::read_telling(path, true)
    }

    /// [`Self::read`] again, for the server that read the record before it held the
    /// directory (see [`Self::merge`]): a missing file is not said again, the first read
    /// said it already (the same start would log it twice).
    pub(crate) fn read_again(path: &Path) -> Result<CrlRecord, TransportError> {
        Self::read_telling(path, false)
    }

    fn read_telling(path: &Path, tell_missing: bool) -> Result<CrlRecord, TransportError> {
        // (a regular file only: something else put at this path, a FIFO say, would hang
        // the start waiting for a writer; said first in words for this file, whose path no
        // setting names)
        if let Ok(metadata) = std::fs::metadata(path)
            && !metadata.is_file()
        {
            return Err(TransportError::CrlRecordIo {
                path: path.to_owned(),
                step: CrlRecordStep::Read,
                error: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "it is not a regular file: move it away, the server writes its record of \
                     the newest CRLs at this path",
                ),
            });
        }
        let bytes = match trmx_certs::pem::read_regular_file(path, "CRL record") {
            Ok(bytes) => bytes,
            // (a data directory that is not one is for its own check to tell)
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                if tell_missing {
                    tracing::info!(
                        record = %path.display(),
                        "no CRL record yet (a first start, or deleted): the CRLs in the CRL \
                         file are taken as the newest"
                    );
                }
                return Ok(CrlRecord {
                    path: path.to_owned(),
                    newest: Vec::new(),
                    unsaved: true,
                });
            }
            Err(error) => {
                return Err(TransportError::CrlRecordIo {
                    path: path.to_owned(),
                    step: CrlRecordStep::Read,
                    error,
                });
            }
        };
        let newest = parse(&bytes).map_err(|reason| TransportError::CrlRecordDamaged {
            path: path.to_owned(),
            reason,
        })?;
        Ok(CrlRecord {
            path: path.to_owned(),
            newest,
            unsaved: false,
        })
    }

    /// The file the record is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded CRL of `issuer`'s CA, if any.
    pub(crate) fn of(&self, issuer: &(Vec<u8>, Option<Vec<u8>>)) -> Option<&CrlVersion> {
        self.newest
            .iter()
            .find(|recorded| &recorded.issuer == issuer)
    }

    /// Refuses the first CRL of `crls` (read from the CRL file `crl`) that is older than
    /// the one recorded for its CA, or another CRL in its place (see [`Standing`]).
    pub(crate) fn check(&self, crl: &Path, crls: &[CrlVersion]) -> Result<(), TransportError> {
        for found in crls {
            let Some(recorded) = self.of(&found.issuer) else {
                continue;
            };
            match found.standing(recorded) {
                Standing::NotOlder => {}
                Standing::Older => {
                    return Err(TransportError::CrlOlderThanRecorded {
                        path: crl.to_owned(),
                        record: self.path.clone(),
                        issuer: found.issuer_name.as_str().into(),
                        comparison: format!(
                            "{} < {}",
                            found.describe(recorded),
                            recorded.describe(found)
                        )
                        .into(),
                    });
                }
                Standing::Reissued => {
                    return Err(TransportError::CrlReissued {
                        path: crl.to_owned(),
                        issuer: found.issuer_name.as_str().into(),
                        version: found.describe(recorded).into(),
                        record: Some(self.path.clone()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Records `crls` (checked with [`Self::check`]): each becomes its CA's entry unless the
    /// one recorded is newer.
    pub(crate) fn take(&mut self, crls: &[CrlVersion]) {
        for found in crls {
            match self
                .newest
                .iter_mut()
                .find(|recorded| recorded.issuer == found.issuer)
            {
                // (a CRL whose digest the record lacks, taken again, fills it in)
                Some(recorded)
                    if recorded == found || found.standing(recorded) != Standing::NotOlder => {}
                Some(recorded) => {
                    *recorded = found.clone();
                    self.unsaved = true;
                }
                None => {
                    self.newest.push(found.clone());
                    self.unsaved = true;
                }
            }
        }
    }

    /// Takes in `on_disk`, the record read again from the same file: each CA's entry
    /// becomes the newer of the two, and [`Self::save`] writes the result if the file lacks
    /// anything of it. For a server that read the record before it held the directory:
    /// another that ran on it until then may have recorded a newer CRL meanwhile, which a
    /// save must not write over. (Check the CRLs in force against `on_disk` first.)
    pub(crate) fn merge(&mut self, on_disk: CrlRecord) {
        let ours = std::mem::replace(&mut self.newest, on_disk.newest);
        self.unsaved = on_disk.unsaved;
        self.take(&ours);
    }

    /// Writes the record to its file if it holds anything the file does not (or the file
    /// was missing). The file is replaced atomically (see the module doc), by
    /// [`trmx_durable::replace_file`].
    ///
    /// Writes and syncs a small file synchronously.
    pub(crate) fn save(&mut self) -> Result<(), TransportError> {
        let path = self.path.as_path();
        if !self.unsaved {
            return Ok(());
        }
        let io = |step: CrlRecordStep| {
            move |error: std::io::Error| TransportError::CrlRecordIo {
                path: path.to_owned(),
                step,
                error,
            }
        };
        let mut text = serde_json::to_string_pretty(&self.to_file())
            .map_err(|e| io(CrlRecordStep::Encode)(std::io::Error::other(e)))?;
        text.push('\n');
        trmx_durable::replace_file(path, text.as_bytes()).map_err(|failed| {
            let step = match failed.step {
                ReplaceStep::Write(tmp) => CrlRecordStep::Write(tmp),
                ReplaceStep::Rename(tmp) => CrlRecordStep::Rename(tmp),
                ReplaceStep::SyncDir(dir) => CrlRecordStep::SyncDir(dir),
            };
            io(step)(failed.error)
        })?;
        self.unsaved = false;
        tracing::info!(record = %path.display(), crls = self.newest.len(), "crl record saved");
        Ok(())
    }

    fn to_file(&self) -> RecordFile {
        RecordFile {
            format: FORMAT,
            about: ABOUT.to_owned(),
            crls: self
                .newest
                .iter()
                .map(|crl| RecordedCrl {
                    issuer: crl.issuer_name.clone(),
                    issuer_der: hex(&crl.issuer.0),
                    issuer_key_id: crl.issuer.1.as_deref().map(hex),
                    crl_number: crl.number.as_ref().map(BigUint::to_string),
                    this_update: crl.this_update,
                    sha256: crl.sha256.as_ref().map(|digest| hex(digest)),
                })
                .collect(),
        }
    }
}

/// The CRLs of a record file, or why it is damaged.
fn parse(bytes: &[u8]) -> Result<Vec<CrlVersion>, String> {
    let file: RecordFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if !READS.contains(&file.format) {
        return Err(format!(
            "format {} (this version reads formats {} and {})",
            file.format, READS[0], READS[1]
        ));
    }
    let mut newest: Vec<CrlVersion> = Vec::with_capacity(file.crls.len());
    for (i, crl) in file.crls.into_iter().enumerate() {
        let field = |name: &str| format!("crls[{i}].{name}");
        let issuer_der = unhex(&crl.issuer_der)
            .filter(|der| !der.is_empty())
            .ok_or_else(|| format!("{} is not hex", field("issuer_der")))?;
        let key_id = crl
            .issuer_key_id
            .map(|id| unhex(&id).ok_or_else(|| format!("{} is not hex", field("issuer_key_id"))))
            .transpose()?;
        let number = crl
            .crl_number
            .map(|n| {
                n.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| BigUint::parse_bytes(n.as_bytes(), 10))
                    .flatten()
                    .ok_or_else(|| format!("{} is not a decimal number", field("crl_number")))
            })
            .transpose()?;
        let sha256 = crl
            .sha256
            .map(|digest| {
                unhex(&digest)
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| format!("{} is not 64 hex digits", field("sha256")))
            })
            .transpose()?;
        let version = CrlVersion {
            issuer: (issuer_der, key_id),
            issuer_name: crl.issuer,
            number,
            this_update: crl.this_update,
            sha256,
        };
        if newest.iter().any(|other| other.issuer == version.issuer) {
            return Err(format!("{} is listed twice", field("issuer")));
        }
        newest.push(version);
    }
    Ok(newest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(issuer: &[u8], number: Option<u32>, this_update: i64) -> CrlVersion {
        CrlVersion {
            issuer: (issuer.to_vec(), Some(vec![0xab, 0x01])),
            issuer_name: "CN=ca".to_owned(),
            number: number.map(BigUint::from),
            this_update,
            sha256: Some([number.map_or(0, |n| n.to_le_bytes()[0]); 32]),
        }
    }

    #[test]
    fn a_saved_record_reads_back_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let mut record = CrlRecord::read(&path).unwrap();
        assert_eq!(record.newest, []);
        // a data directory that is a file is for the data directory's own check to tell
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            CrlRecord::read(&file.join("crl-record.json"))
                .unwrap()
                .newest,
            []
        );
        std::fs::remove_file(&file).unwrap();
        let a = version(b"a", Some(7), 1_000);
        let b = CrlVersion {
            issuer: (b"b".to_vec(), None),
            number: None,
            ..version(b"b", None, 2_000)
        };
        record.take(&[a.clone(), b.clone()]);
        record.save().unwrap();
        let read = CrlRecord::read(&path).unwrap();
        assert_eq!(read.newest, [a, b]);
        assert!(!read.unsaved);
        // nothing but the record is left in the directory
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["crl-record.json"]);
    }

    #[test]
    fn the_record_only_moves_forward_per_ca() {
        let mut record = CrlRecord::read(Path::new("/nonexistent/crl-record.json")).unwrap();
        record.take(&[version(b"a", Some(7), 1_000), version(b"b", Some(3), 1_000)]);
        record.take(&[version(b"a", Some(6), 2_000), version(b"b", Some(4), 500)]);
        assert_eq!(
            record.newest,
            [version(b"a", Some(7), 1_000), version(b"b", Some(4), 500)]
        );
        let error = record
            .check(Path::new("/etc/crl.pem"), &[version(b"a", Some(6), 2_000)])
            .unwrap_err()
            .to_string();
        assert!(error.contains("crlNumber 6 < crlNumber 7"), "{error}");
        // the same CRL, a newer one, and another CA's are not older
        record
            .check(
                Path::new("/etc/crl.pem"),
                &[
                    version(b"a", Some(7), 1_000),
                    version(b"b", Some(5), 0),
                    version(b"c", Some(1), 0),
                ],
            )
            .unwrap();
    }

    /// A damaged record must not read as an empty one: that would accept any CRL.
    #[test]
    fn a_damaged_record_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let good = r#"{"format": 2, "about": "", "crls": [{"issuer": "CN=ca", "issuer_der": "3000", "issuer_key_id": null, "crl_number": "7", "this_update": 1, "sha256": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#;
        std::fs::write(&path, good).unwrap();
        CrlRecord::read(&path).unwrap();
        for (damage, why) in [
            ("", "EOF"),
            (&good[..good.len() / 2], "EOF"),
            ("{\"format\": 3, \"about\": \"\", \"crls\": []}", "format 3"),
            (&good.replace("\"00000000", "\"0000"), "crls[0].sha256 is not 64 hex digits"),
            (&good.replace("3000", "30x0"), "crls[0].issuer_der is not hex"),
            (&good.replace("\"7\"", "\"-7\""), "crls[0].crl_number"),
            (&good.replace("\"7\"", "7"), "invalid type"),
            (
                &good.replace("}]}", "}, {\"issuer\": \"CN=ca\", \"issuer_der\": \"3000\", \"issuer_key_id\": null, \"crl_number\": \"8\", \"this_update\": 1, \"sha256\": null}]}"),
                "listed twice",
            ),
        ] {
            std::fs::write(&path, damage).unwrap();
            let error = CrlRecord::read(&path).unwrap_err();
            assert!(
                matches!(error, TransportError::CrlRecordDamaged { .. }),
                "{damage}: {error:?}"
            );
            let text = error.to_string();
            assert!(
                text.contains(&path.display().to_string()) && text.contains(why),
                "{damage}: {text}"
            );
        }
    }

    /// Something other than a regular file at the record's path is an error that names it,
    /// at once: a FIFO is not waited on (that would hang the start with no word).
    #[test]
    fn a_record_path_naming_no_regular_file_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo failed");
        let (done, read) = std::sync::mpsc::channel();
        let reading = path.clone();
        std::thread::spawn(move || {
            let _ = done.send(CrlRecord::read(&reading).map(|_| ()));
        });
        // a read that waits for a writer never answers: this is no time limit on a quick
        // answer, only an end to a test that would hang
        let error = read
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("reading a FIFO as the CRL record hung")
            .unwrap_err();
        assert!(
            matches!(error, TransportError::CrlRecordIo { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains(&path.display().to_string())
                && text.contains("it is not a regular file: move it away")
                && !text.contains("give the path"),
            "{text}"
        );
    }

    /// A record written before records kept each CRL's digest (format 1) still reads, its
    /// digests unknown: the CRL it names, taken again, is not refused as another CRL under
    /// its number, and fills the digest in.
    #[test]
    fn a_record_without_digests_reads_and_takes_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let v1 = r#"{"format": 1, "about": "", "crls": [{"issuer": "CN=ca", "issuer_der": "6100", "issuer_key_id": "ab01", "crl_number": "7", "this_update": 1000}]}"#;
        std::fs::write(&path, v1).unwrap();
        let mut record = CrlRecord::read(&path).unwrap();
        let loaded = version(b"a\0", Some(7), 1_000);
        assert_eq!(
            record.newest,
            [CrlVersion {
                sha256: None,
                ..loaded.clone()
            }]
        );
        record
            .check(Path::new("/etc/crl.pem"), std::slice::from_ref(&loaded))
            .unwrap();
        record.take(std::slice::from_ref(&loaded));
        record.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"format\": 2"), "{text}");
        assert_eq!(CrlRecord::read(&path).unwrap().newest, [loaded]);
    }

    /// The same crlNumber with other content: the CA issued two CRLs under one number.
    #[test]
    fn another_crl_under_the_recorded_number_is_refused() {
        let mut record = CrlRecord::read(Path::new("/nonexistent/crl-record.json")).unwrap();
        record.take(&[version(b"a", Some(7), 1_000)]);
        let reissued = CrlVersion {
            sha256: Some([0xee; 32]),
            ..version(b"a", Some(7), 1_000)
        };
        let error = record
            .check(Path::new("/etc/crl.pem"), std::slice::from_ref(&reissued))
            .unwrap_err();
        assert!(
            matches!(error, TransportError::CrlReissued { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        for part in [
            "/etc/crl.pem",
            "issued two different CRLs with crlNumber 7",
            "recorded in /nonexistent/crl-record.json",
            "install the newest CRL from the CA",
            "check the CA's own state",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        // and a take does not record it over the other
        record.take(&[reissued]);
        assert_eq!(record.newest, [version(b"a", Some(7), 1_000)]);
    }

    /// Merged with the record read again, each CA keeps the newer entry of the two, and a
    /// CA only the file knows stays; the file is written only if it lacks something.
    #[test]
    fn a_merge_keeps_the_newer_entry_of_each_ca() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let mut on_disk = CrlRecord::read(&path).unwrap();
        on_disk.take(&[version(b"a", Some(8), 0), version(b"b", Some(2), 0)]);
        on_disk.save().unwrap();
        let mut ours = CrlRecord::read(Path::new("/x/crl-record.json")).unwrap();
        ours.path = path.clone();
        ours.take(&[version(b"a", Some(7), 0), version(b"b", Some(3), 0)]);
        ours.merge(CrlRecord::read(&path).unwrap());
        assert_eq!(
            ours.newest,
            [version(b"a", Some(8), 0), version(b"b", Some(3), 0)]
        );
        assert!(ours.unsaved);
        ours.save().unwrap();
        // nothing the file lacks: nothing to write
        let mut again = CrlRecord::read(&path).unwrap();
        again.take(&[version(b"a", Some(7), 0)]);
        again.merge(CrlRecord::read(&path).unwrap());
        assert!(!again.unsaved);
    }

    /// A record that cannot be written says which file failed and what to check.
    #[test]
    fn a_failed_write_names_the_file_and_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-record.json");
        let tmp = dir.path().join("crl-record.json.tmp");
        // (a directory in the way fails the write as root too, unlike a mode)
        std::fs::create_dir(&tmp).unwrap();
        let mut record = CrlRecord::read(&path).unwrap();
        record.take(&[version(b"a", Some(7), 0)]);
        let text = record.save().unwrap_err().to_string();
        for part in [
            format!("CRL record {}: ", path.display()),
            format!("cannot write the new record to {}", tmp.display()),
            format!("may create and rename files in {}", dir.path().display()),
            "space left".to_owned(),
        ] {
            assert!(text.contains(&part), "{part:?} in {text}");
        }
        std::fs::remove_dir(&tmp).unwrap();
        // the record itself in the way: the rename fails
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "").unwrap();
        let text = record.save().unwrap_err().to_string();
        assert!(
            text.contains(&format!("cannot rename {} over it", tmp.display())),
            "{text}"
        );
        assert!(
            std::fs::metadata(&tmp).is_err(),
            "the temporary file is left behind"
        );
    }
}
