//! The operator's views of the admin `/status` JSON: one agent's
//! (`mesh-agent status`) and every node's (`mesh-agent status --all-nodes`),
//! as tables whose columns are as wide as their widest cell, so that long
//! pod names, IPv6 addresses and `cert-wait` never push a row out of line.

use serde_json::Value;

/// How a column's cells line up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// Numbers.
    Right,
}

/// Columns sized to their widest cell, two spaces apart; the last column
/// is not padded.
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new() }
    }

    /// One row; missing cells are empty, extra ones dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let width = |i: usize| {
            std::iter::once(&header)
                .chain(&self.rows)
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let last = row.len() - 1;
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                match self.columns[i].1 {
                    Align::Right => line.extend(std::iter::repeat_n(' ', pad).chain(cell.chars())),
                    Align::Left if i == last => line.push_str(cell),
                    Align::Left => line.extend(cell.chars().chain(std::iter::repeat_n(' ', pad))),
                }
                if i != last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A JSON value as a cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `ns/name` of a pod entry.
fn pod_name(p: &Value) -> String {
    format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or(""))
}

/// `true`, `false`, or `cert-wait` while the pod waits for its certificate.
fn enrolled(p: &Value) -> String {
    if p["certificatePending"] == true { "cert-wait".to_owned() } else { cell(&p["enrolled"]) }
}

/// One agent's `/status` as `mesh-agent status` prints it.
pub fn node(v: &Value) -> String {
    let mut out = format!("node {}  ready {}  open connections {}\n", cell(&v["node"]), cell(&v["ready"]), cell(&v["openConnections"]));
    out.push_str(&format!(
        "config {} (generation {}, rejected {}){}\n",
        v["config"]["path"].as_str().unwrap_or("?"),
        cell(&v["config"]["generation"]),
        cell(&v["config"]["rejected"]),
        v["config"]["lastError"].as_str().map(|e| format!("\n  last error: {e}")).unwrap_or_default()
    ));
    if let Some(kube) = v["kube"].as_object() {
        out.push_str(&format!("kubernetes: state generation {}, built {}\n", cell(&kube["generation"]), cell(&kube["built"])));
        for (input, w) in kube["watches"].as_object().into_iter().flatten() {
            if w["synced"] != true || !w["lastError"].is_null() {
                out.push_str(&format!("  {input}: synced {}, errors {}: {}\n", cell(&w["synced"]), cell(&w["errors"]), cell(&w["lastError"])));
            }
        }
        for (object, why) in kube["refused"].as_object().into_iter().flatten() {
            out.push_str(&format!("  refused {object}: {}\n", why.as_str().unwrap_or_default()));
        }
        for (pod, why) in kube["unlocatedPods"].as_object().into_iter().flatten() {
            out.push_str(&format!("  pod {pod} not located: {}\n", why.as_str().unwrap_or_default()));
        }
    }
    for p in v["notReady"].as_array().into_iter().flatten() {
        out.push_str(&format!("not ready: {} ({})\n", p["pod"].as_str().unwrap_or("?"), p["reason"].as_str().unwrap_or("?")));
    }
    out.push_str(&format!(
        "eBPF: acceleration {}, {} accelerated sockets; reconcile repairs {}\n",
        v["ebpf"]["acceleration"].as_str().unwrap_or("?"),
        cell(&v["ebpf"]["acceleratedSockets"]),
        cell(&v["repairs"])
    ));
    use Align::{Left, Right};
    let mut t = Table::new(&[
        ("POD", Left),
        ("IP", Left),
        ("ENROLLED", Left),
        ("ATTACHED", Left),
        ("CAPTURE", Left),
        ("REDIRECTED", Right),
        ("PASSED", Right),
        ("OUTBOUND", Right),
        ("INBOUND", Right),
        ("LISTENERS", Left),
    ]);
    let mut errors = Vec::new();
    for p in v["pods"].as_array().into_iter().flatten() {
        let inbound = p["proxy"]["inbound"].as_u64().unwrap_or(0) + p["proxy"]["inboundPlaintext"].as_u64().unwrap_or(0);
        let listeners: Vec<&str> = p["listeners"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        t.row(vec![
            pod_name(p),
            cell(&p["ip"]),
            enrolled(p),
            cell(&p["attached"]),
            cell(&p["inboundCapture"]),
            cell(&p["ebpf"]["redirected"]),
            cell(&p["ebpf"]["passedThrough"]),
            cell(&p["proxy"]["outbound"]),
            inbound.to_string(),
            if listeners.is_empty() { "-".to_owned() } else { listeners.join(",") },
        ]);
        if let Some(e) = p["error"].as_str() {
            errors.push(format!("{}: {e}", pod_name(p)));
        }
    }
    out.push_str(&t.render());
    // Errors under the table, so that no line breaks its columns.
    for e in errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

/// One agent of the cluster as `status --all-nodes` found it: its pod and
/// node, and its `/status` or why it could not be read.
pub struct Agent {
    pub node: String,
    pub pod: String,
    pub status: Result<Value, String>,
}

/// Every agent's pods in one table: a row per pod (enrollment, attachment,
/// capture, certificate expiry, certificate errors and the last error), a
/// row for an agent with no pods, and one for an agent that did not
/// answer, with the reason. Sorted by node.
pub fn cluster(agents: &[Agent]) -> String {
    use Align::{Left, Right};
    let mut t = Table::new(&[
        ("NODE", Left),
        ("AGENT", Left),
        ("READY", Left),
        ("POD", Left),
        ("IP", Left),
        ("ENROLLED", Left),
        ("ATTACHED", Left),
        ("CAPTURE", Left),
        ("CERT EXPIRES", Left),
        ("CERT ERRORS", Right),
        ("ERROR", Left),
    ]);
    let mut agents: Vec<&Agent> = agents.iter().collect();
    agents.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    let dash = || "-".to_owned();
    for a in agents {
        let v = match &a.status {
            Ok(v) => v,
            Err(e) => {
                let mut row = vec![a.node.clone(), a.pod.clone(), dash()];
                row.extend(std::iter::repeat_n(dash(), 7));
                row.push(format!("no answer: {e}"));
                t.row(row);
                continue;
            }
        };
        let pods = v["pods"].as_array().map(Vec::as_slice).unwrap_or_default();
        if pods.is_empty() {
            let mut row = vec![a.node.clone(), a.pod.clone(), cell(&v["ready"])];
            row.extend(std::iter::repeat_n(dash(), 7));
            row.push(v["config"]["lastError"].as_str().map_or_else(|| "no pods".to_owned(), str::to_owned));
            t.row(row);
        }
        for p in pods {
            let cert = &p["certificate"];
            let error = p["error"].as_str().or(cert["lastError"].as_str()).map_or_else(dash, str::to_owned);
            t.row(vec![
                a.node.clone(),
                a.pod.clone(),
                cell(&v["ready"]),
                pod_name(p),
                cell(&p["ip"]),
                enrolled(p),
                cell(&p["attached"]),
                cell(&p["inboundCapture"]),
                cell(&cert["notAfter"]),
                cell(&cert["errors"]),
                error,
            ]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line's cells start where the header's do.
    fn starts(line: &str) -> Vec<usize> {
        let b = line.as_bytes();
        (0..b.len()).filter(|&i| b[i] != b' ' && (i == 0 || (i >= 2 && b[i - 1] == b' ' && b[i - 2] == b' '))).collect()
    }

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut t = Table::new(&[("POD", Align::Left), ("N", Align::Right), ("LAST", Align::Left)]);
        t.row(vec!["shop/a-very-long-pod-name-indeed-longer-than-thirty-two".into(), "7".into(), "x".into()]);
        t.row(vec!["shop/b".into(), "12345".into(), "y".into()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(starts(lines[0])[2], starts(lines[1])[2]);
        assert_eq!(starts(lines[1])[2], starts(lines[2])[2]);
        // Numbers end where their column ends.
        let end = |l: &str, n: &str| l.find(n).unwrap() + n.len();
        assert_eq!(end(lines[1], " 7"), end(lines[2], "12345"));
    }

    #[test]
    fn cert_wait_does_not_push_the_row() {
        let v = serde_json::json!({"node": "a", "ready": false, "pods": [
            {"namespace": "shop", "name": "web", "ip": "2001:db8::1234:5678:9abc", "enrolled": true, "certificatePending": true,
             "attached": true, "inboundCapture": true, "ebpf": {"redirected": 1, "passedThrough": 0}, "proxy": {"outbound": 3}, "listeners": []},
            {"namespace": "shop", "name": "db", "ip": "198.51.100.7", "enrolled": false, "attached": false, "inboundCapture": false,
             "ebpf": {"redirected": 0, "passedThrough": 0}, "proxy": {}, "listeners": [], "error": "cannot open netns"}]});
        let out = node(&v);
        let table: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("POD")).take(3).collect();
        let cols: Vec<Vec<usize>> = table.iter().map(|l| starts(l)).collect();
        assert_eq!(cols[0].len(), 10, "{out}");
        assert_eq!(cols[1][..3], cols[0][..3], "{out}");
        assert_eq!(cols[2][..3], cols[0][..3], "{out}");
        assert!(out.contains("error: shop/db: cannot open netns"), "{out}");
    }

    #[test]
    fn the_cluster_table_has_every_node_and_why_one_did_not_answer() {
        let up = serde_json::json!({"ready": true, "pods": [{"namespace": "shop", "name": "web", "ip": "198.51.100.1", "enrolled": true,
            "attached": true, "inboundCapture": true, "certificate": {"notAfter": "2026-12-03T10:00:00Z", "errors": 0}}]});
        let out = cluster(&[
            Agent { node: "node-b".into(), pod: "agent-b".into(), status: Err("HTTP 503".into()) },
            Agent { node: "node-a".into(), pod: "agent-a".into(), status: Ok(up) },
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("node-a") && lines[1].contains("2026-12-03T10:00:00Z"), "{out}");
        assert!(lines[2].starts_with("node-b") && lines[2].ends_with("no answer: HTTP 503"), "{out}");
        assert_eq!(starts(lines[1]).last(), starts(lines[2]).last(), "{out}");
    }
}
