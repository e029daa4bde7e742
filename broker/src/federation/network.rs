//! The network file: which brokers form the network, where each listens for federation
//! calls, and which number prefixes each serves. Every broker of the network is configured
//! with the same file (`federation.network_file`).
//!
//! ```toml
//! name = "example-net"
//!
//! [[brokers]]
//! id = "broker-x"
//! endpoint = "broker-x.example:7401"
//! prefixes = ["555"]
//!
//! [[brokers]]
//! id = "broker-y"
//! endpoint = "broker-y.example:7401"
//! prefixes = ["556", "557"]
//! ```
//!
//! Rules (checked on load): broker ids are unique DNS labels (`[a-z0-9-]`, 1..63, not starting
//! or ending with `-`), because the id is a DNS name in the broker's certificate and is what a
//! peer verifies; prefixes are 1..12 digits, and no prefix of the network is a prefix of
//! another (so at most one broker serves any number); endpoints are `host:port`.
//!
//! [`init`] makes a whole network directory: the network CA, one certificate and key per
//! broker and the network file (`micromsg-broker network init`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::{Authority, TlsError, write_file};

/// Why a network file could not be loaded or a network made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The network breaks a rule (see the module docs).
    #[error("invalid network: {0}")]
    Invalid(String),
    /// Certificates could not be made or written.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One broker of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerEntry {
    /// The broker's id: its `server.broker_id` and the DNS name in its certificate.
    pub id: String,
    /// Where its federation listener is reached, `host:port`.
    pub endpoint: String,
    /// The number prefixes it allocates and serves.
    pub prefixes: Vec<String>,
}

impl BrokerEntry {
    /// The endpoint's host.
    pub fn host(&self) -> &str {
        split_endpoint(&self.endpoint).map_or("", |(h, _)| h)
    }

    /// The endpoint's port.
    pub fn port(&self) -> u16 {
        split_endpoint(&self.endpoint).map_or(0, |(_, p)| p)
    }

    /// Whether one of its prefixes starts `number`.
    pub fn serves(&self, number: &str) -> bool {
        self.prefixes.iter().any(|p| number.starts_with(p.as_str()))
    }
}

/// A loaded, checked network file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The network's name (shown to clients in BROKER-INFO).
    pub name: String,
    /// Its brokers.
    pub brokers: Vec<BrokerEntry>,
}

impl Network {
    /// Reads and checks a network file.
    pub fn load(path: &Path) -> Result<Self, NetworkError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetworkError::Io {
            path: path.to_owned(),
            source,
        })?;
        let network: Network = toml::from_str(&text).map_err(|e| NetworkError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        network.check()?;
        Ok(network)
    }

    /// Checks the rules of the module docs.
    pub fn check(&self) -> Result<(), NetworkError> {
        let invalid = |m: String| Err(NetworkError::Invalid(m));
        if self.name.is_empty() || self.name.chars().count() > 64 {
            return invalid("name must be 1..64 characters".into());
        }
        if self.brokers.is_empty() {
            return invalid("a network needs at least one broker".into());
        }
        let mut all_prefixes: Vec<(&str, &str)> = Vec::new();
        for (i, b) in self.brokers.iter().enumerate() {
            if !valid_id(&b.id) {
                return invalid(format!(
                    "broker id {:?}: use 1..63 lowercase letters, digits and '-'",
                    b.id
                ));
            }
            if self.brokers[..i].iter().any(|o| o.id == b.id) {
                return invalid(format!("broker id {:?} appears twice", b.id));
            }
            if split_endpoint(&b.endpoint).is_none() {
                return invalid(format!(
                    "broker {}: endpoint {:?} is not host:port",
                    b.id, b.endpoint
                ));
            }
            if b.prefixes.is_empty() {
                return invalid(format!("broker {} has no prefixes", b.id));
            }
            for p in &b.prefixes {
                if p.is_empty() || p.len() > 12 || !p.bytes().all(|c| c.is_ascii_digit()) {
                    return invalid(format!(
                        "broker {}: prefix {p:?} must be 1..12 digits",
                        b.id
                    ));
                }
                if let Some((other, q)) = all_prefixes
                    .iter()
                    .find(|(_, q)| q.starts_with(p.as_str()) || p.starts_with(q))
                {
                    return invalid(format!(
                        "prefix {p:?} of {} overlaps prefix {q:?} of {other}: a number must \
                         have one home",
                        b.id
                    ));
                }
                all_prefixes.push((&b.id, p));
            }
        }
        Ok(())
    }

    /// The broker with id `id`.
    pub fn broker(&self, id: &str) -> Option<&BrokerEntry> {
        self.brokers.iter().find(|b| b.id == id)
    }

    /// The broker whose prefixes hold `number` (at most one, by the rules).
    pub fn home_of(&self, number: &str) -> Option<&BrokerEntry> {
        self.brokers.iter().find(|b| b.serves(number))
    }

    /// Every broker except `me`.
    pub fn peers<'a>(&'a self, me: &'a str) -> impl Iterator<Item = &'a BrokerEntry> + 'a {
        self.brokers.iter().filter(move |b| b.id != me)
    }

    /// The file's TOML text.
    pub fn to_toml(&self) -> Result<String, NetworkError> {
        toml::to_string_pretty(self).map_err(|e| NetworkError::Invalid(e.to_string()))
    }
}

/// Whether `id` can be a broker id in a network: a DNS label of lowercase letters, digits and
/// `-`, 1..63 long, not starting or ending with `-`.
pub fn valid_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// Splits `host:port` (`[v6]:port` for IPv6).
pub fn split_endpoint(endpoint: &str) -> Option<(&str, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host, port))
}

/// One `--broker ID=PREFIX[,PREFIX…]` of `network init`, with its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitBroker {
    /// The broker id.
    pub id: String,
    /// Its prefixes.
    pub prefixes: Vec<String>,
    /// Its federation endpoint (see [`InitBroker::parse`] for the default).
    pub endpoint: String,
}

impl InitBroker {
    /// Parses `ID=PREFIX[,PREFIX…]`; the endpoint defaults to `localhost:7401`, then
    /// `localhost:7411`, … in the order the brokers are given (so a one-machine try-out works
    /// as is), until an `--endpoint ID=HOST:PORT` names it.
    pub fn parse(spec: &str, index: usize) -> Result<Self, NetworkError> {
        let (id, prefixes) = spec.split_once('=').ok_or_else(|| {
            NetworkError::Invalid(format!("--broker {spec:?}: expected ID=PREFIX[,PREFIX…]"))
        })?;
        let port = 7401 + 10 * index;
        Ok(Self {
            id: id.to_owned(),
            prefixes: prefixes.split(',').map(str::to_owned).collect(),
            endpoint: format!("localhost:{port}"),
        })
    }
}

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The network file.
    pub network_file: PathBuf,
    /// The network CA certificate.
    pub ca: PathBuf,
    /// Per broker: (id, certificate, key).
    pub brokers: Vec<(String, PathBuf, PathBuf)>,
}

/// Makes a network in `out`: `ca.pem` and `ca.key` (the network CA, ECDSA P-256), for each
/// broker `ID.pem` and `ID.key` (a certificate for TLS server and client use with the id as
/// subject CN and DNS name, plus the endpoint host), and `network.toml`.
///
/// Refuses to overwrite an existing network file (a new CA would cut off every broker that
/// still trusts the old one).
pub fn init(out: &Path, name: &str, brokers: &[InitBroker]) -> Result<InitReport, NetworkError> {
    init_keeping_ca(out, name, brokers).map(|(report, _ca)| report)
}

/// [`init`], also returning the network CA (tests use it to issue further certificates).
pub fn init_keeping_ca(
    out: &Path,
    name: &str,
    brokers: &[InitBroker],
) -> Result<(InitReport, Authority), NetworkError> {
    let network = Network {
        name: name.to_owned(),
        brokers: brokers
            .iter()
            .map(|b| BrokerEntry {
                id: b.id.clone(),
                endpoint: b.endpoint.clone(),
                prefixes: b.prefixes.clone(),
            })
            .collect(),
    };
    network.check()?;
    let network_file = out.join("network.toml");
    if network_file.exists() {
        return Err(NetworkError::Invalid(format!(
            "{} exists; choose another --out directory",
            network_file.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| NetworkError::Io {
        path: out.to_owned(),
        source,
    })?;
    let ca = Authority::generate(&format!("MicroMsg network CA: {name}"))?;
    let ca_file = out.join("ca.pem");
    write_file(&out.join("ca.key"), ca.key_pem().as_bytes(), true)?;
    write_file(&ca_file, ca.cert_pem().as_bytes(), false)?;
    let mut written = Vec::new();
    for b in &network.brokers {
        let (cert, key) = issue_broker_cert(&ca, b, 825)?;
        let cert_file = out.join(format!("{}.pem", b.id));
        let key_file = out.join(format!("{}.key", b.id));
        write_file(&key_file, key.as_bytes(), true)?;
        write_file(&cert_file, cert.as_bytes(), false)?;
        written.push((b.id.clone(), cert_file, key_file));
    }
    let text = format!(
        "# MicroMsg network file, made by `micromsg-broker network init`.\n\
         # Every broker of the network points federation.network_file at a copy of it.\n{}",
        network.to_toml()?
    );
    write_file(&network_file, text.as_bytes(), false)?;
    Ok((
        InitReport {
            network_file,
            ca: ca_file,
            brokers: written,
        },
        ca,
    ))
}

/// Issues a broker certificate: CN and DNS name = the id, plus the endpoint host (and
/// `localhost` / `127.0.0.1` when the host is local), for TLS server and client use.
pub fn issue_broker_cert(
    ca: &Authority,
    broker: &BrokerEntry,
    days: i64,
) -> Result<(String, String), NetworkError> {
    let mut names = vec![broker.id.clone()];
    let host = broker.host().to_owned();
    if !host.is_empty() && host != broker.id {
        names.push(host.clone());
    }
    if host == "localhost" {
        names.push("127.0.0.1".into());
    }
    Ok(ca.issue(&names, &broker.id, days, true)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(id: &str, prefixes: &[&str]) -> BrokerEntry {
        BrokerEntry {
            id: id.into(),
            endpoint: format!("{id}:7401"),
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn overlapping_prefixes_and_bad_ids_are_refused() {
        let ok = Network {
            name: "n".into(),
            brokers: vec![entry("x", &["555"]), entry("y", &["556", "557"])],
        };
        ok.check().unwrap();
        assert_eq!(ok.home_of("5561234567").unwrap().id, "y");
        assert!(ok.home_of("5581234567").is_none());
        let overlap = Network {
            name: "n".into(),
            brokers: vec![entry("x", &["555"]), entry("y", &["5551"])],
        };
        assert!(overlap.check().is_err());
        let dup = Network {
            name: "n".into(),
            brokers: vec![entry("x", &["555"]), entry("x", &["556"])],
        };
        assert!(dup.check().is_err());
        for bad in ["", "Upper", "a_b", "-a", "a-", &"a".repeat(64)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_id("broker-x1"));
    }

    #[test]
    fn endpoints_split() {
        assert_eq!(split_endpoint("h:1"), Some(("h", 1)));
        assert_eq!(split_endpoint("[::1]:7401"), Some(("::1", 7401)));
        assert_eq!(split_endpoint("h"), None);
        assert_eq!(split_endpoint("h:0"), None);
        assert_eq!(split_endpoint(":5"), None);
    }

    #[test]
    fn init_writes_a_loadable_network() {
        let dir = tempfile::tempdir().unwrap();
        let brokers = vec![
            InitBroker::parse("x=555", 0).unwrap(),
            InitBroker::parse("y=556,557", 1).unwrap(),
        ];
        let report = init(dir.path(), "test-net", &brokers).unwrap();
        let n = Network::load(&report.network_file).unwrap();
        assert_eq!(n.name, "test-net");
        assert_eq!(n.broker("y").unwrap().prefixes, vec!["556", "557"]);
        assert_eq!(n.broker("y").unwrap().endpoint, "localhost:7411");
        assert!(init(dir.path(), "again", &brokers).is_err());
    }
}
