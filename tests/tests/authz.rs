//! Issue: L4 authorization at the destination node's agent (the HTTP layer
//! comes later). Policies in the local config; the inbound agent decides from
//! the verified peer identity (or none, for plaintext) and the port.

mod common;

use anyhow::{Result, ensure};
use common::*;
use mesh_e2e::wait_until;
use serde_json::Value;

const ALLOW_CLIENT: &str = r#"authorizationPolicies:
  - name: allow-client
    namespace: shop
    selector: {app: shop-server}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/shop-client"]}]
        to: [{ports: [9000]}]
"#;

const DENY_CLIENT: &str = r#"  - name: deny-client
    namespace: shop
    action: DENY
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/*"]}]
"#;

fn denied(m: &Mesh) -> Result<Value> {
    Ok(pod_json(&m.b, "shop", "shop-server")?["proxy"]["inboundDenied"].clone())
}

fn total(v: &Value) -> u64 {
    v.as_object().map(|o| o.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// One principal allowed, a second one denied (default deny once an ALLOW
/// selects the workload), DENY beats ALLOW, a plaintext client outside the
/// mesh is blocked at L4, and an invalid policy edit changes nothing.
#[test]
fn connection_policies_allow_deny_and_default_deny() -> Result<()> {
    let opts = MeshOpts { enrolled: &["shop", "legacy"], named_service_accounts: true, ..MeshOpts::default() };
    let m = mesh_with("authz", &opts)?;
    let to = server(&m.shop_server);
    // No policy: everyone may connect.
    send(&m.legacy_client, &to, 1024)?;

    write_with_extra(&m, &["shop", "legacy"], ALLOW_CLIENT)?;
    send(&m.shop_client, &to, 64 << 10)?;
    ensure!(send(&m.legacy_client, &to, 1024).is_err(), "second principal was not denied");
    ensure!(total(&denied(&m)?) == 1, "{}", denied(&m)?);
    ensure!(m.b.log().contains("connection denied by authorization policy"), "denial not logged");
    // The app never saw the denied connection: only two accepts so far.
    let accepts = m.echoes[0].stdout_lines().iter().filter(|l| l.contains("\"accepted\"")).count();
    ensure!(accepts == 2, "app saw {accepts} connections");

    // DENY is evaluated first.
    write_with_extra(&m, &["shop", "legacy"], &format!("{ALLOW_CLIENT}{DENY_CLIENT}"))?;
    ensure!(send(&m.shop_client, &to, 1024).is_err(), "DENY did not beat ALLOW");
    ensure!(denied(&m)?["shop/deny-client"] == 1, "{}", denied(&m)?);

    // An invalid edit is rejected and the DENY keeps applying.
    let path = m.tb.config_path();
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(&path, text.replace("action: DENY", "action: REJECT"))?;
    wait_until(SETTLE, || Ok(m.b.status()?["config"]["rejected"].as_u64() == Some(1)))?;
    ensure!(send(&m.shop_client, &to, 1024).is_err(), "an invalid edit opened access");

    // A plaintext client outside the mesh is blocked by the L4 rule too.
    write_with_extra(&m, &["shop"], ALLOW_CLIENT)?;
    wait_enrolled(&m.a, "legacy", "legacy-client", false)?;
    ensure!(send(&m.legacy_client, &to, 1024).is_err(), "plaintext client was not denied");
    send(&m.shop_client, &to, 1024)?;
    Ok(())
}
