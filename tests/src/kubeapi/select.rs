//! The query string, and the field and label selectors in it, as the API server reads them.

use std::collections::HashMap;

use serde_json::Value;

/// `a.b=v`, `a.b==v`, `a.b!=v`, comma-separated (all must hold).
pub(super) struct Fields(Vec<(Vec<String>, bool, String)>);

impl Fields {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            out.push((path.split('.').map(str::to_owned).collect(), eq, value.to_owned()));
        }
        Ok(Self(out))
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let got = path.iter().try_fold(obj, |v, k| v.get(k)).and_then(Value::as_str).unwrap_or_default();
            (got == value) == *eq
        })
    }
}

enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Equality- and set-based label selectors.
pub(super) struct Labels(Vec<Req>);

impl Labels {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        // Split on commas outside parentheses.
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&s[start..]);
        for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or(format!("invalid label selector term {term:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
            };
            let req = if let Some((k, v)) = term.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Req::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Req::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = term.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else {
                Req::Exists(term.into())
            };
            out.push(req);
        }
        Ok(Self(out))
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::Ne(k, v) => get(k) != Some(v),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        })
    }
}

/// The request's query parameters, percent-decoded.
pub(super) fn query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(c) => {
                        out.push(c);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"labels": {"app": "web", "v": "2"}}, "spec": {"nodeName": "node-a"}});
        assert!(Fields::parse("spec.nodeName=node-a").unwrap().matches(&pod));
        assert!(!Fields::parse("spec.nodeName=node-b").unwrap().matches(&pod));
        assert!(Fields::parse("spec.nodeName!=node-b").unwrap().matches(&pod));
        assert!(Labels::parse("app=web,v in (1,2),!gone").unwrap().matches(&pod));
        assert!(!Labels::parse("app=web,v notin (2)").unwrap().matches(&pod));
        assert!(Labels::parse("").unwrap().matches(&pod));
        assert!(Fields::parse("nonsense").is_err());
    }
}
