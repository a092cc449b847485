//! The peer: HAProxy (Debian's) doing the same hops as the agents, so a
//! reader can compare with a proxy they know.
//!
//! ```text
//! client pod                                     server pod
//! load generator -> 127.0.0.1:18080 HAProxy A ==TLS 1.3, mutual==> 198.51.100.12:18443 HAProxy B -> 127.0.0.1:8080 app
//! ```
//!
//! Like the agents' in-pod listeners, each HAProxy runs in its pod's network
//! namespace, and the hop between them crosses the bridge. Both sides present
//! a certificate with a SPIFFE URI SAN from one test CA and require the
//! other's (`verify required`). TCP mode: one TLS connection per client
//! connection (sessions resumed). HTTP mode: HTTP/2 over TLS between the
//! two, connections reused, and ACLs at B that do what the agent-l7 variant's
//! authorization policy does (method and path allow-list, denied paths).
//! HAProxy's defaults otherwise (threads = cores).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_e2e::{Pod, PodProcess};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};

/// The certificate files and ports the two configs refer to.
pub struct Files {
    dir: PathBuf,
    server_ip: Ipv4Addr,
    tls_port: u16,
    front_port: u16,
    app_port: u16,
}

/// Writes a CA and one certificate per side (PEM, key appended, as HAProxy
/// wants) under `dir/haproxy/`.
pub fn write_files(dir: &Path, server_ip: Ipv4Addr, tls_port: u16, front_port: u16, app_port: u16) -> Result<Files> {
    let dir = dir.join("haproxy");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, "bench peer CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    for (side, sa) in [("client", "bench-client"), ("server", "bench-server")] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, sa);
        let uri = format!("spiffe://cluster.local/ns/bench/sa/{sa}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{side}.pem")), format!("{}{}", cert.pem(), key.serialize_pem()))?;
    }
    Ok(Files { dir, server_ip, tls_port, front_port, app_port })
}

impl Files {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// HAProxy A, in the client pod.
    pub fn client_config(&self, http: bool) -> (PathBuf, String) {
        let mode = if http { "http" } else { "tcp" };
        let (ca, crt) = (self.path("ca.pem"), self.path("client.pem"));
        // HTTP: HTTP/2 to B, idle connections kept and shared.
        let server_extra = if http { " alpn h2" } else { "" };
        let backend_extra = if http { "    http-reuse always\n" } else { "" };
        let text = format!(
            "{}frontend front\n    mode {mode}\n    bind 127.0.0.1:{}\n    default_backend to_b\n\
             backend to_b\n    mode {mode}\n{backend_extra}    server b {}:{} ssl crt {crt} ca-file {ca} verify required{server_extra}\n",
            common(),
            self.front_port,
            self.server_ip,
            self.tls_port
        );
        (self.dir.join(format!("a-{mode}.cfg")), text)
    }

    /// HAProxy B, in the server pod.
    pub fn server_config(&self, http: bool) -> (PathBuf, String) {
        let mode = if http { "http" } else { "tcp" };
        let (ca, crt) = (self.path("ca.pem"), self.path("server.pem"));
        let alpn = if http { " alpn h2,http/1.1" } else { "" };
        let acls = if http {
            "    acl allowed_method method GET HEAD\n    acl allowed_path path_beg /api/ /bulk\n    \
             acl internal_path path /internal\n    acl internal_path path_beg /internal/ /debug/\n    \
             http-request deny if internal_path\n    http-request deny unless allowed_method allowed_path\n"
        } else {
            ""
        };
        let text = format!(
            "{}frontend tls_in\n    mode {mode}\n    bind {}:{} ssl crt {crt} ca-file {ca} verify required{alpn}\n{acls}    default_backend app\n\
             backend app\n    mode {mode}\n    server app 127.0.0.1:{}\n",
            common(),
            self.server_ip,
            self.tls_port,
            self.app_port
        );
        (self.dir.join(format!("b-{mode}.cfg")), text)
    }
}

/// HAProxy's `maxconn`: it needs two descriptors per connection and more,
/// and this machine's hard limit (20,000, which root cannot raise here)
/// leaves room for fewer than 10,000. Beyond it HAProxy queues connections
/// until they time out, so the idle-connection scenario skips larger sizes
/// for the HAProxy variants.
pub const MAXCONN: u32 = 8000;

/// No logs (the agents log at `warn`), TLS 1.3 only as between agents.
fn common() -> String {
    format!(
        "global\n    maxconn {MAXCONN}\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n    \
         ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
    )
}

/// Checks the config (`haproxy -c`), then runs HAProxy in the foreground
/// in `pod`; it is killed when the handle drops.
pub fn start(pod: &Pod, (path, text): &(PathBuf, String)) -> Result<PodProcess> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_str().context("non-UTF-8 temp dir")?;
    let check = pod.run("haproxy", ["-c", "-q", "-f", path])?;
    ensure!(
        check.status.success(),
        "haproxy -c -f {path}: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mut proc_ = pod.spawn("haproxy", ["-db", "-f", path])?;
    // Binding is quick; a config that cannot bind exits at once.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = proc_.try_wait()? {
        anyhow::bail!("haproxy in {} exited at start ({status}): {}", pod.id(), proc_.stderr());
    }
    Ok(proc_)
}
