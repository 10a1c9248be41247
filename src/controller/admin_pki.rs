//! The PKI of the workers' admin API: a CA the operator keeps (in a Secret of its namespace) and
//! the serving certificates it issues from it, one per deployment, naming the deployment's
//! headless Service (`<svc>.<namespace>.svc`), which the operator verifies while it dials pod
//! IPs (`worker::admin_tls::NamedVerifier`). Pure apart from the key generation: the time comes in.
//!
//! Validity: the CA 10 years, a serving certificate 90 days, re-issued once less than 30 days
//! are left ([`needs_reissue`]); the worker reloads the mounted files without a restart.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA certificate's validity.
pub const CA_VALIDITY_S: i64 = 10 * 365 * 86_400;
/// A serving certificate's validity.
pub const SERVING_VALIDITY_S: i64 = 90 * 86_400;
/// A serving certificate with less than this left is re-issued.
pub const RENEW_BEFORE_S: i64 = 30 * 86_400;

/// A certificate and its key, PEM, and when it expires (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub not_after: i64,
    /// The subject's common name (a CA's is what its certificates name as their issuer).
    pub common_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("admin TLS: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("admin TLS: time {0} is out of range")]
    Time(i64),
}

fn at(unix_s: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(unix_s).map_err(|_| PkiError::Time(unix_s))
}

/// The CA's parameters: its subject is its common name only, so the issuer of a certificate can
/// be rebuilt from the name and key kept in the Secret.
fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// A new CA, valid from an hour before `now` (clock skew) for [`CA_VALIDITY_S`].
pub fn new_ca(common_name: &str, now: i64) -> Result<Pem, PkiError> {
    let mut p = ca_params(common_name)?;
    p.not_before = at(now - 3600)?;
    p.not_after = at(now + CA_VALIDITY_S)?;
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: now + CA_VALIDITY_S,
        common_name: common_name.to_string(),
    })
}

/// A serving certificate for `names`, signed by `ca`, valid for [`SERVING_VALIDITY_S`].
pub fn issue(ca: &Pem, names: &[String], now: i64) -> Result<Pem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let params = ca_params(&ca.common_name)?;
    let issuer = Issuer::from_params(&params, ca_key);
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = at(now - 3600)?;
    let not_after = (now + SERVING_VALIDITY_S).min(ca.not_after);
    p.not_after = at(not_after)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
        common_name: names.first().cloned().unwrap_or_default(),
    })
}

/// Whether a serving certificate expiring at `not_after` is re-issued at `now`.
pub fn needs_reissue(not_after: i64, now: i64) -> bool {
    not_after - now < RENEW_BEFORE_S
}

/// The name a deployment's serving certificate carries and the operator verifies: its headless
/// Service's, `<service>.<namespace>.svc`.
pub fn serving_name(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.svc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_issued_and_renewed_before_expiry() {
        let now = 1_800_000_000;
        let ca = new_ca("moe-operator admin CA", now).unwrap();
        let name = serving_name("tiny-workers", "ml");
        assert_eq!(name, "tiny-workers.ml.svc");
        let leaf = issue(&ca, std::slice::from_ref(&name), now).unwrap();
        assert_eq!(leaf.not_after, now + SERVING_VALIDITY_S);
        assert!(!needs_reissue(leaf.not_after, now));
        assert!(!needs_reissue(leaf.not_after, now + 59 * 86_400));
        assert!(needs_reissue(leaf.not_after, now + 61 * 86_400));
        // Never past the CA.
        let old_ca = Pem {
            not_after: now + 86_400,
            ..ca.clone()
        };
        assert_eq!(
            issue(&old_ca, &[name], now).unwrap().not_after,
            now + 86_400
        );
    }
}
