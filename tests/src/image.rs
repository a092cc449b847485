//! The agent's OCI image (`cargo xtask image`) under podman: [`Podman`], a
//! container storage of the test's own that loads the archive and removes
//! what it loaded, and [`DaemonSet`], which reads `deploy/agent.yaml` and
//! says how to run its container with podman (host PID and network,
//! capabilities, seccomp, read-only root, mounts, env, args).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_yaml::Value;

/// Points the tests at the archive (`cargo xtask test` sets it).
pub const MESH_AGENT_IMAGE: &str = "MESH_AGENT_IMAGE";

/// The archive `cargo xtask image` writes: `$MESH_AGENT_IMAGE`, else
/// `<target>/image/mesh-agent-<version>.oci.tar` of the target directory
/// this test binary was built in. Missing is an error, never a skip.
pub fn image_archive() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(MESH_AGENT_IMAGE) {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "${MESH_AGENT_IMAGE} is set to {}, which does not exist: run `cargo xtask image`", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding the current executable")?;
    // target/debug/deps/image-HASH -> target/
    let target = exe.ancestors().nth(3).context("the test binary is not in <target>/<profile>/deps")?;
    let p = target.join("image").join(format!("mesh-agent-{}.oci.tar", env!("CARGO_PKG_VERSION")));
    ensure!(
        p.is_file(),
        "the agent's image {} does not exist: build it with `cargo xtask image` (or set ${MESH_AGENT_IMAGE})",
        p.display()
    );
    Ok(p)
}

/// podman over a storage of its own under `dir` (images, containers, its
/// state): the machine's podman images are never touched, and dropping
/// this removes every container and image it made.
pub struct Podman {
    dir: PathBuf,
    images: Vec<String>,
    containers: Vec<String>,
}

impl Podman {
    /// Fails when podman does not run (`cargo xtask setup` installs it).
    pub fn new(dir: &Path) -> Result<Podman> {
        let p = Podman { dir: dir.to_owned(), images: Vec::new(), containers: Vec::new() };
        let version = p
            .command()
            .arg("--version")
            .output()
            .context("cannot run podman: install it (`cargo xtask setup` does: Debian's podman and runc)")?;
        ensure!(version.status.success(), "`podman --version` failed: {}", String::from_utf8_lossy(&version.stderr));
        Ok(p)
    }

    /// `podman` with this storage; runc as the runtime, because crun (1.8)
    /// refuses hosts with a hybrid cgroup hierarchy whose v2 part has
    /// controllers, as these machines have; cgroupfs, as there is no systemd.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "overlay", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        c
    }

    /// `podman load -i archive`: the name of the image it loaded.
    pub fn load(&mut self, archive: &Path) -> Result<String> {
        let out = self.output(self.command().args(["load", "--quiet", "--input"]).arg(archive))?;
        let name = out
            .lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .with_context(|| format!("`podman load` did not name the image it loaded: {out}"))?
            .trim()
            .to_owned();
        self.images.push(name.clone());
        Ok(name)
    }

    /// Records a container name so that dropping this removes it.
    pub fn track_container(&mut self, name: &str) {
        self.containers.push(name.to_owned());
    }

    /// Names of every container in this storage, running or not.
    pub fn container_names(&self) -> Result<Vec<String>> {
        let out = self.output(self.command().args(["ps", "--all", "--format", "{{.Names}}"]))?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// Removes the containers, then the images this made; the storage
    /// directory goes with them. Errors name what is left.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for c in std::mem::take(&mut self.containers) {
            if let Err(e) = self.output(self.command().args(["rm", "--force", "--time", "0", "--ignore", &c])) {
                errors.push(format!("container {c}: {e:#}"));
            }
        }
        for i in std::mem::take(&mut self.images) {
            if let Err(e) = self.output(self.command().args(["rmi", "--force", &i])) {
                errors.push(format!("image {i}: {e:#}"));
            }
        }
        if errors.is_empty()
            && self.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            errors.push(format!("removing {}: {e}", self.dir.display()));
        }
        ensure!(errors.is_empty(), "podman cleanup incomplete: {}", errors.join("; "));
        Ok(())
    }

    fn output(&self, cmd: &mut Command) -> Result<String> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("mesh-e2e: {e:#}");
        }
    }
}

/// The agent DaemonSet of `deploy/agent.yaml`: its pod spec and its one
/// container.
pub struct DaemonSet {
    pod: Value,
    container: Value,
}

/// One `httpGet` probe of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: &'static str,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl DaemonSet {
    /// `deploy/agent.yaml` of this repository.
    pub fn from_repo() -> Result<DaemonSet> {
        DaemonSet::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.yaml"))
    }

    pub fn from_file(path: &Path) -> Result<DaemonSet> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let ds: Value = serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(ds["kind"] == "DaemonSet", "{} is not a DaemonSet", path.display());
        let pod = ds["spec"]["template"]["spec"].clone();
        let containers = pod["containers"].as_sequence().context("the DaemonSet has no containers")?;
        ensure!(containers.len() == 1, "the DaemonSet has {} containers; this knows how to run one", containers.len());
        Ok(DaemonSet { container: containers[0].clone(), pod })
    }

    /// The container's `args`.
    pub fn args(&self) -> Result<Vec<String>> {
        strings(&self.container["args"]).context("the container's args")
    }

    /// The volume mounts: (volume name, its definition, mount path, read-only).
    pub fn mounts(&self) -> Result<Vec<(String, Value, String, bool)>> {
        let volumes = self.pod["volumes"].as_sequence().cloned().unwrap_or_default();
        let mut mounts = Vec::new();
        for m in self.container["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = m["name"].as_str().context("a volumeMount without a name")?;
            let path = m["mountPath"].as_str().with_context(|| format!("volumeMount {name} without a mountPath"))?;
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .with_context(|| format!("volumeMount {name} names no volume of the pod"))?;
            mounts.push((name.to_owned(), volume.clone(), path.to_owned(), m["readOnly"] == true));
        }
        Ok(mounts)
    }

    /// The `httpGet` readiness and liveness probes.
    pub fn probes(&self) -> Result<Vec<Probe>> {
        let mut probes = Vec::new();
        for (kind, key) in [("readiness", "readinessProbe"), ("liveness", "livenessProbe")] {
            let get = &self.container[key]["httpGet"];
            if get.is_null() {
                continue;
            }
            probes.push(Probe {
                kind,
                host: get["host"].as_str().unwrap_or("").to_owned(),
                port: get["port"].as_u64().and_then(|p| u16::try_from(p).ok()).with_context(|| format!("{key}: a numeric port"))?,
                path: get["path"].as_str().unwrap_or("/").to_owned(),
            });
        }
        Ok(probes)
    }

    /// `podman run` flags for what the pod spec and the container declare,
    /// with `node` for the downward API's `spec.nodeName` and
    /// `host_path(volume name, volume)` the host directory of each volume.
    /// A field this does not know how to honour is an error: a manifest
    /// change must not pass untested.
    pub fn podman_flags(&self, node: &str, mut host_path: impl FnMut(&str, &Value) -> Result<PathBuf>) -> Result<Vec<String>> {
        let mut f = Vec::new();
        if self.pod["hostPID"] == true {
            f.push("--pid=host".to_owned());
        }
        if self.pod["hostNetwork"] == true {
            f.push("--network=host".to_owned());
        }
        let sc = &self.container["securityContext"];
        for (key, _) in sc.as_mapping().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            ensure!(
                ["privileged", "runAsUser", "readOnlyRootFilesystem", "capabilities", "seccompProfile"].contains(&key),
                "the container's securityContext.{key}: teach tests/src/image.rs how podman honours it"
            );
        }
        if sc["privileged"] == true {
            f.push("--privileged".to_owned());
        }
        if let Some(uid) = sc["runAsUser"].as_u64() {
            f.push(format!("--user={uid}"));
        }
        if sc["readOnlyRootFilesystem"] == true {
            // podman would also mount tmpfs on /tmp, /var/tmp and /run; the
            // kubelet does not.
            f.extend(["--read-only".to_owned(), "--read-only-tmpfs=false".to_owned()]);
        }
        for cap in strings(&sc["capabilities"]["drop"])? {
            f.push(format!("--cap-drop={cap}"));
        }
        for cap in strings(&sc["capabilities"]["add"])? {
            f.push(format!("--cap-add={cap}"));
        }
        match sc["seccompProfile"]["type"].as_str() {
            None | Some("RuntimeDefault") => {}
            Some("Unconfined") => f.push("--security-opt=seccomp=unconfined".to_owned()),
            Some(other) => bail!("seccompProfile {other}: teach tests/src/image.rs about it"),
        }
        if let Some(memory) = self.container["resources"]["limits"]["memory"].as_str() {
            f.push(format!("--memory={}", memory_bytes(memory)?));
        }
        for e in self.container["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().context("an env entry without a name")?;
            let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(v), _) => v.to_owned(),
                (None, Some("spec.nodeName")) => node.to_owned(),
                _ => bail!("env {name}: teach tests/src/image.rs where its value comes from"),
            };
            f.push(format!("--env={name}={value}"));
        }
        for (name, volume, path, read_only) in self.mounts()? {
            let host = host_path(&name, &volume)?;
            f.push(format!("--volume={}:{path}{}", host.display(), if read_only { ":ro" } else { "" }));
        }
        Ok(f)
    }
}

fn strings(v: &Value) -> Result<Vec<String>> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().map(str::to_owned).with_context(|| format!("{s:?} is not a string")))
        .collect()
}

/// A Kubernetes quantity (`512Mi`, `1Gi`, `1000000`) in bytes.
fn memory_bytes(q: &str) -> Result<u64> {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().with_context(|| format!("memory quantity {q:?}"))?;
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("memory quantity {q:?}: unit {unit:?}"),
    };
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_quantities() {
        assert_eq!(memory_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(memory_bytes("2G").unwrap(), 2_000_000_000);
        assert_eq!(memory_bytes("4096").unwrap(), 4096);
        assert!(memory_bytes("1.5Gi").is_err());
    }

    #[test]
    fn translates_the_repositorys_daemonset() {
        let ds = DaemonSet::from_repo().unwrap();
        let flags = ds
            .podman_flags("node-a", |name, v| {
                Ok(PathBuf::from(v["hostPath"]["path"].as_str().map_or_else(|| format!("/tmp/{name}"), str::to_owned)))
            })
            .unwrap();
        for want in ["--pid=host", "--network=host", "--read-only", "--cap-drop=ALL", "--cap-add=BPF", "--env=NODE_NAME=node-a"] {
            assert!(flags.iter().any(|f| f == want), "{want} not in {flags:?}");
        }
        assert!(flags.iter().any(|f| f == "--volume=/sys/fs/bpf:/sys/fs/bpf"), "{flags:?}");
        assert!(ds.args().unwrap().starts_with(&["run".to_owned(), "--source=kube".to_owned()]));
        assert!(ds.probes().unwrap().iter().any(|p| p.path == "/healthz"));
    }
}
