//! Certificates for TLS tests, made with the `openssl` command (`scripts/setup.sh` checks it
//! can): a CA, and leaf certificates it signs for 127.0.0.1 and localhost, good for serving
//! and for client authentication. Shared by the end-to-end tests and the controller's store
//! tests (`#[path = "…/tests/e2e/common/certs.rs"] mod certs;`); needs only `std`.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): run scripts/setup.sh"));
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Makes the CA `name.pem`/`name.key` in `dir` (P-256, two days).
pub fn make_ca(dir: &Path, name: &str) {
    let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={name}"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subject,
        ],
    );
}

/// Makes `name.pem`/`name.key` in `dir`, signed by the CA `ca` (made by [`make_ca`]), for
/// 127.0.0.1 and localhost, with `CN=name`.
pub fn leaf(dir: &Path, ca: &str, name: &str) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("the extensions file can be written");
    let (key, csr, pem, ext) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
    let (ca_pem, ca_key, subject) = (format!("{ca}.pem"), format!("{ca}.key"), format!("/CN={name}"));
    openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}
