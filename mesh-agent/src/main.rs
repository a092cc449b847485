use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::config;

/// mimalloc rather than glibc malloc: cheaper per-thread allocation on the
/// data path (`bench/PROFILE.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "Node agent of a sidecarless, eBPF-accelerated service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<config::RunArgs>),
    /// Remove the mesh from this node: detach every pod's programs and
    /// remove the pinned state, so pods talk directly again. Refused while
    /// an agent runs for the node.
    Uninstall {
        /// This node's name.
        #[arg(long, env = config::ENV_NODE_NAME)]
        node: String,
        #[command(flatten)]
        node_state: config::NodeStateArgs,
    },
    /// Check a local config file as `run` would (same messages), with no CA,
    /// no root and no kernel access; with `--node`, also what that node's
    /// agent would serve. Exit code 0 when valid, 1 otherwise.
    Check {
        /// The local mesh config file (YAML).
        #[arg(long, env = config::ENV_CONFIG)]
        config: PathBuf,
        /// A node of the config: list the pods its agent would enrol.
        #[arg(long)]
        node: Option<String>,
        /// The label `run` is given: the file's labels are checked, and
        /// enrollment listed, for it.
        #[command(flatten)]
        enrollment: Box<config::EnrollmentArgs>,
    },
    /// Run the mesh's certificate authority (gRPC over TLS).
    Ca(Box<mesh_agent::ca::CaArgs>),
    /// Print the mesh's CustomResourceDefinitions (YAML), as in deploy/crds.yaml.
    Crds,
    /// Print a running agent's config dump (the state it enforces, JSON).
    ConfigDump {
        /// The agent's admin address.
        #[arg(long, env = config::ENV_ADMIN, default_value = config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Show or change a running agent's log filter (e.g. `debug`, or
    /// `info,mesh_agent::proxy=debug`).
    LogLevel {
        /// The agent's admin address.
        #[arg(long, env = config::ENV_ADMIN, default_value = config::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// The new filter, in `RUST_LOG` syntax (`debug`,
        /// `info,mesh_agent::proxy=debug`); without it, the current one is
        /// printed.
        level: Option<String>,
    },
    /// Show a running agent's pods, enrollment and counters; with
    /// `--all-nodes`, every agent of the cluster through the Kubernetes API.
    Status {
        /// The agent's admin address.
        #[arg(long, env = config::ENV_ADMIN, default_value = config::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Print the raw JSON (with `--all-nodes`: one object per agent).
        #[arg(long)]
        json: bool,
        /// Every agent of the cluster, one table: each node's pods,
        /// enrollment, certificates and errors, read through the API
        /// server's pod proxy (needs `get` on pods/proxy).
        #[arg(long)]
        all_nodes: bool,
        /// With `--all-nodes`: a kubeconfig file instead of KUBECONFIG,
        /// ~/.kube/config or the in-cluster service account.
        #[arg(long, requires = "all_nodes")]
        kubeconfig: Option<PathBuf>,
        /// With `--all-nodes`: the agents' namespace.
        #[arg(long, requires = "all_nodes", default_value = mesh_agent::k8s::agents::NAMESPACE)]
        namespace: String,
        /// With `--all-nodes`: the agent pods' label selector.
        #[arg(long, requires = "all_nodes", default_value = mesh_agent::k8s::agents::SELECTOR)]
        selector: String,
        /// With `--all-nodes`: the agents' port that serves /status beyond
        /// loopback (default: each pod's `--metrics` port).
        #[arg(long, requires = "all_nodes")]
        port: Option<u16>,
    },
}

fn main() -> ExitCode {
    // No transparent huge pages for this process: a 2 MiB page per touched
    // heap region tripled the agent's idle RSS (on hosts with THP `always`
    // as well as for allocators that ask for them), for no measured gain.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    mesh_agent::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            let cfg = args.into_config();
            // Two descriptors per proxied connection (more with a tunnel):
            // the soft limit (often 1024) would cap the node's connections.
            match mesh_agent::fdlimit::raise_nofile() {
                Ok(n) => tracing::info!(before = n.before, soft = n.after, hard = n.hard, "open files limit (RLIMIT_NOFILE) raised to the hard limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit (RLIMIT_NOFILE); keeping the current one"),
            }
            mesh_agent::app::run(cfg, |event| {
                // Machine-readable lines on stdout for supervisors and tests.
                let line = match event {
                    mesh_agent::app::Event::Admin(addr) => serde_json::json!({"event": "admin", "admin": addr.to_string()}),
                    mesh_agent::app::Event::Ready(addr) => serde_json::json!({"event": "ready", "admin": addr.to_string()}),
                };
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                drop(out);
                if matches!(event, mesh_agent::app::Event::Ready(_)) {
                    // Start-up (aya parsing the kernel's BTF: ~150,000
                    // allocations) leaves freed memory behind; give it back
                    // now rather than keep it resident for the agent's life.
                    // SAFETY: mimalloc's collection entry point, no
                    // arguments beyond the flag.
                    unsafe { libmimalloc_sys::mi_collect(true) };
                }
            })
            .map_err(anyhow::Error::from)
        }
        Command::Status { all_nodes: true, kubeconfig, namespace, selector, port, json, .. } => {
            all_nodes(kubeconfig.as_deref(), &namespace, &selector, port, json)
        }
        Command::Status { admin, json, .. } => status(admin, json),
        Command::Check { config, node, enrollment } => check(&config, node.as_deref(), &enrollment.scope()),
        Command::Uninstall { node, node_state } => {
            mesh_agent::lifecycle::uninstall(&node_state.bpffs, &node_state.run_dir, &node).map_err(anyhow::Error::from).map(|u| {
                if u.existed {
                    println!(
                        "node {node}: detached the programs of {} pod cgroups and namespaces, removed {}; pods connect directly again",
                        u.targets,
                        u.pin_dir.display()
                    );
                } else {
                    println!("node {node}: nothing pinned at {}", u.pin_dir.display());
                }
            })
        }
        Command::ConfigDump { admin } => admin_call(admin, http::Method::GET, "/config_dump".into()),
        Command::LogLevel { admin, level } => match level {
            None => admin_call(admin, http::Method::GET, "/logging".into()),
            Some(l) => {
                let q: String = l.chars().map(|c| match c { ',' => "%2C".into(), ':' => "%3A".into(), '=' => "%3D".into(), c => c.to_string() }).collect();
                admin_call(admin, http::Method::POST, format!("/logging?level={q}"))
            }
        },
        Command::Crds => {
            print!("{}", mesh_agent::k8s::crd::crds_yaml());
            Ok(())
        }
        Command::Ca(args) => mesh_agent::ca::run(*args).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once (a message that already quotes its source
            // is not repeated).
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("mesh-agent: error: {}", mesh_agent::error_chain(e));
            ExitCode::FAILURE
        }
    }
}


fn check(path: &std::path::Path, node: Option<&str>, scope: &mesh_agent::state::Scope) -> anyhow::Result<()> {
    let state = mesh_agent::localfile::load(path, scope)?;
    if node.is_none() && state.nodes.is_empty() {
        // What `run` would refuse, whichever node it is given.
        mesh_agent::localfile::check_node(path, &state, "")?;
    }
    println!(
        "{}: valid: {} nodes, {} namespaces, {} pods, {} services, {} peer authentications, {} authorization policies, {} HTTP routes",
        path.display(),
        state.nodes.len(),
        state.namespaces.len(),
        state.pods.len(),
        state.services.len(),
        state.peer_authentications.len(),
        state.authorization_policies.len(),
        state.routes.len()
    );
    if let Some(node) = node {
        mesh_agent::localfile::check_node(path, &state, node)?;
        let pods: Vec<_> = state.pods_on_node(node).collect();
        println!("node {node}: {} pods", pods.len());
        for p in pods {
            println!("  {:<40} {}", p.key.to_string(), if state.is_enrolled(p) { "enrolled" } else { "not in the mesh" });
        }
    }
    Ok(())
}

fn status(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = rt
        .block_on(get(admin, "/status"))
        .with_context(|| format!("cannot reach the agent's admin endpoint at {admin}: is the agent running?"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("the agent's /status is not JSON")?;
    print!("{}", mesh_agent::status_view::node(&v));
    Ok(())
}

fn all_nodes(kubeconfig: Option<&std::path::Path>, namespace: &str, selector: &str, port: Option<u16>, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let agents = rt.block_on(async {
        let client = mesh_agent::k8s::query_client(kubeconfig).await?;
        anyhow::Ok(mesh_agent::k8s::agents::statuses(client, namespace, selector, port).await?)
    })?;
    if json {
        let all: Vec<serde_json::Value> = agents
            .iter()
            .map(|a| match &a.status {
                Ok(v) => serde_json::json!({"node": a.node, "pod": a.pod, "status": v}),
                Err(e) => serde_json::json!({"node": a.node, "pod": a.pod, "error": e}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", mesh_agent::status_view::cluster(&agents));
    }
    let silent = agents.iter().filter(|a| a.status.is_err()).count();
    anyhow::ensure!(silent == 0, "{silent} of {} agents did not answer", agents.len());
    Ok(())
}

fn admin_call(admin: SocketAddr, method: http::Method, path: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = rt
        .block_on(request(admin, method, &path))
        .with_context(|| format!("agent admin endpoint at {admin}"))?;
    print!("{body}");
    Ok(())
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    request(addr, http::Method::GET, path).await
}

async fn request(addr: SocketAddr, method: http::Method, path: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt as _, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "{path}: HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
    Ok(String::from_utf8_lossy(&body).into_owned())
}
