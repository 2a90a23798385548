//! The caller's identity, read from the verified client certificate of a request.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};

use trmx_certs::{CertError, Identity};

/// Leaf certificates whose identity is remembered at most (the cache is then
/// emptied and refills with the certificates in use).
const CACHE_CAPACITY: usize = 1024;

/// Identities of the leaf certificates seen lately, by their DER bytes.
static IDENTITIES: LazyLock<IdentityCache> = LazyLock::new(|| IdentityCache::new(CACHE_CAPACITY));

/// The identity in the verified client certificate the request arrived over.
///
/// `UNAUTHENTICATED` when the connection carries no client certificate (it was not
/// accepted through [`crate::incoming`]) or the certificate holds no valid trmx identity.
///
/// A certificate is parsed once, not on every RPC of its connection: parsing was about
/// 2% of a loaded broker's CPU. [`Identity::from_der`] depends on the DER bytes alone,
/// so the remembered answer is the answer.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate"))?;
    IDENTITIES
        .get_or_parse(leaf.as_ref(), Identity::from_der)
        .map_err(|error| {
            tracing::debug!(%error, "client certificate carries no valid identity");
            tonic::Status::unauthenticated("client certificate carries no valid trmx identity")
        })
}

/// [`crate::server::peer_name`] of a verified chain, for a per-request limit: the
/// identity's role from the cache above (no parse per request), else the name that
/// function gives a certificate without a trmx identity.
pub(crate) fn cached_peer_name(certs: &[rustls::pki_types::CertificateDer<'static>]) -> String {
    match certs.first() {
        Some(leaf) => match IDENTITIES.get_or_parse(leaf.as_ref(), Identity::from_der) {
            Ok(identity) => identity.role.to_string(),
            Err(_) => crate::server::peer_name(certs),
        },
        None => crate::server::peer_name(certs),
    }
}

/// A bounded map from certificate DER to its identity. Failures are not
/// remembered: a certificate without a valid identity is refused every time
/// anyway, and must not take the place of one in use.
struct IdentityCache {
    capacity: usize,
    map: Mutex<HashMap<Box<[u8]>, Identity>>,
}

impl IdentityCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get_or_parse(
        &self,
        der: &[u8],
        parse: impl FnOnce(&[u8]) -> Result<Identity, CertError>,
    ) -> Result<Identity, CertError> {
        if let Some(identity) = self.lock().get(der) {
            return Ok(identity.clone());
        }
        let identity = parse(der)?;
        let mut map = self.lock();
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(der.into(), identity.clone());
        Ok(identity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, Identity>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use trmx_certs::Role;

    use super::*;

    fn participant(name: &str) -> Identity {
        Identity::new(
            "example.test",
            Role::from_parts("participant", name).expect("role"),
        )
        .expect("identity")
    }

    #[test]
    fn a_certificate_is_parsed_once() {
        let cache = IdentityCache::new(4);
        let parses = Cell::new(0);
        let parse = |_: &[u8]| {
            parses.set(parses.get() + 1);
            Ok(participant("NL-NRM"))
        };
        let first = cache.get_or_parse(b"cert-a", parse).expect("first");
        let again = cache.get_or_parse(b"cert-a", parse).expect("again");
        assert_eq!(first, again);
        assert_eq!(parses.get(), 1);
        cache.get_or_parse(b"cert-b", parse).expect("other");
        assert_eq!(parses.get(), 2, "another certificate is parsed");
    }

    #[test]
    fn failures_are_not_remembered_and_the_cache_is_bounded() {
        let cache = IdentityCache::new(2);
        let parses = Cell::new(0);
        let refuse = |_: &[u8]| {
            parses.set(parses.get() + 1);
            Err(CertError::InvalidIdentity {
                problem: "no URI subject alternative name".into(),
            })
        };
        assert!(cache.get_or_parse(b"bad", refuse).is_err());
        assert!(cache.get_or_parse(b"bad", refuse).is_err());
        assert_eq!(parses.get(), 2);
        for (i, der) in [b"c1", b"c2", b"c3"].into_iter().enumerate() {
            cache
                .get_or_parse(der, |_| Ok(participant(&format!("NL-NRM{i}"))))
                .expect("parse");
            assert!(cache.lock().len() <= 2);
        }
    }
}
