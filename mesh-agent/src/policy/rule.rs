//! The compiled form of a policy (patterns parsed, names folded, ports
//! narrowed) and how one rule matches. Validation is compilation: a policy is
//! valid exactly when it compiles.

use http::{HeaderMap, HeaderName};

use super::{
    Peer,
    pattern::{self, Pattern, Patterns},
};
use crate::state::{AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource, Labels};

/// Why a policy is invalid: `field` is relative to the policy
/// (`rules[0].from[1].principals[2]`), so each source can prefix its own
/// location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidPolicy {
    pub field: String,
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// `namespace/name`, as decisions and logs name it.
    pub(crate) id: Box<str>,
    pub(crate) selector: Option<Labels>,
    pub(crate) action: AuthzAction,
    pub(crate) rules: Box<[Rule]>,
    /// A stand-in for a policy that did not compile: DENY everything.
    pub(crate) invalid: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Rule {
    pub(crate) from: Option<Box<[Source]>>,
    pub(crate) to: Option<Box<[Operation]>>,
    pub(crate) when: Box<[Condition]>,
}

#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) principals: Option<Patterns>,
    pub(crate) not_principals: Option<Patterns>,
    pub(crate) namespaces: Option<Patterns>,
    pub(crate) not_namespaces: Option<Patterns>,
}

#[derive(Debug)]
pub(crate) struct Operation {
    pub(crate) ports: Option<Box<[u16]>>,
    pub(crate) not_ports: Option<Box<[u16]>>,
    pub(crate) hosts: Option<Patterns>,
    pub(crate) not_hosts: Option<Patterns>,
    pub(crate) methods: Option<Box<[Box<str>]>>,
    pub(crate) not_methods: Option<Box<[Box<str>]>>,
    pub(crate) paths: Option<Patterns>,
    pub(crate) not_paths: Option<Patterns>,
    /// Whether any HTTP-only field is set (checked per evaluation).
    http: bool,
}

#[derive(Debug)]
pub(crate) struct Condition {
    pub(crate) name: HeaderName,
    pub(crate) values: Option<Patterns>,
    not_values: Option<Patterns>,
}

/// What is known when a rule is evaluated. `http` is `None` at L4.
pub(crate) struct Ctx<'a> {
    pub(crate) peer: Option<&'a Peer>,
    pub(crate) port: u16,
    pub(crate) http: Option<HttpCtx<'a>>,
}

pub(crate) struct HttpCtx<'a> {
    /// Upper case.
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    /// Without port or trailing dot; compared without case.
    pub(crate) host: &'a str,
    pub(crate) headers: &'a HeaderMap,
}

impl Rule {
    /// `action` decides what an attribute unknown at L4 (`ctx.http` is
    /// `None`) evaluates to: true for DENY, false for ALLOW, so that L4
    /// enforcement never denies less nor allows more than HTTP would.
    pub(crate) fn matches(&self, ctx: &Ctx<'_>, action: AuthzAction) -> bool {
        self.from
            .as_ref()
            .is_none_or(|ss| ss.iter().any(|s| s.matches(ctx.peer)))
            && self
                .to
                .as_ref()
                .is_none_or(|os| os.iter().any(|o| o.matches(ctx, action)))
            && (self.when.is_empty()
                || match &ctx.http {
                    Some(h) => self.when.iter().all(|c| c.matches(h.headers)),
                    None => action == AuthzAction::Deny,
                })
    }

    /// Whether an ALLOW rule can match at all without HTTP attributes.
    pub(crate) fn can_allow_at_l4(&self) -> bool {
        self.when.is_empty()
            && self
                .to
                .as_ref()
                .is_none_or(|os| os.iter().any(|o| !o.has_http_fields()))
    }

    pub(crate) fn has_http_fields(&self) -> bool {
        !self.when.is_empty()
            || self
                .to
                .as_ref()
                .is_some_and(|os| os.iter().any(Operation::has_http_fields))
    }
}

impl Source {
    /// A plaintext peer (`None`) has no principal and no namespace: positive
    /// fields never match it, negated ones always do.
    fn matches(&self, peer: Option<&Peer>) -> bool {
        let Some(peer) = peer else {
            return self.principals.is_none() && self.namespaces.is_none();
        };
        let (principal, namespace) = (peer.principal().as_bytes(), peer.namespace().as_bytes());
        self.principals.as_ref().is_none_or(|ps| ps.any_matches(principal))
            && self.not_principals.as_ref().is_none_or(|ps| !ps.any_matches(principal))
            && self.namespaces.as_ref().is_none_or(|ps| ps.any_matches(namespace))
            && self.not_namespaces.as_ref().is_none_or(|ps| !ps.any_matches(namespace))
    }
}

impl Operation {
    fn matches(&self, ctx: &Ctx<'_>, action: AuthzAction) -> bool {
        let port_ok = self.ports.as_ref().is_none_or(|ps| ps.contains(&ctx.port))
            && self.not_ports.as_ref().is_none_or(|ps| !ps.contains(&ctx.port));
        if !port_ok {
            return false;
        }
        if !self.http {
            return true;
        }
        let Some(h) = &ctx.http else {
            return action == AuthzAction::Deny;
        };
        let method_in = |ms: &[Box<str>]| ms.iter().any(|m| **m == *h.method);
        let host = h.host.as_bytes();
        let path = h.path.as_bytes();
        self.methods.as_deref().is_none_or(method_in)
            && self.not_methods.as_deref().is_none_or(|ms| !method_in(ms))
            && self.paths.as_ref().is_none_or(|ps| ps.any_matches(path))
            && self.not_paths.as_ref().is_none_or(|ps| !ps.any_matches(path))
            && self.hosts.as_ref().is_none_or(|ps| ps.any_matches(host))
            && self.not_hosts.as_ref().is_none_or(|ps| !ps.any_matches(host))
    }

    pub(crate) fn has_http_fields(&self) -> bool {
        self.http
    }

    fn sets_http_fields(&self) -> bool {
        self.hosts.is_some()
            || self.not_hosts.is_some()
            || self.methods.is_some()
            || self.not_methods.is_some()
            || self.paths.is_some()
            || self.not_paths.is_some()
    }
}

impl Condition {
    /// Each value of a repeated header is compared on its own: `values`
    /// needs one of them to match, `notValues` needs none to. (Joining them
    /// with ',' as Envoy does would let `x: bad` + `x: ok` slip past a DENY
    /// on `bad`.) An absent header matches only `notValues`.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let any = |ps: &Patterns| headers.get_all(&self.name).iter().any(|v| ps.any_matches(v.as_bytes()));
        self.values.as_ref().is_none_or(any) && self.not_values.as_ref().is_none_or(|ps| !any(ps))
    }
}

/// Checks and compiles a policy.
pub(crate) fn compile(p: &AuthorizationPolicy) -> Result<CompiledPolicy, InvalidPolicy> {
    let invalid = |field: &str, reason: String| InvalidPolicy {
        field: field.into(),
        reason,
    };
    if p.name.is_empty() {
        return Err(invalid("name", "the name is empty".into()));
    }
    if p.namespace.is_empty() {
        return Err(invalid("namespace", "the namespace is empty".into()));
    }
    if p.selector.as_ref().is_some_and(|s| s.is_empty()) {
        return Err(invalid(
            "selector",
            "an empty selector is ambiguous: omit it for a namespace-wide policy".into(),
        ));
    }
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| compile_rule(&format!("rules[{i}]"), r, p.ignore_path_case))
        .collect::<Result<_, _>>()?;
    Ok(CompiledPolicy {
        id: format!("{}/{}", p.namespace, p.name).into(),
        selector: p.selector.clone(),
        action: p.action,
        rules,
        invalid: false,
    })
}

/// What stands in for a policy that does not compile (a source that skipped
/// validation): it denies everything its selector covers, because dropping
/// it could open access (a lost DENY, or a lost last ALLOW).
pub(crate) fn deny_all(p: &AuthorizationPolicy) -> CompiledPolicy {
    CompiledPolicy {
        id: format!("{}/{}", p.namespace, p.name).into(),
        selector: p.selector.clone().filter(|s| !s.is_empty()),
        action: AuthzAction::Deny,
        rules: Box::new([Rule::default()]),
        invalid: true,
    }
}

fn compile_rule(at: &str, r: &AuthzRule, ignore_path_case: bool) -> Result<Rule, InvalidPolicy> {
    let from = list(&format!("{at}.from"), &r.from, compile_source)?;
    let to = list(&format!("{at}.to"), &r.to, |at, o| {
        compile_operation(at, o, ignore_path_case)
    })?;
    let when = list(&format!("{at}.when"), &r.when, compile_condition)?;
    Ok(Rule {
        from,
        to,
        when: when.unwrap_or_default(),
    })
}

fn compile_source(at: &str, s: &AuthzSource) -> Result<Source, InvalidPolicy> {
    Ok(Source {
        principals: patterns(&format!("{at}.principals"), &s.principals, pattern::principal, false)?,
        not_principals: patterns(
            &format!("{at}.notPrincipals"),
            &s.not_principals,
            pattern::principal,
            false,
        )?,
        namespaces: patterns(&format!("{at}.namespaces"), &s.namespaces, pattern::namespace, false)?,
        not_namespaces: patterns(
            &format!("{at}.notNamespaces"),
            &s.not_namespaces,
            pattern::namespace,
            false,
        )?,
    })
}

fn compile_operation(at: &str, o: &AuthzOperation, ignore_path_case: bool) -> Result<Operation, InvalidPolicy> {
    let path = |s: &str| pattern::path(s, ignore_path_case);
    let ports = |f: &str, v: &Option<Vec<u32>>| {
        list(f, v, |at, p: &u32| {
            pattern::port(*p).map_err(|reason| InvalidPolicy {
                field: at.into(),
                reason,
            })
        })
    };
    let methods = |f: &str, v: &Option<Vec<String>>| {
        list(f, v, |at, m: &String| {
            pattern::method(m).map_err(|reason| InvalidPolicy {
                field: at.into(),
                reason,
            })
        })
    };
    let mut op = Operation {
        ports: ports(&format!("{at}.ports"), &o.ports)?,
        not_ports: ports(&format!("{at}.notPorts"), &o.not_ports)?,
        hosts: patterns(&format!("{at}.hosts"), &o.hosts, pattern::host, true)?,
        not_hosts: patterns(&format!("{at}.notHosts"), &o.not_hosts, pattern::host, true)?,
        methods: methods(&format!("{at}.methods"), &o.methods)?,
        not_methods: methods(&format!("{at}.notMethods"), &o.not_methods)?,
        paths: patterns(&format!("{at}.paths"), &o.paths, path, ignore_path_case)?,
        not_paths: patterns(&format!("{at}.notPaths"), &o.not_paths, path, ignore_path_case)?,
        http: false,
    };
    op.http = op.sets_http_fields();
    Ok(op)
}

fn compile_condition(at: &str, c: &AuthzCondition) -> Result<Condition, InvalidPolicy> {
    let name = pattern::header_name(&c.header).map_err(|reason| InvalidPolicy {
        field: format!("{at}.header"),
        reason,
    })?;
    if c.values.is_none() && c.not_values.is_none() {
        return Err(InvalidPolicy {
            field: at.into(),
            reason: "a condition needs `values` or `notValues`".into(),
        });
    }
    Ok(Condition {
        name,
        values: patterns(&format!("{at}.values"), &c.values, pattern::header_value, false)?,
        not_values: patterns(&format!("{at}.notValues"), &c.not_values, pattern::header_value, false)?,
    })
}

/// A set list: refused when empty (see `state::AuthorizationPolicy`), each
/// entry compiled with its index in the field name.
fn list<S, T>(
    field: &str,
    v: &Option<Vec<S>>,
    f: impl Fn(&str, &S) -> Result<T, InvalidPolicy>,
) -> Result<Option<Box<[T]>>, InvalidPolicy> {
    let Some(v) = v else { return Ok(None) };
    if v.is_empty() {
        return Err(InvalidPolicy {
            field: field.into(),
            reason: "an empty list is ambiguous (nothing? anything?): omit the field to not constrain it".into(),
        });
    }
    v.iter()
        .enumerate()
        .map(|(i, s)| f(&format!("{field}[{i}]"), s))
        .collect::<Result<_, _>>()
        .map(Some)
}

fn patterns(
    field: &str,
    v: &Option<Vec<String>>,
    parse: impl Fn(&str) -> Result<Pattern, String>,
    fold_case: bool,
) -> Result<Option<Patterns>, InvalidPolicy> {
    let list = list(field, v, |at, s: &String| {
        parse(s).map_err(|reason| InvalidPolicy {
            field: at.into(),
            reason,
        })
    })?;
    Ok(list.map(|list| Patterns { list, fold_case }))
}
