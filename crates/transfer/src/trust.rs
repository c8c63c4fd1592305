//! Who may push and what may be installed: the owning site's ed25519 signature over
//! each version, pinned public keys per source site, and TLS (self-signed certificates
//! pinned by SHA-256 fingerprint, or certificates the operator provides).
//!
//! A version's signature covers `(package id, source site, source version, content
//! root)`; the content root covers every path, mode, time and byte. A relay (child
//! site) forwards the owner's signature unchanged and cannot make a valid one, so a DP
//! that pins the owner's key installs only what the owner published.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

const SIGNATURE_CONTEXT: &[u8] = b"dpsync version signature v1\0";
const HANDOVER_CONTEXT: &[u8] = b"dpsync ownership transfer v1\0";
const TICKET_CONTEXT: &[u8] = b"dpsync peer ticket v1\0";

/// A trust or key-handling failure, in words an administrator can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TrustError(pub String);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    // Hex digits only: `from_str_radix` alone would also take a sign ("+f").
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The bytes a version signature covers.
pub fn signed_message(package: &str, source_site: &str, version: i64, content_root: &str) -> Vec<u8> {
    let mut m = SIGNATURE_CONTEXT.to_vec();
    for part in [package.as_bytes(), b"\0", source_site.as_bytes(), b"\0"] {
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&version.to_le_bytes());
    m.extend_from_slice(content_root.to_ascii_lowercase().as_bytes());
    m
}

/// A site's signing key, kept in a PKCS#8 file readable only by its owner.
pub struct SiteKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SiteKey({})", self.public_hex())
    }
}

impl SiteKey {
    /// Loads the key at `path`, creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, TrustError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let err = |what: &str, e: &dyn std::fmt::Display| TrustError(format!("{what} {}: {e}", path.display()));
        if path.exists() {
            let md = std::fs::metadata(path).map_err(|e| err("cannot read the site key", &e))?;
            if md.permissions().mode() & 0o077 != 0 {
                return Err(TrustError(format!(
                    "site key {} is readable by others; run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
            let der = std::fs::read(path).map_err(|e| err("cannot read the site key", &e))?;
            let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| err("site key is not valid", &e))?;
            return Ok(Self { pair });
        }
        let der =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| err("cannot create a site key", &e))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err("cannot write the site key", &e))?;
            f.write_all(der.as_ref()).and_then(|_| f.sync_all()).map_err(|e| err("cannot write the site key", &e))?;
        }
        // A link, not a rename: of two servers creating the key of a shared library at
        // once, the first one's stays and the other loads it.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load_or_create(path),
            Err(e) => return Err(err("cannot write the site key", &e)),
        }
        let pair = Ed25519KeyPair::from_pkcs8(der.as_ref()).map_err(|e| err("site key is not valid", &e))?;
        Ok(Self { pair })
    }

    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// Signs a version; returns the signature in hex.
    pub fn sign(&self, package: &str, source_site: &str, version: i64, content_root: &str) -> String {
        hex(self.pair.sign(&signed_message(package, source_site, version, content_root)).as_ref())
    }

    /// Hands `package`, owned by `from_site` (this key's site), to `to_site` (whose key
    /// is `to_key`) from source version `from_version` on.
    pub fn hand_over(
        &self,
        package: &str,
        from_site: &str,
        to_site: &str,
        to_key: &str,
        from_version: i64,
    ) -> Handover {
        let mut h = Handover {
            from_site: from_site.to_ascii_uppercase(),
            from_key: self.public_hex(),
            to_site: to_site.to_ascii_uppercase(),
            to_key: to_key.trim().to_ascii_lowercase(),
            from_version,
            signature: String::new(),
        };
        h.signature = hex(self.pair.sign(&h.message(package)).as_ref());
        h
    }
}

/// A site's permission for one of its DPs (`holder`) to read the chunks of `package`
/// from other DPs while it installs `version`, until `expires_at` (unix seconds), signed
/// with the site's key. A DP serves chunks to a peer only with a ticket that verifies
/// against the key it pinned for `site`: DPs share no secret, and a ticket is worth
/// nothing for another package or after it expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    pub site: String,
    pub holder: String,
    pub package: String,
    pub version: i64,
    pub expires_at: i64,
    pub signature: String,
}

impl Ticket {
    fn message(&self) -> Vec<u8> {
        let mut m = TICKET_CONTEXT.to_vec();
        for part in [&self.site, &self.holder, &self.package] {
            m.extend_from_slice(part.as_bytes());
            m.push(0);
        }
        m.extend_from_slice(&self.version.to_le_bytes());
        m.extend_from_slice(&self.expires_at.to_le_bytes());
        m
    }

    /// A ticket signed with `key` (the key of `site`).
    pub fn issue(key: &SiteKey, site: &str, holder: &str, package: &str, version: i64, expires_at: i64) -> Self {
        let mut t = Ticket {
            site: site.to_ascii_uppercase(),
            holder: holder.to_owned(),
            package: package.to_ascii_uppercase(),
            version,
            expires_at,
            signature: String::new(),
        };
        t.signature = hex(key.pair.sign(&t.message()).as_ref());
        t
    }

    /// Wire form (one header value): the hex of its JSON.
    pub fn encode(&self) -> String {
        hex(&serde_json::to_vec(self).expect("serializable"))
    }

    pub fn decode(text: &str) -> Result<Self, TrustError> {
        let bytes = unhex(text).ok_or_else(|| TrustError("the peer ticket is not hex".into()))?;
        serde_json::from_slice(&bytes).map_err(|e| TrustError(format!("the peer ticket does not parse: {e}")))
    }

    /// Whether the signature matches `public_hex`.
    pub fn signed_by(&self, public_hex: &str) -> bool {
        let (Some(key), Some(sig)) = (unhex(public_hex), unhex(&self.signature)) else { return false };
        UnparsedPublicKey::new(&ED25519, key).verify(&self.message(), &sig).is_ok()
    }
}

/// One link of a package's ownership: its owner `from_site` (key `from_key`) hands it
/// to `to_site` (key `to_key`), whose versions count from `from_version`, signed by the
/// giver. A chain of them, starting at the site named by the package id, says who owns
/// a package now and who signed each of its versions; a receiver verifies every link, so
/// it needs no key but the first owner's (pinned as any source site's) to trust the new
/// owner's signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub from_site: String,
    pub from_key: String,
    pub to_site: String,
    pub to_key: String,
    pub from_version: i64,
    pub signature: String,
}

impl Handover {
    fn message(&self, package: &str) -> Vec<u8> {
        let mut m = HANDOVER_CONTEXT.to_vec();
        for part in [package, &self.from_site, &self.from_key, &self.to_site, &self.to_key] {
            m.extend_from_slice(part.as_bytes());
            m.push(0);
        }
        m.extend_from_slice(&self.from_version.to_le_bytes());
        m
    }

    /// A chain in its wire form: links `FROM:FROMKEY:TO:TOKEY:VERSION:SIGNATURE` joined
    /// by `.` (letters, digits and those separators only).
    pub fn encode_chain(chain: &[Handover]) -> String {
        chain
            .iter()
            .map(|h| {
                format!("{}:{}:{}:{}:{}:{}", h.from_site, h.from_key, h.to_site, h.to_key, h.from_version, h.signature)
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Decodes a chain (at most 64 links), without verifying it.
    pub fn decode_chain(text: &str) -> Result<Vec<Handover>, TrustError> {
        let bad = |why: &str| TrustError(format!("ownership chain is malformed: {why}"));
        let links: Vec<&str> = text.trim().split('.').filter(|l| !l.is_empty()).collect();
        if links.is_empty() || links.len() > 64 {
            return Err(bad("it has no link, or too many"));
        }
        links
            .into_iter()
            .map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                let [from_site, from_key, to_site, to_key, version, signature] = f[..] else {
                    return Err(bad("a link does not have six fields"));
                };
                let site_ok = |s: &str| s.len() == 3 && s.bytes().all(|b| b.is_ascii_alphanumeric());
                let key_ok = |k: &str| unhex(k).is_some_and(|b| b.len() == 32);
                if !site_ok(from_site) || !site_ok(to_site) || !key_ok(from_key) || !key_ok(to_key) {
                    return Err(bad("a site code or key is not valid"));
                }
                Ok(Handover {
                    from_site: from_site.to_ascii_uppercase(),
                    from_key: from_key.to_ascii_lowercase(),
                    to_site: to_site.to_ascii_uppercase(),
                    to_key: to_key.to_ascii_lowercase(),
                    from_version: version.parse().map_err(|_| bad("a version is not a number"))?,
                    signature: signature.to_ascii_lowercase(),
                })
            })
            .collect()
    }
}

/// The owners of a package along a verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The site named by the package id, and the key its first link was signed with.
    pub first_site: String,
    pub first_key: String,
    pub chain: Vec<Handover>,
}

impl Ownership {
    /// Verifies `chain` for `package`: it starts at the site the id names, each link is
    /// signed by the owner it starts from, and versions only grow.
    pub fn verify(package: &str, chain: Vec<Handover>) -> Result<Self, TrustError> {
        let first_site = package.get(..3).unwrap_or(package).to_ascii_uppercase();
        let (mut owner, mut key) = (first_site.clone(), chain.first().map(|h| h.from_key.clone()).unwrap_or_default());
        let mut version = i64::MIN;
        for h in &chain {
            if h.from_site != owner || h.from_key != key {
                return Err(TrustError(format!(
                    "ownership chain of {package}: {} handed it over while {owner} owned it",
                    h.from_site
                )));
            }
            let sig = unhex(&h.signature).unwrap_or_default();
            let k = unhex(&h.from_key).unwrap_or_default();
            if UnparsedPublicKey::new(&ED25519, k).verify(&h.message(package), &sig).is_err() {
                return Err(TrustError(format!(
                    "ownership chain of {package}: the handover from {} to {} is not signed by {}",
                    h.from_site, h.to_site, h.from_site
                )));
            }
            if h.from_version < version || h.from_version < 1 {
                return Err(TrustError(format!("ownership chain of {package}: versions go back")));
            }
            (owner, key, version) = (h.to_site.clone(), h.to_key.clone(), h.from_version);
        }
        let first_key = chain.first().map(|h| h.from_key.clone()).unwrap_or_default();
        Ok(Self { first_site, first_key, chain })
    }

    /// Who owned the package at `version` (signed it), and with which key (`None` for
    /// the first owner, whose key is pinned like any source site's).
    pub fn owner_at(&self, version: i64) -> (String, Option<String>) {
        match self.chain.iter().rev().find(|h| h.from_version <= version) {
            Some(h) => (h.to_site.clone(), Some(h.to_key.clone())),
            None => (self.first_site.clone(), None),
        }
    }

    /// The owner now.
    pub fn owner(&self) -> &str {
        self.chain.last().map_or(&self.first_site, |h| &h.to_site)
    }
}

/// Checks a version signature against a site's public key (both hex).
pub fn verify(
    public_hex: &str,
    package: &str,
    source_site: &str,
    version: i64,
    content_root: &str,
    signature_hex: &str,
) -> bool {
    let (Some(key), Some(sig)) = (unhex(public_hex), unhex(signature_hex)) else { return false };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_message(package, source_site, version, content_root), &sig)
        .is_ok()
}

/// Public keys of source sites, by site code: pinned by the operator (`--trust`) or on
/// first use, persisted in a JSON file. A key never changes silently. Beside it, the
/// verified ownership chains of packages handed to another site
/// (`package-owners.json`): a version of such a package must come from its owner at
/// that version.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    keys: Mutex<BTreeMap<String, String>>,
    /// Refuse sites that were not pinned by the operator.
    strict: bool,
    owners_path: PathBuf,
    /// Wire form of each handed-over package's chain.
    owners: Mutex<BTreeMap<String, String>>,
}

impl TrustStore {
    pub fn open(path: &Path, pinned: &[(String, String)], strict: bool) -> Result<Self, TrustError> {
        let mut keys: BTreeMap<String, String> = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| TrustError(format!("trust file {} is corrupt: {e}", path.display())))?,
            Err(_) => BTreeMap::new(),
        };
        for (site, key) in pinned {
            let key = key.trim().to_ascii_lowercase();
            if unhex(&key).is_none_or(|k| k.len() != 32) {
                return Err(TrustError(format!("the key given for site {site} is not 64 hex digits")));
            }
            keys.insert(site.to_ascii_uppercase(), key);
        }
        let owners_path = path.with_file_name("package-owners.json");
        let owners: BTreeMap<String, String> = match std::fs::read(&owners_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| TrustError(format!("ownership file {} is corrupt: {e}", owners_path.display())))?,
            Err(_) => BTreeMap::new(),
        };
        let store =
            Self { path: path.to_owned(), keys: Mutex::new(keys), strict, owners_path, owners: Mutex::new(owners) };
        store.save()?;
        Ok(store)
    }

    /// The verified ownership of a handed-over package (`None`: it never was).
    pub fn ownership(&self, package: &str) -> Option<Ownership> {
        let text = self.owners.lock().unwrap().get(&package.to_ascii_uppercase()).cloned()?;
        Handover::decode_chain(&text).and_then(|c| Ownership::verify(package, c)).ok()
    }

    /// Verifies and keeps the ownership chain of `package`, as its owner sent it: the
    /// first link must be signed by the key pinned for the site the id names (pinned now,
    /// on first use, unless strict). A chain shorter than the one kept is ignored (an
    /// older owner relaying). Returns the owner now.
    pub fn record_ownership(&self, package: &str, chain_text: &str) -> Result<Ownership, TrustError> {
        let own = Ownership::verify(package, Handover::decode_chain(chain_text)?)?;
        match self.key_of(&own.first_site) {
            Some(k) if k != own.first_key => {
                return Err(TrustError(format!(
                    "the handover of {package} is not signed with the pinned key of site {}",
                    own.first_site
                )));
            }
            Some(_) => {}
            None if self.strict => {
                return Err(TrustError(format!(
                    "source site {} is not trusted here; start with --trust {}=<its key from `dpsync info`>",
                    own.first_site, own.first_site
                )));
            }
            None => {
                tracing::warn!(site = %own.first_site, key = %own.first_key, "pinning the key of a source site on first use");
                self.keys.lock().unwrap().insert(own.first_site.clone(), own.first_key.clone());
                self.save()?;
            }
        }
        let key = package.to_ascii_uppercase();
        let kept = self.ownership(package);
        if kept.as_ref().is_some_and(|k| k.chain.len() > own.chain.len()) {
            return Ok(kept.expect("checked"));
        }
        if let Some(k) = &kept
            && own.chain[..k.chain.len()] != k.chain[..]
        {
            return Err(TrustError(format!("the ownership chain of {package} does not extend the one known here")));
        }
        if kept.as_ref().is_none_or(|k| k.chain.len() < own.chain.len()) {
            tracing::info!(package, owner = %own.owner(), "package handed over to another site");
            self.owners.lock().unwrap().insert(key, Handover::encode_chain(&own.chain));
            let json = serde_json::to_vec_pretty(&*self.owners.lock().unwrap()).expect("serializable");
            let tmp = self.owners_path.with_extension("tmp");
            std::fs::write(&tmp, json)
                .and_then(|_| std::fs::rename(&tmp, &self.owners_path))
                .map_err(|e| TrustError(format!("cannot write {}: {e}", self.owners_path.display())))?;
        }
        Ok(own)
    }

    fn save(&self) -> Result<(), TrustError> {
        let json = serde_json::to_vec_pretty(&*self.keys.lock().unwrap()).expect("serializable");
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| TrustError(format!("cannot write {}: {e}", self.path.display())))
    }

    /// The pinned key of `site`.
    pub fn key_of(&self, site: &str) -> Option<String> {
        self.keys.lock().unwrap().get(&site.to_ascii_uppercase()).cloned()
    }

    /// Verifies a peer ticket (wire form) for reading chunks of `package` at `now` (unix
    /// seconds): it must name the package, not have expired, and be signed with the key
    /// pinned here for its site (never pinned on first use). Errors say why.
    pub fn check_ticket(&self, text: &str, package: &str, now: i64) -> Result<Ticket, TrustError> {
        let t = Ticket::decode(text)?;
        if !t.package.eq_ignore_ascii_case(package) {
            return Err(TrustError(format!("the peer ticket is for package {}, not {package}", t.package)));
        }
        if t.expires_at <= now {
            return Err(TrustError(format!("the peer ticket of {} expired", t.holder)));
        }
        let Some(key) = self.key_of(&t.site) else {
            return Err(TrustError(format!(
                "the peer ticket comes from site {}, whose key is not pinned here",
                t.site
            )));
        };
        if !t.signed_by(&key) {
            return Err(TrustError(format!("the peer ticket is not signed with the pinned key of site {}", t.site)));
        }
        Ok(t)
    }

    /// Verifies a version from `source_site`, pinning `presented_key` on first use
    /// (unless strict). Errors say what to do.
    pub fn check(
        &self,
        package: &str,
        source_site: &str,
        version: i64,
        content_root: &str,
        signature: Option<&str>,
        presented_key: Option<&str>,
    ) -> Result<(), TrustError> {
        let Some(signature) = signature else {
            return Err(TrustError(format!(
                "{package} version {version} is not signed by its source site {source_site}"
            )));
        };
        let site = source_site.to_ascii_uppercase();
        // A package id starts with its owner's site code (`PS100012` belongs to PS1). Without
        // this, a sender could claim another, never-seen site for a pinned site's package,
        // have that site's key pinned on first use, and replace the package's content. A
        // package handed over belongs, for each version, to its owner at that version,
        // whose key the verified chain gives.
        let (owner, handed_key) = match self.ownership(package) {
            Some(own) => own.owner_at(version),
            None => (package.get(..3).unwrap_or(package).to_ascii_uppercase(), None),
        };
        if !owner.eq_ignore_ascii_case(&site) {
            return Err(TrustError(format!(
                "package {package} belongs to site {owner} at version {version}; a version of it cannot come \
                 from site {site}"
            )));
        }
        if let Some(key) = handed_key {
            return if verify(&key, package, &site, version, content_root, signature) {
                Ok(())
            } else {
                Err(TrustError(format!(
                    "the signature of {package} version {version} does not match the key its owner {site} \
                     was handed the package with"
                )))
            };
        }
        let key = match self.key_of(&site) {
            Some(k) => k,
            None if self.strict => {
                return Err(TrustError(format!(
                    "source site {site} is not trusted here; start with --trust {site}=<its key from `dpsync info`>"
                )));
            }
            None => {
                let Some(k) = presented_key.map(|k| k.trim().to_ascii_lowercase()) else {
                    return Err(TrustError(format!("no key for source site {site} was presented or pinned")));
                };
                if !verify(&k, package, &site, version, content_root, signature) {
                    return Err(TrustError(format!("the signature of {package} version {version} does not verify")));
                }
                tracing::warn!(site = %site, key = %k, "pinning the key of a source site on first use");
                self.keys.lock().unwrap().insert(site.clone(), k.clone());
                self.save()?;
                k
            }
        };
        if verify(&key, package, &site, version, content_root, signature) {
            Ok(())
        } else {
            Err(TrustError(format!(
                "the signature of {package} version {version} does not match the pinned key of site {site}: \
                 content was altered on the way, or the site's key changed (then re-pin it with --trust)"
            )))
        }
    }
}

/// SHA-256 of a certificate (DER), lowercase hex: what `dp add --fingerprint` pins.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der).as_ref())
}

/// Accepts `AB:CD:…` or `abcd…`; returns 64 lowercase hex digits.
pub fn normalize_fingerprint(s: &str) -> Result<String, TrustError> {
    let f: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if f.len() == 64 && f.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(f)
    } else {
        Err(TrustError(format!("fingerprint {s:?} is not a SHA-256 (64 hex digits, colons allowed)")))
    }
}

/// How a pin mismatch starts; [`presented_fingerprint`] reads the fingerprint after it.
const PRESENTED: &str = "certificate fingerprint ";

/// The fingerprint a target presented instead of the pinned one, from the message of a
/// failed pinned handshake (somewhere in an error chain), so that the administrator can be
/// told the exact command that re-pins it.
pub fn presented_fingerprint(message: &str) -> Option<&str> {
    let at = message.find(PRESENTED)? + PRESENTED.len();
    let fp = message.get(at..at + 64)?;
    fp.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()).then_some(fp)
}

/// Accepts exactly the server certificate with the pinned SHA-256; the handshake
/// signatures are still checked, so the peer must hold the certificate's key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity.as_ref()) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "{PRESENTED}{} is not the pinned {}",
                fingerprint(end_entity.as_ref()),
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Installs aws-lc-rs as the process's rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A client TLS configuration that pins one certificate fingerprint.
pub fn pinned_client_config(fingerprint: &str) -> Result<rustls::ClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = PinnedCert { fingerprint: normalize_fingerprint(fingerprint)?, provider: provider.clone() };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(cfg)
}

/// A certificate and key in PEM.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertPair(<key redacted>)")
    }
}

/// Creates a self-signed certificate for `hosts` (names or IP addresses).
pub fn self_signed(hosts: &[String]) -> Result<CertPair, TrustError> {
    let c = rcgen::generate_simple_self_signed(hosts.to_vec()).map_err(|e| TrustError(format!("certificate: {e}")))?;
    Ok(CertPair { cert_pem: c.cert.pem(), key_pem: c.signing_key.serialize_pem() })
}

/// The SHA-256 fingerprint of the first certificate in a PEM text.
pub fn pem_fingerprint(cert_pem: &str) -> Result<String, TrustError> {
    use rustls_pki_types::pem::PemObject;
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TrustError(format!("certificate: {e:?}")))?;
    Ok(fingerprint(der.as_ref()))
}

/// A server TLS configuration from PEM certificate chain and key.
pub fn server_config(pair: &CertPair) -> Result<Arc<rustls::ServerConfig>, TrustError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TrustError(format!("certificate: {e:?}")))?;
    if certs.is_empty() {
        return Err(TrustError("the certificate file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(|e| TrustError(format!("key: {e:?}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TrustError(format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_every_field() {
        let dir = std::env::temp_dir().join(format!("dpsync-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = SiteKey::load_or_create(&dir.join("site.key")).unwrap();
        let again = SiteKey::load_or_create(&dir.join("site.key")).unwrap();
        assert_eq!(key.public_hex(), again.public_hex());
        let root = "ab".repeat(32);
        let sig = key.sign("PS100001", "PS1", 3, &root);
        let pk = key.public_hex();
        assert!(verify(&pk, "PS100001", "PS1", 3, &root, &sig));
        assert!(!verify(&pk, "PS100002", "PS1", 3, &root, &sig));
        assert!(!verify(&pk, "PS100001", "CH1", 3, &root, &sig));
        assert!(!verify(&pk, "PS100001", "PS1", 4, &root, &sig));
        assert!(!verify(&pk, "PS100001", "PS1", 3, &"cd".repeat(32), &sig));
        assert!(!verify(&pk, "PS100001", "PS1", 3, &root, "00"));
        let trust = TrustStore::open(&dir.join("trust.json"), &[], false).unwrap();
        trust.check("PS100001", "PS1", 3, &root, Some(&sig), Some(&pk)).unwrap();
        let other = SiteKey::load_or_create(&dir.join("other.key")).unwrap();
        let forged = other.sign("PS100001", "PS1", 4, &root);
        assert!(trust.check("PS100001", "PS1", 4, &root, Some(&forged), Some(&other.public_hex())).is_err());
        assert!(trust.check("PS100001", "PS1", 3, &root, None, Some(&pk)).is_err());
        let strict = TrustStore::open(&dir.join("strict.json"), &[], true).unwrap();
        assert!(strict.check("PS100001", "PS1", 3, &root, Some(&sig), Some(&pk)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: a sender could claim a never-seen site for another site's package and
    /// have its own key pinned on first use, replacing the package's content.
    #[test]
    fn a_package_comes_only_from_the_site_in_its_id() {
        let dir = std::env::temp_dir().join(format!("dpsync-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let owner = SiteKey::load_or_create(&dir.join("owner.key")).unwrap();
        let intruder = SiteKey::load_or_create(&dir.join("intruder.key")).unwrap();
        let root = "ab".repeat(32);
        let trust = TrustStore::open(&dir.join("trust.json"), &[], false).unwrap();
        let sig = owner.sign("PS100001", "PS1", 1, &root);
        trust.check("PS100001", "ps1", 1, &root, Some(&sig), Some(&owner.public_hex())).unwrap();
        let claim = intruder.sign("PS100001", "EV1", 2, &root);
        let e = trust.check("PS100001", "EV1", 2, &root, Some(&claim), Some(&intruder.public_hex())).unwrap_err();
        assert!(e.to_string().contains("belongs to site PS1"), "{e}");
        assert_eq!(trust.key_of("EV1"), None, "nothing pinned for the claimed site");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_handed_over_package_takes_its_new_owners_signatures_only() {
        let dir = std::env::temp_dir().join(format!("dpsync-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ps1 = SiteKey::load_or_create(&dir.join("ps1.key")).unwrap();
        let ch1 = SiteKey::load_or_create(&dir.join("ch1.key")).unwrap();
        let root = "ab".repeat(32);
        let trust = TrustStore::open(&dir.join("trust.json"), &[], false).unwrap();
        trust
            .check("PS100001", "PS1", 1, &root, Some(&ps1.sign("PS100001", "PS1", 1, &root)), Some(&ps1.public_hex()))
            .unwrap();

        let link = ps1.hand_over("PS100001", "PS1", "CH1", &ch1.public_hex(), 3);
        let chain = Handover::encode_chain(std::slice::from_ref(&link));
        assert_eq!(Handover::decode_chain(&chain).unwrap(), vec![link.clone()]);
        let own = trust.record_ownership("PS100001", &chain).unwrap();
        assert_eq!(own.owner(), "CH1");
        assert_eq!(own.owner_at(2), ("PS1".to_owned(), None));
        assert_eq!(own.owner_at(3), ("CH1".to_owned(), Some(ch1.public_hex())));
        // From version 3 on, CH1 signs, with the key the handover named: no pinning needed.
        trust.check("PS100001", "CH1", 3, &root, Some(&ch1.sign("PS100001", "CH1", 3, &root)), None).unwrap();
        assert_eq!(trust.key_of("CH1"), None, "nothing was pinned for CH1");
        // PS1 may still relay its older versions, but not make new ones.
        trust.check("PS100001", "PS1", 2, &root, Some(&ps1.sign("PS100001", "PS1", 2, &root)), None).unwrap();
        let e =
            trust.check("PS100001", "PS1", 4, &root, Some(&ps1.sign("PS100001", "PS1", 4, &root)), None).unwrap_err();
        assert!(e.to_string().contains("belongs to site CH1"), "{e}");
        let e =
            trust.check("PS100001", "CH1", 4, &root, Some(&ps1.sign("PS100001", "CH1", 4, &root)), None).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        // Kept across a restart.
        let reopened = TrustStore::open(&dir.join("trust.json"), &[], false).unwrap();
        assert_eq!(reopened.ownership("PS100001").unwrap().owner(), "CH1");

        // Forged or broken chains are refused.
        let intruder = SiteKey::load_or_create(&dir.join("ev.key")).unwrap();
        let forged = intruder.hand_over("PS100002", "PS1", "EV1", &intruder.public_hex(), 5);
        let e = trust.record_ownership("PS100002", &Handover::encode_chain(std::slice::from_ref(&forged))).unwrap_err();
        assert!(e.to_string().contains("pinned key"), "{e}");
        let mut altered = link.clone();
        altered.to_key = intruder.public_hex();
        assert!(trust.record_ownership("PS100001", &Handover::encode_chain(&[altered])).is_err());
        let skipped = intruder.hand_over("PS100001", "CH1", "EV1", &intruder.public_hex(), 5);
        assert!(trust.record_ownership("PS100001", &Handover::encode_chain(&[link.clone(), skipped])).is_err());
        for bad in ["", "x", "PS1:zz:CH1:00:1:00", &"a.".repeat(70)] {
            assert!(Handover::decode_chain(bad).is_err(), "{bad:?}");
        }
        // The chain grows: CH1 hands it back to PS1 from version 6.
        let back = ch1.hand_over("PS100001", "CH1", "PS1", &ps1.public_hex(), 6);
        let longer = Handover::encode_chain(&[link.clone(), back]);
        assert_eq!(trust.record_ownership("PS100001", &longer).unwrap().owner(), "PS1");
        assert_eq!(trust.record_ownership("PS100001", &chain).unwrap().owner(), "PS1", "a shorter chain is old news");
        trust.check("PS100001", "PS1", 6, &root, Some(&ps1.sign("PS100001", "PS1", 6, &root)), None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tickets_verify_only_for_their_package_key_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let key = SiteKey::load_or_create(&dir.path().join("k")).unwrap();
        let other = SiteKey::load_or_create(&dir.path().join("o")).unwrap();
        let trust = TrustStore::open(&dir.path().join("t.json"), &[("PS1".into(), key.public_hex())], false).unwrap();
        let t = Ticket::issue(&key, "PS1", "dp1", "PS100001", 3, 1_000);
        let wire = t.encode();
        assert_eq!(trust.check_ticket(&wire, "PS100001", 999).unwrap(), t);
        assert!(trust.check_ticket(&wire, "PS100002", 999).unwrap_err().0.contains("not PS100002"));
        assert!(trust.check_ticket(&wire, "PS100001", 1_000).unwrap_err().0.contains("expired"));
        let forged = Ticket::issue(&other, "PS1", "dp1", "PS100001", 3, 1_000);
        assert!(trust.check_ticket(&forged.encode(), "PS100001", 999).unwrap_err().0.contains("not signed"));
        let mut stretched = t.clone();
        stretched.expires_at = 5_000;
        assert!(trust.check_ticket(&stretched.encode(), "PS100001", 2_000).is_err());
        let unknown = Ticket::issue(&key, "XY1", "dp1", "PS100001", 3, 1_000);
        assert!(trust.check_ticket(&unknown.encode(), "PS100001", 999).unwrap_err().0.contains("not pinned"));
        assert!(trust.check_ticket("zz", "PS100001", 999).is_err());
    }

    #[test]
    fn fingerprints_normalize() {
        let f = "AB:".repeat(31) + "AB";
        assert_eq!(normalize_fingerprint(&f).unwrap(), "ab".repeat(32));
        assert!(normalize_fingerprint("abc").is_err());
        let pair = self_signed(&["localhost".into()]).unwrap();
        assert_eq!(pem_fingerprint(&pair.cert_pem).unwrap().len(), 64);
        install_crypto_provider();
        server_config(&pair).unwrap();
        pinned_client_config(&pem_fingerprint(&pair.cert_pem).unwrap()).unwrap();
    }
}
