//! The compiled form of a policy (patterns parsed, names folded, ports
//! narrowed) and how one rule matches. Validation is compilation: a policy is
//! valid exactly when it compiles.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

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
    /// `target_services` resolved to those services' selectors when the
    /// authorizer is built (a name with no such service selects nothing).
    pub(crate) services: Option<Vec<Labels>>,
    pub(crate) action: AuthzAction,
    pub(crate) rules: Box<[Rule]>,
    /// A stand-in for a policy that did not compile (DENY everything), or a
    /// refused policy a source keeps in force to fail closed.
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
    pub(crate) ip_blocks: Option<Box<[IpNet]>>,
    pub(crate) not_ip_blocks: Option<Box<[IpNet]>>,
    pub(crate) remote_ip_blocks: Option<Box<[IpNet]>>,
    pub(crate) not_remote_ip_blocks: Option<Box<[IpNet]>>,
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

/// A `when` condition: what it looks at, and the values it wants (any of
/// `values`, none of `notValues`).
#[derive(Debug)]
pub(crate) enum Condition {
    /// A request header (HTTP-only). Its name is the index's key.
    Header { name: HeaderName, values: Option<Patterns>, not_values: Option<Patterns> },
    /// `source.ip` / `remote.ip` (the peer's address), `destination.ip`.
    Ip { destination: bool, values: Option<Box<[IpNet]>>, not_values: Option<Box<[IpNet]>> },
    /// `source.namespace` / `source.principal`: of the verified peer; a
    /// plaintext peer has neither.
    Peer { principal: bool, values: Option<Patterns>, not_values: Option<Patterns> },
    /// `destination.port`.
    Port { values: Option<Box<[u16]>>, not_values: Option<Box<[u16]>> },
}

/// What is known when a rule is evaluated. `http` is `None` at L4.
pub(crate) struct Ctx<'a> {
    pub(crate) peer: Option<&'a Peer>,
    pub(crate) port: u16,
    /// The peer's address (canonical: IPv4-mapped addresses as IPv4).
    pub(crate) source: IpAddr,
    /// The workload's address the connection came to.
    pub(crate) destination: IpAddr,
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
            .is_none_or(|ss| ss.iter().any(|s| s.matches(ctx.peer, ctx.source)))
            && self
                .to
                .as_ref()
                .is_none_or(|os| os.iter().any(|o| o.matches(ctx, action)))
            && self.when.iter().all(|c| c.matches(ctx, action))
    }

    /// Whether an ALLOW rule can match at all without HTTP attributes.
    pub(crate) fn can_allow_at_l4(&self) -> bool {
        !self.when.iter().any(Condition::is_http)
            && self
                .to
                .as_ref()
                .is_none_or(|os| os.iter().any(|o| !o.has_http_fields()))
    }

    pub(crate) fn has_http_fields(&self) -> bool {
        self.when.iter().any(Condition::is_http)
            || self
                .to
                .as_ref()
                .is_some_and(|os| os.iter().any(Operation::has_http_fields))
    }
}

impl Source {
    /// A plaintext peer (`None`) has no principal and no namespace: positive
    /// fields never match it, negated ones always do.
    fn matches(&self, peer: Option<&Peer>, source: IpAddr) -> bool {
        if !ips_match(&self.ip_blocks, &self.not_ip_blocks, source)
            || !ips_match(&self.remote_ip_blocks, &self.not_remote_ip_blocks, source)
        {
            return false;
        }
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
    pub(crate) fn is_http(&self) -> bool {
        matches!(self, Self::Header { .. })
    }

    /// At L4 a header condition is unknown: true in a DENY rule, false in
    /// an ALLOW one (the L4 stance of the module doc). The others are known
    /// on every connection.
    fn matches(&self, ctx: &Ctx<'_>, action: AuthzAction) -> bool {
        match self {
            Self::Header { name, values, not_values } => match &ctx.http {
                // Each value of a repeated header is compared on its own:
                // `values` needs one of them to match, `notValues` needs none
                // to. (Joining them with ',' as Envoy does would let `x: bad`
                // + `x: ok` slip past a DENY on `bad`.) An absent header
                // matches only `notValues`.
                Some(h) => {
                    let any = |ps: &Patterns| h.headers.get_all(name).iter().any(|v| ps.any_matches(v.as_bytes()));
                    values.as_ref().is_none_or(any) && not_values.as_ref().is_none_or(|ps| !any(ps))
                }
                None => action == AuthzAction::Deny,
            },
            Self::Ip { destination, values, not_values } => {
                ips_match(values, not_values, if *destination { ctx.destination } else { ctx.source })
            }
            Self::Peer { principal, values, not_values } => {
                let Some(peer) = ctx.peer else {
                    return values.is_none();
                };
                let v = if *principal { peer.principal() } else { peer.namespace() }.as_bytes();
                values.as_ref().is_none_or(|ps| ps.any_matches(v)) && not_values.as_ref().is_none_or(|ps| !ps.any_matches(v))
            }
            Self::Port { values, not_values } => {
                values.as_ref().is_none_or(|ps| ps.contains(&ctx.port))
                    && not_values.as_ref().is_none_or(|ps| !ps.contains(&ctx.port))
            }
        }
    }

    /// The header a condition needs present (it has `values`), for the index.
    pub(crate) fn required_header(&self) -> Option<&HeaderName> {
        match self {
            Self::Header { name, values: Some(_), .. } => Some(name),
            _ => None,
        }
    }
}

fn ips_match(values: &Option<Box<[IpNet]>>, not_values: &Option<Box<[IpNet]>>, ip: IpAddr) -> bool {
    values.as_ref().is_none_or(|ns| ns.iter().any(|n| n.contains(&ip)))
        && not_values.as_ref().is_none_or(|ns| !ns.iter().any(|n| n.contains(&ip)))
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
    if let Some(names) = &p.target_services {
        if p.selector.is_some() {
            return Err(invalid("targetServices", "a policy has a selector or target services, not both".into()));
        }
        if names.is_empty() {
            return Err(invalid("targetServices", "an empty list is ambiguous: omit it for a namespace-wide policy".into()));
        }
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
        services: None,
        action: p.action,
        rules,
        invalid: p.refused.is_some(),
    })
}

/// What stands in for a policy that does not compile (a source that skipped
/// validation): it denies everything its selector covers, because dropping
/// it could open access (a lost DENY, or a lost last ALLOW).
pub(crate) fn deny_all(p: &AuthorizationPolicy) -> CompiledPolicy {
    CompiledPolicy {
        id: format!("{}/{}", p.namespace, p.name).into(),
        selector: p.selector.clone().filter(|s| !s.is_empty()),
        services: None,
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
        ip_blocks: ip_list(&format!("{at}.ipBlocks"), &s.ip_blocks)?,
        not_ip_blocks: ip_list(&format!("{at}.notIpBlocks"), &s.not_ip_blocks)?,
        remote_ip_blocks: ip_list(&format!("{at}.remoteIpBlocks"), &s.remote_ip_blocks)?,
        not_remote_ip_blocks: ip_list(&format!("{at}.notRemoteIpBlocks"), &s.not_remote_ip_blocks)?,
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
    let invalid = |field: String, reason: String| InvalidPolicy { field, reason };
    if c.values.is_none() && c.not_values.is_none() {
        return Err(invalid(at.into(), "a condition needs `values` or `notValues`".into()));
    }
    let (values, not_values) = (format!("{at}.values"), format!("{at}.notValues"));
    let header = match (c.header.is_empty(), &c.key) {
        (false, None) => c.header.as_str(),
        (true, Some(key)) => match pattern::condition_key(key).map_err(|r| invalid(format!("{at}.key"), r))? {
            pattern::Key::Header(name) => name,
            pattern::Key::SourceIp | pattern::Key::DestinationIp => {
                let destination = key == "destination.ip";
                return Ok(Condition::Ip {
                    destination,
                    values: ip_list(&values, &c.values)?,
                    not_values: ip_list(&not_values, &c.not_values)?,
                });
            }
            pattern::Key::SourceNamespace => {
                return Ok(Condition::Peer {
                    principal: false,
                    values: patterns(&values, &c.values, pattern::namespace, false)?,
                    not_values: patterns(&not_values, &c.not_values, pattern::namespace, false)?,
                });
            }
            pattern::Key::SourcePrincipal => {
                return Ok(Condition::Peer {
                    principal: true,
                    values: patterns(&values, &c.values, pattern::principal, false)?,
                    not_values: patterns(&not_values, &c.not_values, pattern::principal, false)?,
                });
            }
            pattern::Key::DestinationPort => {
                let port = |at: &str, p: &String| {
                    p.parse::<u32>()
                        .map_err(|_| format!("{p:?} is not a port number"))
                        .and_then(pattern::port)
                        .map_err(|reason| invalid(at.into(), reason))
                };
                return Ok(Condition::Port { values: list(&values, &c.values, port)?, not_values: list(&not_values, &c.not_values, port)? });
            }
        },
        _ => return Err(invalid(at.into(), "a condition names exactly one of `header` and `key`".into())),
    };
    let field = if c.key.is_some() { format!("{at}.key") } else { format!("{at}.header") };
    let name = pattern::header_name(header).map_err(|reason| invalid(field, reason))?;
    Ok(Condition::Header {
        name,
        values: patterns(&values, &c.values, pattern::header_value, false)?,
        not_values: patterns(&not_values, &c.not_values, pattern::header_value, false)?,
    })
}

fn ip_list(field: &str, v: &Option<Vec<String>>) -> Result<Option<Box<[IpNet]>>, InvalidPolicy> {
    list(field, v, |at, s: &String| pattern::ip_block(s).map_err(|reason| InvalidPolicy { field: at.into(), reason }))
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
