//! The caller's identity, read from the verified client certificate of a request.

use trmx_certs::Identity;

/// The identity in the verified client certificate the request arrived over.
///
/// `UNAUTHENTICATED` when the connection carries no client certificate (it was not
/// accepted through [`crate::incoming`]) or the certificate holds no valid trmx identity.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate"))?;
    Identity::from_der(leaf.as_ref()).map_err(|error| {
        tracing::debug!(%error, "client certificate carries no valid identity");
        tonic::Status::unauthenticated("client certificate carries no valid trmx identity")
    })
}
