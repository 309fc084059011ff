//! A throw-away certificate authority and server certificates for 127.0.0.1 and localhost, made
//! with the `openssl` command in a temp dir removed on drop.

use std::path::Path;
use std::process::Command;

use super::{free_port, RedisServer, TempDir};

/// A test CA (`ca.pem`, `ca.key`) and a first server certificate signed by it (`server.pem`, an
/// RSA key in `server.key`); [`Certs::issue`] signs more.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// The CA and the first server certificate, with the common name `127.0.0.1`.
    pub fn make() -> Self {
        let certs = Certs {
            dir: TempDir::new("certs"),
        };
        std::fs::write(
            certs.dir.path.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        certs.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=stickless test CA",
        ]);
        certs.issue("server", "127.0.0.1", "rsa:2048");
        certs
    }

    /// Signs a new server certificate for 127.0.0.1 and localhost with the CA: `<name>.pem`, and
    /// its new key in `<name>.key`. `newkey` is openssl's `-newkey` argument: `rsa:2048`, or
    /// `ec` for a P-256 key.
    pub fn issue(&self, name: &str, common_name: &str, newkey: &str) {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let mut req = vec!["req", "-newkey", newkey];
        if newkey == "ec" {
            req.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        let subject = format!("/CN={common_name}");
        req.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject]);
        self.openssl(&req);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
    }

    /// The path of a file made here, as a string for a command line.
    pub fn path(&self, name: &str) -> String {
        self.dir.path.join(name).to_string_lossy().into_owned()
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir.path)
            .output()
            .expect("openssl is installed (bash scripts/test.sh installs it; or apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A `redis-server` with TLS (these certificates, no client certificates) on a port of its own
/// besides the harness's plain one, and that port; `extra` is passed on. Both ports are picked
/// anew on each try, in case another process took one meanwhile.
pub fn tls_server(certs: &Certs, extra: &[&str]) -> (RedisServer, String) {
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    (0..5)
        .find_map(|_| {
            let tls_port = free_port().to_string();
            let mut args = vec![
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ];
            args.extend_from_slice(extra);
            RedisServer::try_start_with(&args).map(|r| (r, tls_port.clone()))
        })
        .expect("redis-server with TLS starts")
}
