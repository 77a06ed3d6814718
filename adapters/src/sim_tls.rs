//! HTTPS for the simulators: an axum router served over rustls, optionally asking for
//! client certificates (mutual TLS), so the adapters' TLS paths are tested against a real
//! TLS server on loopback.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The server side of a simulator's TLS.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key of the leaf.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca_file: Option<PathBuf>,
}

fn bad(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} {}: {e}", path.display()),
    )
}

impl ServerTls {
    /// The acceptor these files describe (HTTP/1.1 by ALPN).
    pub fn acceptor(&self) -> io::Result<TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .map_err(|e| bad("certificate", &self.cert_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate", &self.cert_file, e))?;
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| bad("private key", &self.key_file, e))?;
        // With client authentication, TLS 1.2: there the server judges the client's
        // certificate inside the handshake, so a refusal always reaches the client as a
        // handshake alert. Under TLS 1.3 the client's handshake ends first and the alert
        // can lose the race with the first request (the client then sees a closed
        // connection, a transient failure): fine for a real portal, not for a test that
        // checks the message.
        let versions: &[&rustls::SupportedProtocolVersion] = if self.client_ca_file.is_some() {
            &[&rustls::version::TLS12]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(io::Error::other)?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad("client CA", ca, e))? {
                    roots
                        .add(c.map_err(|e| bad("client CA", ca, e))?)
                        .map_err(|e| bad("client CA", ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("client CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &self.cert_file, e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A listener whose connections have completed a TLS handshake. Handshakes run in their
/// own tasks (a stalled client holds up nobody); failed ones are logged and dropped.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accept TLS on `tcp` with `acceptor`.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "simulator TLS handshake failed")
                        }
                        Err(_) => tracing::info!(%peer, "simulator TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task ended (aborted on drop): no more connections, ever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serve `app` on `listener` (over TLS when `tls` is set) until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
    stop: oneshot::Receiver<()>,
) -> io::Result<()> {
    let stop = async move {
        let _ = stop.await;
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(acceptor) => {
            axum::serve(TlsListener::new(listener, acceptor)?, app)
                .with_graceful_shutdown(stop)
                .await
        }
    }
}

/// A certificate authority made up on the spot, for simulators and tests: it issues
/// server and client certificates and writes everything as PEM files into a directory.
pub struct TestCa {
    dir: PathBuf,
    name: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate's PEM file (what a client trusts: `ca_file`, `SSL_CERT_FILE`).
    pub ca_file: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key_file: PathBuf,
}

fn rcgen_err(e: rcgen::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl TestCa {
    /// A new CA called `name`, its certificate written to `dir/{name}-ca.pem`.
    pub fn new(dir: &std::path::Path, name: &str) -> io::Result<Self> {
        let key = rcgen::KeyPair::generate().map_err(rcgen_err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(rcgen_err)?;
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            issuer: rcgen::Issuer::new(params, key),
            ca_file,
        })
    }

    fn issue(
        &self,
        file: &str,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> io::Result<IssuedCert> {
        let key = rcgen::KeyPair::generate().map_err(rcgen_err)?;
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).map_err(rcgen_err)?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| file.to_string()),
        );
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_err)?;
        let out = IssuedCert {
            cert_file: self.dir.join(format!("{}-{file}.pem", self.name)),
            key_file: self.dir.join(format!("{}-{file}.key", self.name)),
        };
        std::fs::write(&out.cert_file, cert.pem())?;
        std::fs::write(&out.key_file, key.serialize_pem())?;
        Ok(out)
    }

    /// A server certificate for `names` (DNS names or IP addresses, e.g. `127.0.0.1`).
    pub fn server_cert(&self, file: &str, names: &[&str]) -> io::Result<IssuedCert> {
        self.issue(file, names, rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (for mutual TLS) for `name`.
    pub fn client_cert(&self, file: &str, name: &str) -> io::Result<IssuedCert> {
        self.issue(file, &[name], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A server's TLS for `names`, optionally asking for client certificates of
    /// `client_ca`.
    pub fn server_tls(&self, names: &[&str], client_ca: Option<&TestCa>) -> io::Result<ServerTls> {
        let c = self.server_cert("server", names)?;
        Ok(ServerTls {
            cert_file: c.cert_file,
            key_file: c.key_file,
            client_ca_file: client_ca.map(|ca| ca.ca_file.clone()),
        })
    }
}
