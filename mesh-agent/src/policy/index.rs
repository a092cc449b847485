//! The per-workload rule index: each rule is filed under one attribute it
//! cannot match without (a principal, a path, a host, a namespace, a port,
//! the presence of a header, a method), so a request only evaluates the rules filed
//! under its own attribute values plus the few that have no such attribute.
//! Lookups hash a handful of strings; nothing is allocated.
//!
//! Wildcard patterns are filed under their fixed part cut at a separator:
//! for paths (separators `/` and `.`) a prefix `/api/v1/us*` under
//! `/api/v1/`, a suffix `*.css` under `.css`; for principals (`/`) a suffix
//! `*/sa/admin` under `/sa/admin`; for hosts (`.`) `*.example.com` under
//! `.example.com`. A request then probes the prefixes and suffixes of its
//! value that end or start at a separator, which any string matching the
//! pattern has among them.

use foldhash::HashMap;
use http::HeaderName;

use super::{
    pattern::{Pattern, Patterns},
    rule::{Ctx, Rule},
};
use crate::state::AuthzAction;

/// Rule ids (positions in the workload's rule list, which is config order)
/// filed under one key, ascending, split by action.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    pub(crate) deny: Vec<u32>,
    pub(crate) allow: Vec<u32>,
    pub(crate) audit: Vec<u32>,
}

impl Bucket {
    fn push(&mut self, action: AuthzAction, id: u32) {
        let list = match action {
            AuthzAction::Deny => &mut self.deny,
            AuthzAction::Allow => &mut self.allow,
            AuthzAction::Audit => &mut self.audit,
        };
        // Ids arrive in ascending order; a rule filed twice under one key
        // (two patterns with the same cut) is kept once.
        if list.last() != Some(&id) {
            list.push(id);
        }
    }
}

#[derive(Debug)]
struct StrIndex {
    seps: &'static [u8],
    /// Whether patterns are stored lower case and probes must be too.
    folded: bool,
    exact: HashMap<Box<str>, Bucket>,
    prefix: HashMap<Box<str>, Bucket>,
    suffix: HashMap<Box<str>, Bucket>,
    max_prefix: usize,
    max_suffix: usize,
}

impl StrIndex {
    fn new(seps: &'static [u8], folded: bool) -> Self {
        Self {
            seps,
            folded,
            exact: HashMap::default(),
            prefix: HashMap::default(),
            suffix: HashMap::default(),
            max_prefix: 0,
            max_suffix: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty() && self.suffix.is_empty()
    }

    /// Whether every pattern can be filed: not `*`, a wildcard one with a
    /// separator in its fixed part, and compared with case exactly when the
    /// index is.
    fn can_file(&self, ps: &Patterns) -> bool {
        ps.fold_case == self.folded
            && ps.list.iter().all(|p| match p {
                Pattern::Any => false,
                Pattern::Exact(_) => true,
                Pattern::Prefix(s) | Pattern::Suffix(s) => s.bytes().any(|b| self.seps.contains(&b)),
            })
    }

    fn file(&mut self, ps: &Patterns, action: AuthzAction, id: u32) {
        let is_sep = |b: &u8| self.seps.contains(b);
        for p in ps.list.iter() {
            match p {
                Pattern::Exact(s) => self.exact.entry(s.clone()).or_default().push(action, id),
                Pattern::Prefix(s) => {
                    let cut = s.bytes().rposition(|b| is_sep(&b)).expect("checked by can_file");
                    let key = &s[..=cut];
                    self.max_prefix = self.max_prefix.max(key.len());
                    self.prefix.entry(key.into()).or_default().push(action, id);
                }
                Pattern::Suffix(s) => {
                    let cut = s.bytes().position(|b| is_sep(&b)).expect("checked by can_file");
                    let key = &s[cut..];
                    self.max_suffix = self.max_suffix.max(key.len());
                    self.suffix.entry(key.into()).or_default().push(action, id);
                }
                Pattern::Any => unreachable!("checked by can_file"),
            }
        }
    }

    fn lookup<'a>(&'a self, s: &str, f: &mut impl FnMut(&'a Bucket)) {
        if let Some(b) = self.exact.get(s) {
            f(b);
        }
        let bytes = s.as_bytes();
        if !self.prefix.is_empty() {
            let end = bytes.len().min(self.max_prefix);
            for i in (0..end).filter(|&i| self.seps.contains(&bytes[i])) {
                if let Some(b) = self.prefix.get(&s[..=i]) {
                    f(b);
                }
            }
        }
        if !self.suffix.is_empty() {
            let start = bytes.len().saturating_sub(self.max_suffix);
            for i in (start..bytes.len()).filter(|&i| self.seps.contains(&bytes[i])) {
                if let Some(b) = self.suffix.get(&s[i..]) {
                    f(b);
                }
            }
        }
    }
}

/// With or without HTTP attributes: at L4 no HTTP attribute can be looked
/// up, and ALLOW rules that need one are left out (they cannot match).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Http,
    L4,
}

#[derive(Debug)]
pub(crate) struct Index {
    principals: StrIndex,
    paths: StrIndex,
    hosts: StrIndex,
    namespaces: HashMap<Box<str>, Bucket>,
    ports: HashMap<u16, Bucket>,
    /// Rules with a `when` condition that has `values`: the header must be
    /// present.
    headers: HashMap<HeaderName, Bucket>,
    /// Upper case, as the request's method in `Ctx`.
    methods: HashMap<Box<str>, Bucket>,
    rest: Bucket,
}

impl Index {
    /// `rules` in config order: (rule, its policy's action).
    pub(crate) fn build<'r>(rules: impl Iterator<Item = (&'r Rule, AuthzAction)>, mode: Mode) -> Self {
        let mut ix = Self {
            principals: StrIndex::new(b"/", false),
            paths: StrIndex::new(b"/.", false),
            hosts: StrIndex::new(b".", true),
            namespaces: HashMap::default(),
            ports: HashMap::default(),
            headers: HashMap::default(),
            methods: HashMap::default(),
            rest: Bucket::default(),
        };
        for (id, (rule, action)) in rules.enumerate() {
            let id = u32::try_from(id).expect("fewer than 2^32 rules");
            if mode == Mode::L4 && action != AuthzAction::Deny && !rule.can_allow_at_l4() {
                continue;
            }
            ix.file(rule, action, id, mode);
        }
        ix
    }

    /// Files the rule under the first attribute that every one of its
    /// entries constrains, in rough order of selectivity. At L4 a DENY rule's
    /// HTTP fields count as matched, so only L4 attributes qualify.
    fn file(&mut self, rule: &Rule, action: AuthzAction, id: u32, mode: Mode) {
        let sources = rule.from.as_deref();
        let ops = rule.to.as_deref();
        let http = mode == Mode::Http;
        // The field of every entry, or None if some entry leaves it unset
        // (that entry can match any value).
        let every_source = |f: fn(&super::rule::Source) -> Option<&Patterns>| -> Option<Vec<&Patterns>> {
            sources?.iter().map(f).collect()
        };
        let every_op = |f: fn(&super::rule::Operation) -> Option<&Patterns>| -> Option<Vec<&Patterns>> {
            ops?.iter().map(f).collect()
        };
        for (sets, ix) in [
            (every_source(|s| s.principals.as_ref()), &mut self.principals),
            (every_op(|o| o.paths.as_ref()).filter(|_| http), &mut self.paths),
            (every_op(|o| o.hosts.as_ref()).filter(|_| http), &mut self.hosts),
        ] {
            if let Some(sets) = sets
                && sets.iter().all(|ps| ix.can_file(ps))
            {
                sets.iter().for_each(|ps| ix.file(ps, action, id));
                return;
            }
        }
        if let Some(sets) = every_source(|s| s.namespaces.as_ref())
            && sets
                .iter()
                .all(|ps| ps.list.iter().all(|p| matches!(p, Pattern::Exact(_))))
        {
            for p in sets.iter().flat_map(|ps| ps.list.iter()) {
                self.namespaces.entry(p.fixed().into()).or_default().push(action, id);
            }
            return;
        }
        if let Some(sets) = ops.and_then(|os| os.iter().map(|o| o.ports.as_deref()).collect::<Option<Vec<_>>>()) {
            for &port in sets.iter().flat_map(|ps| ps.iter()) {
                self.ports.entry(port).or_default().push(action, id);
            }
            return;
        }
        if http && let Some(name) = rule.when.iter().find_map(|c| c.required_header()) {
            self.headers.entry(name.clone()).or_default().push(action, id);
            return;
        }
        if http
            && let Some(sets) = ops.and_then(|os| os.iter().map(|o| o.methods.as_deref()).collect::<Option<Vec<_>>>())
        {
            for m in sets.iter().flat_map(|ms| ms.iter()) {
                self.methods.entry(m.clone()).or_default().push(action, id);
            }
            return;
        }
        self.rest.push(action, id);
    }

    /// Calls `f` with every bucket that may hold a rule matching `ctx`.
    pub(crate) fn candidates<'a>(&'a self, ctx: &Ctx<'_>, mut f: impl FnMut(&'a Bucket)) {
        if let Some(peer) = ctx.peer {
            self.principals.lookup(peer.principal(), &mut f);
            if let Some(b) = self.namespaces.get(peer.namespace()) {
                f(b);
            }
        }
        if let Some(h) = &ctx.http {
            self.paths.lookup(h.path, &mut f);
            if !self.hosts.is_empty() {
                with_lowercase(h.host, |host| self.hosts.lookup(host, &mut f));
            }
            if !self.headers.is_empty() {
                if self.headers.len() <= h.headers.keys_len() {
                    self.headers
                        .iter()
                        .filter(|(name, _)| h.headers.contains_key(*name))
                        .for_each(|(_, b)| f(b));
                } else {
                    h.headers
                        .keys()
                        .filter_map(|name| self.headers.get(name))
                        .for_each(&mut f);
                }
            }
            if let Some(b) = self.methods.get(h.method) {
                f(b);
            }
        }
        if let Some(b) = self.ports.get(&ctx.port) {
            f(b);
        }
        f(&self.rest);
    }
}

#[cfg(test)]
impl Index {
    /// How many keys each family holds: principals, paths, hosts,
    /// namespaces, ports, headers, methods, and the rules filed nowhere.
    pub(crate) fn family_sizes(&self) -> [usize; 8] {
        let s = |i: &StrIndex| i.exact.len() + i.prefix.len() + i.suffix.len();
        let rest = self.rest.deny.len() + self.rest.allow.len() + self.rest.audit.len();
        [
            s(&self.principals),
            s(&self.paths),
            s(&self.hosts),
            self.namespaces.len(),
            self.ports.len(),
            self.headers.len(),
            self.methods.len(),
            rest,
        ]
    }
}

/// Lower-cases into a stack buffer (host names are at most 253 bytes), or
/// allocates for a longer one.
fn with_lowercase<R>(s: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 256];
    if s.len() > buf.len() {
        return f(&s.to_ascii_lowercase());
    }
    let buf = &mut buf[..s.len()];
    buf.copy_from_slice(s.as_bytes());
    buf.make_ascii_lowercase();
    // Lower-casing ASCII bytes of a str keeps it UTF-8.
    f(std::str::from_utf8(buf).expect("still UTF-8"))
}
