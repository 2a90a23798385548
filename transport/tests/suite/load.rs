//! What `ServerTls::load` (and so a reload) refuses, naming the files.

use trmx_transport::{CrlPolicy, ServerTls, TlsFile, TransportError};

use super::harness::Fixture;

fn load(fx: &Fixture, paths: &trmx_transport::TlsPaths) -> Result<ServerTls, TransportError> {
    ServerTls::load(paths, Some(&fx.crl()), CrlPolicy::Warn)
}

#[test]
fn a_key_of_another_certificate_names_both_files_once() {
    let fx = Fixture::new();
    let other = fx.fed.broker("other").unwrap();
    let mut paths = fx.paths(&fx.broker);
    paths.key = other.key.clone();
    let err = load(&fx, &paths).unwrap_err();
    assert!(matches!(err, TransportError::KeyMismatch { .. }), "{err}");
    assert_eq!(err.files(), [TlsFile::Key, TlsFile::Cert]);
    let text = err.to_string();
    assert_eq!(
        text.matches(&*other.key.to_string_lossy()).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches(&*fx.broker.cert.to_string_lossy()).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("KeyMismatch"), "{text}");
}
