//! TLS for `--listen tcp:…`: rustls with the aws-lc-rs provider, TLS 1.3 only, and mutual TLS
//! when a client CA is given. A client certificate names its client (see [`certificate_names`]).
//! And the client's side, for `--remote https://…` ([`ClientTls`]): the same provider and
//! version, the service verified against a CA file (never the system's roots), and a client
//! certificate for mutual TLS.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The files of `--tls-cert`, `--tls-key` and `--client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), its own certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1), readable by its owner (and group) only.
    pub key: PathBuf,
    /// The CA (PEM, one or more certificates) client certificates must chain to; without it, no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The rustls configuration these files make: TLS 1.3 only, HTTP/1.1, and client
    /// certificates verified against the client CA when there is one. A client may still come
    /// without a certificate (it is then no client, unless another credential names it); one that
    /// shows a certificate of another CA is refused in the handshake.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a file that cannot be read or parsed, a key that others may
    /// read, or a certificate that does not go with the key.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = read_certificates(&self.cert, "--tls-cert")?;
        let key = read_private_key(&self.key, "--tls-key", "this service")?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(format!("TLS 1.3 with aws-lc-rs: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = read_roots(path, "--client-ca")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| invalid(format!("--client-ca {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            invalid(format!(
                "--tls-cert {} and --tls-key {}: {e} (the certificate must be the key's)",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidInput(message)
}

fn read_certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
        .map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{flag} {}: no certificate in it (give PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The certificates of a CA file (`flag` names it in messages), as trust anchors.
fn read_roots(path: &Path, flag: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in read_certificates(path, flag)? {
        roots.add(ca).map_err(|e| {
            invalid(format!(
                "{flag} {}: not a CA certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

/// The private key of `flag` (PEM: PKCS#8, SEC1 or PKCS#1), once [`check_key_private`] passed.
/// The file's bytes are read into memory zeroized when dropped (a `BufReader` would leave a
/// copy), and so is the DER this returns (rustls zeroizes it when it loads the key).
fn read_private_key(path: &Path, flag: &str, whom: &str) -> Result<PrivateKeyDer<'static>> {
    check_key_private(path, flag, whom)?;
    let pem = Zeroizing::new(
        std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?,
    );
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(format!(
            "{flag} {}: no private key read: {e} (give a PEM private key)",
            path.display()
        ))
    })
}

/// Refuses a private key that others may read, or group members write: whoever reads it can
/// be `whom` (the service to its clients, a client to the service). Group read is allowed
/// (`ssl-cert` and the like).
fn check_key_private(path: &Path, flag: &str, whom: &str) -> Result<()> {
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o027 != 0 {
        return Err(invalid(format!(
            "{flag} {} is open to others (mode {mode:o}): anyone who reads it can pose as \
             {whom}; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// The client's TLS for a service at `https://…` (`keyhold --remote`): rustls with the aws-lc-rs
/// provider, TLS 1.3 only, HTTP/1.1. The service's certificate must chain to the CA file given
/// (the system's roots are not used: a keystore's service is a private one, and trusting every
/// public CA would let any of them vouch for it) and be for the host connected to. With a
/// client certificate and key, the service may know the client by it (mutual TLS).
///
/// Messages name the command line's flags (`--remote-ca`, `--remote-cert`, `--remote-key`), as
/// [`TlsFiles`]' name the server's.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// Whether a client certificate is shown (when the service asks for one).
    certificate: bool,
}

impl ClientTls {
    /// Reads `ca` (PEM, one or more CA certificates the service's must chain to) and, if given,
    /// `identity`: this client's certificate chain (PEM, its own first) and its private key
    /// (PEM, readable by its owner and group only, as the server's `--tls-key`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a file that cannot be read or parsed, a key that others may
    /// read, or a certificate that does not go with the key.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = read_roots(ca, "--remote-ca")?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(format!("TLS 1.3 with aws-lc-rs: {e}")))?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let certs = read_certificates(cert_file, "--remote-cert")?;
                let key = read_private_key(key_file, "--remote-key", "this client")?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    invalid(format!(
                        "--remote-cert {} and --remote-key {}: {e} (the certificate must be the \
                         key's)",
                        cert_file.display(),
                        key_file.display()
                    ))
                })?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A resumed session is not verified again: the service would take this client by a
        // certificate checked when the ticket was issued, even one expired since. Every
        // connection makes a full handshake. (The service still sends its tickets, which the
        // check of this client's certificate waits for.)
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            certificate: identity.is_some(),
        })
    }

    /// The rustls configuration.
    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Whether this client shows a certificate (and so must hear the service's answer to it).
    pub(crate) fn shows_certificate(&self) -> bool {
        self.certificate
    }
}

/// The names a verified client certificate gives: its subject alternative names of type URI,
/// then of type DNS, then its subject's common names, in the certificate's order. A certificate
/// that cannot be read gives none (it was verified already, so this does not happen).
pub fn certificate_names(cert: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let _ = read_names(cert, &mut names);
    names
}

/// `id-ce-subjectAltName` (2.5.29.17) and `id-at-commonName` (2.5.4.3), their DER contents.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

fn read_names(cert: &[u8], names: &mut Vec<String>) -> Option<()> {
    let (_, certificate, _) = tlv(cert)?;
    let (_, mut tbs, _) = tlv(certificate)?;
    // version [0] (optional), serialNumber, signature, issuer, validity, subject, spki.
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    let mut fields = Vec::with_capacity(6);
    for _ in 0..6 {
        let (tag, content, rest) = tlv(tbs)?;
        fields.push((tag, content));
        tbs = rest;
    }
    let subject = fields.get(4)?.1;
    let mut common_names = Vec::new();
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (_, set, rest) = tlv(rdns)?;
        rdns = rest;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (_, attribute, rest) = tlv(attributes)?;
            attributes = rest;
            let (_, oid, value) = tlv(attribute)?;
            let (tag, text, _) = tlv(value)?;
            // UTF8String, PrintableString, IA5String.
            if oid == COMMON_NAME && matches!(tag, 0x0c | 0x13 | 0x16) {
                common_names.push(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    // issuerUniqueID [1], subjectUniqueID [2], extensions [3].
    while !tbs.is_empty() {
        let (tag, content, rest) = tlv(tbs)?;
        tbs = rest;
        if tag == 0xa3 {
            let (_, mut extensions, _) = tlv(content)?;
            while !extensions.is_empty() {
                let (_, extension, rest) = tlv(extensions)?;
                extensions = rest;
                let (_, oid, mut rest) = tlv(extension)?;
                if oid != SUBJECT_ALT_NAME {
                    continue;
                }
                let (mut tag, mut value, after) = tlv(rest)?;
                if tag == 0x01 {
                    // critical BOOLEAN
                    rest = after;
                    (tag, value, _) = tlv(rest)?;
                }
                if tag != 0x04 {
                    return None;
                }
                let (_, general_names, _) = tlv(value)?;
                let (mut uris, mut dns) = (Vec::new(), Vec::new());
                let mut left = general_names;
                while !left.is_empty() {
                    let (tag, text, rest) = tlv(left)?;
                    left = rest;
                    // [6] uniformResourceIdentifier, [2] dNSName: IA5String, implicit.
                    match tag {
                        0x86 => uris.push(String::from_utf8(text.to_vec()).ok()?),
                        0x82 => dns.push(String::from_utf8(text.to_vec()).ok()?),
                        _ => {}
                    }
                }
                names.extend(uris);
                names.extend(dns);
            }
        }
    }
    names.extend(common_names);
    Some(())
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(count)?;
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    let (content, after) = rest.split_at_checked(len)?;
    Some((tag, content, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_or_empty_input_gives_no_names_and_no_panic() {
        assert!(certificate_names(&[]).is_empty());
        assert!(certificate_names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(certificate_names(&[0x30, 0x03, 0x30, 0x01]).is_empty());
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let _ = certificate_names(&junk);
        }
    }
}
