//! The agent's modules form layers: among the children of any module (the
//! crate's top-level modules, `proxy`'s parts, ...) no two import each
//! other, directly or round a longer cycle. A cycle hides which part is
//! built on which, and it is how domain types end up spread over the
//! modules that use them.
//!
//! The check reads the sources (`crate::` and `super::` paths, outside
//! comments and test modules) rather than trusting the compiler, which
//! allows cycles. A reference from `a::x` to `b::y` is an edge `a -> b`
//! between the siblings `a` and `b`; references between a module and its
//! own ancestors or descendants are not edges (a parent declares its
//! children, a child builds on its parent's types).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

type ModPath = Vec<String>;

/// Edges that still close a cycle, each with the reason and what removes
/// it. The test fails once one is no longer there, so the list only
/// shrinks.
const KNOWN: &[(&str, &str, &str)] = &[];

/// An edge between siblings, with one place that makes it.
type Edges = BTreeMap<(ModPath, ModPath), String>;

/// Module path of a source file (`proxy/reply.rs` -> `proxy::reply`);
/// `None` for the binary's root and for test-only files.
fn module_of(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let path: ModPath = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    match path.as_slice() {
        [only] if only == "lib" => Some(Vec::new()),
        [only] if only == "main" => None,
        _ if path.iter().any(|s| s == "tests" || s.ends_with("_tests")) => None,
        _ => Some(path),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading the source tree") {
        let path = entry.expect("reading the source tree").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file that counts: no comment lines, nothing from an
/// inline `#[cfg(test)] mod tests` on (such modules end their files).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod tests {")) {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The paths of a use tree or path expression starting at `s` (after
/// `crate::` or `super::`): `a::b`, `{a, b::{c, d}}`, `a::{self, b}`.
fn paths(s: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    tree(s.as_bytes(), &mut 0, &mut Vec::new(), &mut out);
    out
}

fn tree(b: &[u8], i: &mut usize, prefix: &mut ModPath, out: &mut Vec<ModPath>) {
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let depth = prefix.len();
    loop {
        skip_ws(i);
        if *i < b.len() && b[*i] == b'{' {
            *i += 1;
            loop {
                tree(b, i, prefix, out);
                skip_ws(i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        break;
                    }
                    _ => break,
                }
                skip_ws(i);
                if b.get(*i) == Some(&b'}') {
                    *i += 1;
                    break;
                }
            }
            prefix.truncate(depth);
            return;
        }
        let start = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
            *i += 1;
        }
        if start == *i {
            break;
        }
        let ident = String::from_utf8_lossy(&b[start..*i]).into_owned();
        if ident != "self" {
            prefix.push(ident);
        }
        if b[*i..].starts_with(b"::") {
            *i += 2;
            continue;
        }
        break;
    }
    out.push(prefix.clone());
    prefix.truncate(depth);
}

/// Every module a file's code names, as module paths (possibly with item
/// names after them: resolved against the known modules later).
fn references(module: &[String], code: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // `mesh_crate::` and the like are not paths into this crate.
        if code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.extend(paths(&code[at + "crate::".len()..]));
    }
    let mut search = 0;
    while let Some(found) = code[search..].find("super::") {
        let at = search + found;
        search = at + "super::".len();
        if code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[at..];
        let mut base = module.to_vec();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
            search = code.len() - rest.len();
        }
        for p in paths(rest) {
            out.push(base.iter().cloned().chain(p).collect());
        }
    }
    out
}

/// The edges between sibling modules of the tree under `src`.
fn sibling_edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let sources: Vec<(ModPath, String, PathBuf)> = files
        .into_iter()
        .filter_map(|f| {
            let m = module_of(src, &f)?;
            let text = std::fs::read_to_string(&f).expect("reading a source file");
            Some((m, code(&text), f))
        })
        .collect();
    let modules: BTreeSet<ModPath> = sources.iter().map(|(m, _, _)| m.clone()).collect();
    let mut edges = Edges::new();
    for (from, code, file) in &sources {
        for mut to in references(from, code) {
            // The longest prefix that is a module: the rest names items.
            while !to.is_empty() && !modules.contains(&to) {
                to.pop();
            }
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // the same module, an ancestor or a descendant
            }
            let a = from[..=common].to_vec();
            let b = to[..=common].to_vec();
            let shown = file.strip_prefix(src).unwrap_or(file).display();
            edges.entry((a, b)).or_insert_with(|| format!("{shown} uses {}", to.join("::")));
        }
    }
    edges
}

/// Cycles among siblings, each as the modules round it.
fn cycles(edges: &Edges) -> Vec<Vec<ModPath>> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
    }
    let mut found: Vec<Vec<ModPath>> = Vec::new();
    // From each module, a path back to it through modules after it in
    // order (so each cycle is reported once, from its first module).
    for &start in next.keys() {
        let mut stack = vec![(start, 0usize)];
        let mut on_path = vec![start];
        while let Some((node, child)) = stack.pop() {
            let succ = next.get(node).map_or(&[][..], Vec::as_slice);
            if child < succ.len() {
                stack.push((node, child + 1));
                let s = succ[child];
                if s == start {
                    found.push(on_path.iter().map(|m| (*m).clone()).collect());
                } else if s > start && !on_path.contains(&s) && found.len() < 20 {
                    on_path.push(s);
                    stack.push((s, 0));
                }
            } else {
                on_path.pop();
            }
        }
    }
    found
}

#[test]
fn no_module_imports_its_siblings_round_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges = sibling_edges(&src);
    for (a, b, why) in KNOWN {
        let key = (vec![a.to_string()], vec![b.to_string()]);
        assert!(edges.remove(&key).is_some(), "{a} -> {b} is gone: remove it from KNOWN ({why})");
    }
    let found = cycles(&edges);
    let explain = |cycle: &Vec<ModPath>| {
        let mut lines = Vec::new();
        for (i, a) in cycle.iter().enumerate() {
            let b = &cycle[(i + 1) % cycle.len()];
            lines.push(format!("  {} -> {}: {}", a.join("::"), b.join("::"), edges[&(a.clone(), b.clone())]));
        }
        lines.join("\n")
    };
    let report: Vec<String> = found.iter().map(explain).collect();
    assert!(report.is_empty(), "module cycles:\n{}", report.join("\n\n"));
}

#[test]
fn the_check_sees_use_trees_paths_and_cycles() {
    let refs = references(&["proxy".into(), "http_inbound".into()], "use super::{Proxy, reply::{self, LocalReply}};\nlet x = super::super::state::Snapshot::default();\nuse crate::{identity::SpiffeId, route};\nfn f() { crate::k8s::client() }\n");
    let names: Vec<String> = refs.iter().map(|p| p.join("::")).collect();
    for want in ["proxy::Proxy", "proxy::reply", "proxy::reply::LocalReply", "state::Snapshot::default", "identity::SpiffeId", "route", "k8s::client"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    assert_eq!(code("use crate::a;\n// crate::b\n#[cfg(test)]\nmod tests {\nuse crate::c;\n}\n"), "use crate::a;\n");
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<ModPath>();
    let mut edges = Edges::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("x::y", "x::z")] {
        edges.insert((m(a), m(b)), String::new());
    }
    assert_eq!(cycles(&edges), vec![vec![m("a"), m("b"), m("c")]]);
}
