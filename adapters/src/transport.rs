//! The HTTP transport every built-in HTTP client shares: TLS (rustls with the ring
//! provider), trust, client certificates, proxies, and the description of a failed send.
//!
//! Trust, in order of precedence:
//!
//! * the platform's root store (on Linux the system bundle, e.g.
//!   `/etc/ssl/certs/ca-certificates.crt`). As with OpenSSL, curl and most TLS clients,
//!   `SSL_CERT_FILE` (a PEM bundle) or `SSL_CERT_DIR`, when set, stands in for the system
//!   bundle;
//! * plus the endpoint's own `ca_file` (a PEM bundle), which is added to those roots.
//!
//! Transport settings understood on every endpoint of the `rest` and `http` adapters (and
//! by [`WebhookSink`](crate::webhook::WebhookSink)):
//!
//! | key                    | meaning                                                     |
//! |------------------------|-------------------------------------------------------------|
//! | `ca_file`              | PEM file of extra CA certificates to trust                  |
//! | `client_cert_file`     | PEM certificate chain presented for mutual TLS              |
//! | `client_key_file`      | PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1) |
//! | `insecure_skip_verify` | `true` accepts any server certificate: logged as a warning at start and shown by `bulwark status` and the dashboard |
//! | `proxy`                | proxy URL for this endpoint (`http://`, `https://`, `socks5://`), or `none` for a direct connection |
//!
//! Without `proxy`, the conventional `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
//! `NO_PROXY` variables (and their lower-case forms) apply. A proxy URL may carry
//! credentials; it never appears in `Debug` output, logs or errors.
//!
//! Clients are pooled by their settings ([`ClientPool`]): endpoints with the same
//! transport share one connection pool, so 7,200 endpoints on one platform hold one.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::Duration;

/// The settings keys [`TransportSettings`] reads (accepted by every HTTP adapter).
pub const TRANSPORT_KEYS: &[&str] = &[
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "insecure_skip_verify",
    "proxy",
];

/// The settings keys that hold file paths (a configuration file resolves them relative
/// to its own directory).
pub const PATH_KEYS: &[&str] = &["ca_file", "client_cert_file", "client_key_file"];

/// Install ring as the process's rustls crypto provider, once. Every client this crate
/// builds calls it; a program that builds its own rustls or reqwest clients beside
/// Bulwark's may call it first (or install a provider of its own, which is then kept).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means a provider is installed already (the host program's): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// How an endpoint reaches its server: extra trust, client identity, proxy.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct TransportSettings {
    /// Extra CA certificates (PEM) trusted beside the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key_file: Option<PathBuf>,
    /// Accept any server certificate (never silently: see the [module docs](self)).
    pub insecure_skip_verify: bool,
    /// The endpoint's proxy.
    pub proxy: Option<ProxySetting>,
}

/// An endpoint's `proxy` setting.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ProxySetting {
    /// `none`: connect directly, ignoring the proxy environment variables.
    Direct,
    /// Every request through this proxy URL (may hold credentials).
    Url(String),
}

impl fmt::Debug for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxySetting::Direct => "none",
            ProxySetting::Url(_) => "<redacted>",
        })
    }
}

impl fmt::Debug for TransportSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportSettings")
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl TransportSettings {
    /// Read the [`TRANSPORT_KEYS`] of an endpoint's settings (other keys are ignored).
    /// The error names the key and what is wrong with it.
    pub fn from_settings(settings: &HashMap<String, String>) -> Result<Self, String> {
        let path = |key: &str| -> Result<Option<PathBuf>, String> {
            match settings.get(key).map(|s| s.trim()) {
                None => Ok(None),
                Some("") => Err(format!("`{key}` is empty")),
                Some(p) => Ok(Some(PathBuf::from(p))),
            }
        };
        let insecure_skip_verify = match settings.get("insecure_skip_verify").map(|s| s.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(format!(
                    "`insecure_skip_verify` must be true or false, got {other:?}"
                ));
            }
        };
        let proxy = match settings.get("proxy").map(|s| s.trim()) {
            None => None,
            Some("none") => Some(ProxySetting::Direct),
            Some(url) => {
                let parsed = reqwest::Url::parse(url).map_err(|e| {
                    format!("`proxy` is not a URL ({e}); give http://host:port or none")
                })?;
                if !matches!(parsed.scheme(), "http" | "https" | "socks5" | "socks5h") {
                    return Err(format!(
                        "`proxy` must be an http://, https:// or socks5:// URL or none, got scheme {:?}",
                        parsed.scheme()
                    ));
                }
                Some(ProxySetting::Url(url.to_owned()))
            }
        };
        let out = Self {
            ca_file: path("ca_file")?,
            client_cert_file: path("client_cert_file")?,
            client_key_file: path("client_key_file")?,
            insecure_skip_verify,
            proxy,
        };
        if out.client_cert_file.is_some() != out.client_key_file.is_some() {
            return Err("`client_cert_file` and `client_key_file` go together: give both".into());
        }
        Ok(out)
    }

    /// Apply these settings to `builder`: reads and checks the certificate files now, so
    /// a missing or malformed file is a configuration error at start, not at first send.
    pub fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, String> {
        install_crypto_provider();
        if let Some(ca) = &self.ca_file {
            let pem = read(ca, "ca_file")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "`ca_file` {}: not a PEM certificate bundle: {e}",
                    ca.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "`ca_file` {}: holds no PEM certificate",
                    ca.display()
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        if let (Some(cert), Some(key)) = (&self.client_cert_file, &self.client_key_file) {
            let mut pem = read(cert, "client_cert_file")?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "`client_cert_file` {}: holds no PEM certificate",
                    cert.display()
                ));
            }
            pem.push(b'\n');
            pem.extend(read(key, "client_key_file")?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                format!(
                    "`client_cert_file` {} / `client_key_file` {}: not a usable certificate and private key: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
            builder = builder.identity(identity);
        }
        if self.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        match &self.proxy {
            None => {}
            Some(ProxySetting::Direct) => builder = builder.no_proxy(),
            Some(ProxySetting::Url(url)) => {
                // The error of a bad proxy URL may quote it: say only that it is bad.
                let proxy = reqwest::Proxy::all(url.as_str())
                    .map_err(|_| "`proxy` is not a usable proxy URL".to_string())?;
                builder = builder.proxy(proxy);
            }
        }
        Ok(builder)
    }
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("`{key}` {}: cannot read: {e}", path.display()))
}

/// The base every pooled client starts from.
fn base_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(10))
}

/// HTTP clients keyed by their [`TransportSettings`], so endpoints that reach their
/// servers the same way share one connection pool.
///
/// Pooled connections are driven by the Tokio runtime that opened them: use one pool per
/// long-lived runtime.
#[derive(Default)]
pub struct ClientPool {
    clients: Mutex<HashMap<TransportSettings, reqwest::Client>>,
}

impl fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.clients.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("ClientPool").field("clients", &n).finish()
    }
}

impl ClientPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// The client for `settings`, built on first use.
    pub fn client(&self, settings: &TransportSettings) -> Result<reqwest::Client, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(settings) {
            return Ok(c.clone());
        }
        let client = settings
            .apply(base_builder())?
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        clients.insert(settings.clone(), client.clone());
        Ok(client)
    }

    /// The client for an endpoint's settings, warning (once per build) when it does not
    /// verify certificates. Errors name the endpoint.
    pub fn endpoint_client(
        &self,
        endpoint: &str,
        settings: &HashMap<String, String>,
    ) -> Result<reqwest::Client, String> {
        let transport = TransportSettings::from_settings(settings)
            .map_err(|e| format!("endpoint {endpoint}: {e}"))?;
        if transport.insecure_skip_verify {
            tracing::warn!(
                endpoint,
                "TLS certificate verification is OFF for this endpoint (insecure_skip_verify = true): anyone on the path can read and change its traffic"
            );
        }
        self.client(&transport)
            .map_err(|e| format!("endpoint {endpoint}: {e}"))
    }
}

/// One client for `settings` outside any pool (the webhook's).
pub fn build_client(
    settings: &TransportSettings,
    timeout: Option<Duration>,
) -> Result<reqwest::Client, String> {
    let mut b = settings.apply(base_builder())?;
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// What went wrong with a request that got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// Timed out, connection failed, TLS certificate not trusted, …
    pub kind: &'static str,
    /// The whole error chain, for the message (the caller scrubs secrets from it).
    pub detail: String,
    /// The server's certificate (or ours, for mutual TLS) was refused: retrying does not
    /// help until the trust settings change, so callers treat it as a configuration error.
    pub certificate: bool,
}

/// Describe a failed `send`: what kind of failure, its error chain, and whether the TLS
/// handshake refused a certificate (naming the problem, e.g. `UnknownIssuer`,
/// `NotValidForName`, `Expired`).
pub fn describe_send_error(e: &reqwest::Error) -> SendFailure {
    let detail = error_chain(e);
    if let Some(problem) = certificate_problem(e) {
        return SendFailure {
            kind: "TLS certificate problem",
            detail: format!("{problem}: {detail}"),
            certificate: true,
        };
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_decode() {
        "could not decode response"
    } else if e.is_body() {
        "response body failed"
    } else {
        "request failed"
    };
    SendFailure {
        kind,
        detail,
        certificate: false,
    }
}

/// The rustls certificate error somewhere in the chain, explained.
fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(tls) = tls_error(err) {
            return explain(tls);
        }
        src = err.source();
    }
    None
}

fn tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(t) = err.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    // Handshake failures arrive as io::Errors wrapping (io::Errors wrapping …) the rustls
    // error, and io::Error's `source` skips the error it wraps: unwrap them here.
    let mut io = err.downcast_ref::<std::io::Error>();
    while let Some(inner) = io.and_then(|e| e.get_ref()) {
        if let Some(t) = inner.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        io = inner.downcast_ref::<std::io::Error>();
    }
    None
}

fn explain(e: &rustls::Error) -> Option<String> {
    use rustls::{CertificateError as C, Error as E};
    let why = match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA (trusted: the platform's roots or SSL_CERT_FILE, plus the endpoint's `ca_file`)".to_string()
        }
        E::InvalidCertificate(C::NotValidForName)
        | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the server's certificate is not valid for this host name".to_string()
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_string()
        }
        E::InvalidCertificate(C::NotValidYet)
        | E::InvalidCertificate(C::NotValidYetContext { .. }) => {
            "the server's certificate is not valid yet".to_string()
        }
        E::InvalidCertificate(C::Revoked) => "the server's certificate is revoked".to_string(),
        E::InvalidCertificate(other) => format!("the server's certificate is refused ({other:?})"),
        E::NoCertificatesPresented => {
            "no certificate was presented (a server asking for a client certificate: set `client_cert_file` and `client_key_file`)".to_string()
        }
        E::AlertReceived(alert) => {
            let a = format!("{alert:?}");
            if a.contains("Certificate") || a == "UnknownCA" || a == "HandshakeFailure" {
                format!(
                    "the server refused the handshake ({a}): it may require a client certificate (`client_cert_file`, `client_key_file`) it trusts"
                )
            } else {
                return None;
            }
        }
        _ => return None,
    };
    Some(why)
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_are_checked_and_name_their_key() {
        assert_eq!(
            TransportSettings::from_settings(&settings(&[])).unwrap(),
            TransportSettings::default()
        );
        let e = TransportSettings::from_settings(&settings(&[("insecure_skip_verify", "yes")]))
            .unwrap_err();
        assert!(e.contains("insecure_skip_verify"), "{e}");
        let e = TransportSettings::from_settings(&settings(&[("client_cert_file", "c.pem")]))
            .unwrap_err();
        assert!(e.contains("client_key_file"), "{e}");
        let e = TransportSettings::from_settings(&settings(&[("proxy", "ftp://p")])).unwrap_err();
        assert!(e.contains("proxy"), "{e}");
        let t = TransportSettings::from_settings(&settings(&[
            ("proxy", "http://user:hunter2@proxy:3128"),
            ("insecure_skip_verify", "true"),
        ]))
        .unwrap();
        assert!(t.insecure_skip_verify);
        let shown = format!("{t:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let none = TransportSettings::from_settings(&settings(&[("proxy", "none")])).unwrap();
        assert_eq!(none.proxy, Some(ProxySetting::Direct));
    }

    #[test]
    fn unreadable_or_empty_trust_files_fail_at_build() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TransportSettings {
            ca_file: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let e = build_client(&missing, None).unwrap_err();
        assert!(e.contains("ca_file") && e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = build_client(
            &TransportSettings {
                ca_file: Some(empty),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn pool_shares_clients_by_settings() {
        let pool = ClientPool::new();
        let a = TransportSettings::default();
        pool.client(&a).unwrap();
        pool.client(&a).unwrap();
        pool.client(&TransportSettings {
            insecure_skip_verify: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(pool.clients.lock().unwrap().len(), 2);
    }
}

/// A response's `Retry-After` in milliseconds from now: delta-seconds (`120`) or an
/// HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`; a date in the past is 0). None when the
/// header is absent or unreadable.
pub fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod retry_after_tests {
    use super::retry_after_ms;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn seconds_and_http_dates() {
        assert_eq!(retry_after_ms(&with("2")), Some(2000));
        assert_eq!(retry_after_ms(&HeaderMap::new()), None);
        assert_eq!(retry_after_ms(&with("soon")), None);
        assert_eq!(
            retry_after_ms(&with("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(0)
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let ms = retry_after_ms(&with(&later)).unwrap();
        assert!((28_000..=30_000).contains(&ms), "{ms}");
    }
}
