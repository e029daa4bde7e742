//! TLS for the client listener: TLS 1.3 only, ALPN `micromsg/1`, ECDSA P-256 certificates.
//!
//! With no operator certificate, the broker makes a private CA and a server certificate signed
//! by it in `DATA_DIR/tls/` on first start (`ca.pem` is what clients trust) and reuses them after.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The ALPN protocol id of the client↔broker protocol.
pub const ALPN: &[u8] = b"micromsg/1";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files the broker serves with, and the CA clients should trust when it made its own.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// The generated CA certificate, when the broker made its own.
    pub ca: Option<PathBuf>,
}

/// Uses the operator's certificate, or makes (once) a private CA and a server certificate in
/// `tls_dir`, covering `localhost`, `127.0.0.1` and `extra_names`.
pub fn ensure_certificates(
    operator: Option<(&Path, &Path)>,
    tls_dir: &Path,
    extra_names: &[String],
) -> Result<TlsFiles, TlsError> {
    if let Some((cert, key)) = operator {
        return Ok(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: None,
        });
    }
    let files = TlsFiles {
        cert: tls_dir.join("server.pem"),
        key: tls_dir.join("server.key"),
        ca: Some(tls_dir.join("ca.pem")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    fs::create_dir_all(tls_dir).map_err(|source| TlsError::Io {
        path: tls_dir.to_owned(),
        source,
    })?;
    let ca = Authority::generate("MicroMsg broker private CA")?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(extra_names.iter().cloned());
    let (cert_pem, key_pem) = ca.issue_server(&names)?;
    write_file(&tls_dir.join("ca.key"), ca.key_pem().as_bytes(), true)?;
    write_file(&tls_dir.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_file(&files.key, key_pem.as_bytes(), true)?;
    write_file(&files.cert, cert_pem.as_bytes(), false)?;
    Ok(files)
}

/// A certificate authority held in memory: the broker's private CA, or a network CA.
#[derive(Debug)]
pub struct Authority {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Authority {
    /// A new self-signed CA with an ECDSA P-256 key, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self { params, key, cert })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses), valid two years.
    /// Returns (certificate PEM, private key PEM).
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), TlsError> {
        self.issue(
            names,
            names.first().map_or("micromsg", String::as_str),
            730,
            false,
        )
    }

    /// Issues a certificate usable as both TLS server and client (for broker-to-broker
    /// links), with `common_name` as its subject CN. `days` may be negative in tests to make an
    /// expired certificate.
    pub fn issue(
        &self,
        names: &[String],
        common_name: &str,
        days: i64,
        client_auth: bool,
    ) -> Result<(String, String), TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        if client_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        }
        let (not_before, not_after) = validity(days);
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// (not_before, not_after) for a certificate valid `days` from an hour ago; negative `days`
/// gives an already expired certificate.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = if days >= 0 {
        now + time::Duration::days(days)
    } else {
        // Expired: the whole validity window lies in the past.
        let end = now + time::Duration::days(days);
        return (end - time::Duration::days(1), end);
    };
    (not_before, not_after)
}

/// Loads the certificate chain and key and builds the TLS 1.3-only server configuration.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a file; `secret` files are created with mode 0600 before any byte is written.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}
