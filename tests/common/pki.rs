//! A throw-away PKI for TLS tests (rcgen).

use std::net::Ipv4Addr;

pub struct Pki {
    pub dir: std::path::PathBuf,
}

impl Pki {
    /// A CA named `ca_name`, a certificate for `ips` good for serving and
    /// as a client (`server.pem`), and a client-only certificate
    /// (`client.pem`), written as PEM files with their keys.
    pub fn generate(ca_name: &str, ips: &[Ipv4Addr]) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let dir = std::env::temp_dir().join(format!(
            "podcache-pki-{}-{}",
            std::process::id(),
            super::next_block()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("write");
        write("ca.pem", ca_cert.pem());

        let mut server = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        for ip in ips {
            server
                .subject_alt_names
                .push(SanType::IpAddress((*ip).into()));
        }
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_key = KeyPair::generate().expect("key");
        write(
            "server.pem",
            server.signed_by(&server_key, &issuer).expect("sign").pem(),
        );
        write("server-key.pem", server_key.serialize_pem());

        let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
        client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-etcd-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("key");
        write(
            "client.pem",
            client.signed_by(&client_key, &issuer).expect("sign").pem(),
        );
        write("client-key.pem", client_key.serialize_pem());
        Self { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
