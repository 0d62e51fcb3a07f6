//! Certificates made for a test (a CA, a server certificate for 127.0.0.1,
//! a client certificate) and a TLS-terminating proxy on 127.0.0.1 that
//! requires a client certificate signed by that CA and forwards the bytes
//! to a plain-HTTP node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCerts {
    pub dir: PathBuf,
    ca_der: CertificateDer<'static>,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(name), text)?;
    Ok(())
}

impl TestCerts {
    /// Writes `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem`, `other-ca.pem` and
    /// the TLS authentication files `mtls.json` (client certificate + CA),
    /// `ca-only.json` (no client certificate) and `wrong-ca.json`.
    pub fn generate(dir: &Path) -> anyhow::Result<TestCerts> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fhirsync test CA");
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;

        let mut sp = CertificateParams::new(vec!["localhost".to_string()])?;
        sp.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server = sp.signed_by(&server_key, &ca, &ca_key)?;

        let mut cp = CertificateParams::new(Vec::<String>::new())?;
        cp.distinguished_name
            .push(DnType::CommonName, "sync-client");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client = cp.signed_by(&client_key, &ca, &ca_key)?;

        let mut op = CertificateParams::new(Vec::<String>::new())?;
        op.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        op.distinguished_name
            .push(DnType::CommonName, "some other CA");
        let other = op.self_signed(&KeyPair::generate()?)?;

        write(dir, "ca.pem", &ca.pem())?;
        write(dir, "server.pem", &server.pem())?;
        write(dir, "server-key.pem", &server_key.serialize_pem())?;
        write(dir, "client.pem", &client.pem())?;
        write(dir, "client-key.pem", &client_key.serialize_pem())?;
        write(dir, "other-ca.pem", &other.pem())?;
        write(
            dir,
            "mtls.json",
            r#"{"clientCertificate": "client.pem", "clientKey": "client-key.pem", "caCertificate": "ca.pem"}"#,
        )?;
        write(dir, "ca-only.json", r#"{"caCertificate": "ca.pem"}"#)?;
        write(
            dir,
            "wrong-ca.json",
            r#"{"clientCertificate": "client.pem", "clientKey": "client-key.pem", "caCertificate": "other-ca.pem"}"#,
        )?;
        Ok(TestCerts {
            dir: dir.to_owned(),
            ca_der: ca.der().clone(),
            server_der: server.der().clone(),
            server_key_der: server_key.serialize_der(),
        })
    }

    /// A server configuration that requires a client certificate of this CA.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        Ok(rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_der.clone()], key)?)
    }
}

/// Accepts TLS on 127.0.0.1 and forwards the plain bytes to `target`.
pub struct TlsProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    /// `listener` is bound first so the node behind can know the public port.
    pub fn start(
        listener: tokio::net::TcpListener,
        target: SocketAddr,
        config: rustls::ServerConfig,
    ) -> TlsProxy {
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsProxy { addr, task }
    }
}
