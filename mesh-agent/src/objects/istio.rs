//! Istio's `security.istio.io` `AuthorizationPolicy` and
//! `PeerAuthentication`, as Istio documents them, into the mesh's one
//! policy model ([`state::AuthorizationPolicy`], [`state::PeerAuthentication`]);
//! what the fields mean at run time is [`crate::policy`]'s.
//!
//! The shapes are Istio's (`selector.matchLabels`, `from[].source`,
//! `to[].operation`, `when[].key`, principals without `spiffe://`, ports as
//! strings); an empty list is Istio's "not set". Unknown fields are refused
//! (Istio's validation refuses them too).
//!
//! # Refusals, and what stands in
//!
//! - An ALLOW policy that sets a field this mesh does not support is
//!   enforced **without the rules that set it** (they could never match:
//!   it allows less, never more); one that is invalid or cannot be read
//!   allows nothing, so what it selects still denies what no other ALLOW
//!   allows (its mere presence does that in Istio). Leaving it out would
//!   open what it was written to close. An AUDIT policy is left out (it
//!   never changes a decision).
//! - A DENY policy that sets an unsupported field (`requestPrincipals`,
//!   `request.auth.*`, ...) is enforced **without that field**: the rule
//!   then matches more and denies more, never less (Istio's "the rule
//!   becomes stricter"). It is still reported as refused (`Unsupported`).
//! - A DENY policy that is invalid or cannot be read denies **everything**
//!   its selector (or targets, or namespace) covers until it is fixed.
//! - CUSTOM (an external authorizer) is refused; it stands as a DENY of
//!   what its rules match, as Istio denies when its provider is unusable.
//! - A PeerAuthentication that cannot be used but asks for STRICT anywhere
//!   stands as STRICT for what it selects.
//!
//! Sources keep an earlier valid version of the same object in force over
//! any stand-in (a refused edit changes nothing).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{Converted, IGNORE_PATH_CASE_ANNOTATION, Meta, Refused};
use crate::state::{self, AuthzAction, Labels, PeerAuthMode};

pub const SECURITY_GROUP: &str = "security.istio.io";

type List = Option<Vec<String>>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSelector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TargetRef {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Provider {
    #[allow(dead_code)] // read only to be refused with CUSTOM
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationPolicySpec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    target_ref: Option<TargetRef>,
    #[serde(default)]
    target_refs: Option<Vec<TargetRef>>,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    provider: Option<Provider>,
    #[serde(default)]
    rules: Option<Vec<Rule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    from: Option<Vec<From>>,
    #[serde(default)]
    to: Option<Vec<To>>,
    #[serde(default)]
    when: Option<Vec<Condition>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct From {
    #[serde(default)]
    source: Option<Source>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Source {
    #[serde(default)]
    principals: List,
    #[serde(default)]
    not_principals: List,
    #[serde(default)]
    request_principals: List,
    #[serde(default)]
    not_request_principals: List,
    #[serde(default)]
    namespaces: List,
    #[serde(default)]
    not_namespaces: List,
    #[serde(default)]
    service_accounts: List,
    #[serde(default)]
    not_service_accounts: List,
    #[serde(default)]
    trust_domains: List,
    #[serde(default)]
    not_trust_domains: List,
    #[serde(default)]
    ip_blocks: List,
    #[serde(default)]
    not_ip_blocks: List,
    #[serde(default)]
    remote_ip_blocks: List,
    #[serde(default)]
    not_remote_ip_blocks: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct To {
    #[serde(default)]
    operation: Option<Operation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Operation {
    #[serde(default)]
    hosts: List,
    #[serde(default)]
    not_hosts: List,
    #[serde(default)]
    ports: List,
    #[serde(default)]
    not_ports: List,
    #[serde(default)]
    methods: List,
    #[serde(default)]
    not_methods: List,
    #[serde(default)]
    paths: List,
    #[serde(default)]
    not_paths: List,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default)]
    values: List,
    #[serde(default)]
    not_values: List,
}

/// Reads a spec with the path of a bad field in the message
/// (`spec.rules[0].to[0].operation.ports[0]: invalid type ...`).
pub(super) fn read<T: serde::de::DeserializeOwned + Default>(spec: &Value) -> Result<T, Refused> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { "spec".to_owned() } else { format!("spec.{path}") };
        Refused::invalid(format!("{at}: {}", e.inner()))
    })
}

/// Istio's empty list is "not set".
fn set(v: &List) -> List {
    v.clone().filter(|v| !v.is_empty())
}

fn selector_labels(s: &Option<WorkloadSelector>) -> Option<Labels> {
    s.as_ref().and_then(|s| s.match_labels.clone()).filter(|l| !l.is_empty())
}

/// An unsupported field met while converting: where, and why.
struct Unsupported {
    field: String,
    why: &'static str,
}

const NO_REQUEST_AUTHN: &str = "request authentication (JWT) is not implemented by this mesh";

pub fn authorization_policy(meta: &Meta<'_>, spec: &Value) -> Result<Converted, Refused> {
    let parsed: Result<AuthorizationPolicySpec, Refused> = read(spec);
    let result = parsed.and_then(|s| convert_authz(meta, &s));
    result.map_err(|mut r| {
        if r.stand_in.is_none() {
            r.stand_in = fail_closed_authz(meta, spec).map(|p| Box::new(Converted::AuthorizationPolicy(p)));
        }
        r
    })
}

fn convert_authz(meta: &Meta<'_>, s: &AuthorizationPolicySpec) -> Result<Converted, Refused> {
    let action = s.action.unwrap_or_default();
    if action != Action::Custom && s.provider.is_some() {
        return Err(Refused::invalid("spec.provider: only a CUSTOM policy names a provider".into()));
    }
    let mut policy = state::AuthorizationPolicy {
        name: meta.name.to_owned(),
        namespace: meta.namespace.to_owned(),
        selector: selector_labels(&s.selector),
        action: match action {
            Action::Allow => AuthzAction::Allow,
            Action::Deny | Action::Custom => AuthzAction::Deny,
            Action::Audit => AuthzAction::Audit,
        },
        rules: Vec::new(),
        ignore_path_case: ignore_path_case(meta)?,
        target_services: target_services(s)?,
        refused: None,
    };
    let mut unsupported = Vec::new();
    // Rules that set an unsupported field: an ALLOW enforces without them.
    let mut unusable = Vec::new();
    for (i, r) in s.rules.iter().flatten().enumerate() {
        let before = unsupported.len();
        policy.rules.push(rule(&format!("spec.rules[{i}]"), r, &mut unsupported)?);
        if unsupported.len() > before {
            unusable.push(i);
        }
    }
    crate::policy::validate(&policy).map_err(|e| Refused::invalid(format!("{}: {}", istio_field(&e.field), e.reason)))?;
    if action == Action::Custom {
        let message = "spec.action: CUSTOM (an external authorizer) is not supported; until it is removed, what its rules match is denied".to_owned();
        policy.refused = Some(message.clone());
        return Err(Refused { stand_in: Some(Box::new(Converted::AuthorizationPolicy(policy))), ..Refused::unsupported(message) });
    }
    let Some(first) = unsupported.first() else {
        return Ok(Converted::AuthorizationPolicy(policy));
    };
    let fields: Vec<&str> = unsupported.iter().map(|u| u.field.as_str()).collect();
    if action == Action::Deny {
        let message = format!(
            "{}: not supported: {}; the DENY policy is enforced without {} so its rules deny more, never less",
            first.field,
            first.why,
            if fields.len() == 1 { "it".to_owned() } else { format!("any of {}", fields.join(", ")) }
        );
        policy.refused = Some(message.clone());
        return Err(Refused { stand_in: Some(Box::new(Converted::AuthorizationPolicy(policy))), ..Refused::unsupported(message) });
    }
    if action == Action::Allow {
        // Such a rule can never match (Istio: the rule is ignored, stricter,
        // never looser): the policy stands without it, so the workloads it
        // selects still deny what no rule allows. Leaving the policy out
        // would let through everything it was written to deny.
        let message = format!(
            "{}: not supported: {}; the ALLOW policy is enforced without the rules that use {}, so it allows less, never more",
            first.field,
            first.why,
            if fields.len() == 1 { "it".to_owned() } else { format!("any of {}", fields.join(", ")) }
        );
        let mut i = 0;
        policy.rules.retain(|_| {
            i += 1;
            !unusable.contains(&(i - 1))
        });
        policy.refused = Some(message.clone());
        return Err(Refused { stand_in: Some(Box::new(Converted::AuthorizationPolicy(policy))), ..Refused::unsupported(message) });
    }
    // An AUDIT policy never changes a decision: left out, nothing opens.
    Err(Refused {
        stand_in: None,
        ..Refused::unsupported(format!("{}: not supported: {}; an AUDIT policy is not enforced in part, so it is left out", first.field, first.why))
    })
}

fn ignore_path_case(meta: &Meta<'_>) -> Result<bool, Refused> {
    match meta.annotations.get(IGNORE_PATH_CASE_ANNOTATION).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(Refused::invalid(format!("metadata.annotations.{IGNORE_PATH_CASE_ANNOTATION}: {v:?} is not \"true\" or \"false\""))),
    }
}

/// `targetRef(s)`: Services of the policy's namespace (their pods); Istio's
/// other targets (Gateway, GatewayClass, ServiceEntry) are enforced by a
/// gateway or waypoint, which this mesh does not have.
fn target_services(s: &AuthorizationPolicySpec) -> Result<Option<Vec<String>>, Refused> {
    let (field, refs): (&str, Vec<&TargetRef>) = match (&s.target_ref, &s.target_refs) {
        (Some(_), Some(_)) => return Err(Refused::invalid("spec.targetRef: set targetRef or targetRefs, not both".into())),
        (Some(r), None) => ("spec.targetRef", vec![r]),
        (None, Some(rs)) if !rs.is_empty() => ("spec.targetRefs", rs.iter().collect()),
        _ => return Ok(None),
    };
    if selector_labels(&s.selector).is_some() {
        return Err(Refused::invalid(format!("{field}: a policy has a selector or targets, not both")));
    }
    let mut names = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let at = if s.target_ref.is_some() { field.to_owned() } else { format!("{field}[{i}]") };
        if !r.namespace.is_empty() {
            return Err(Refused::invalid(format!("{at}.namespace: a target is in the policy's own namespace")));
        }
        if !(r.group.is_empty() || r.group == "core") || r.kind != "Service" {
            let kind = if r.group.is_empty() { r.kind.clone() } else { format!("{}/{}", r.group, r.kind) };
            return Err(Refused::unsupported(format!(
                "{at}.kind: {kind} is not supported: only a Service (its pods) can be a target here; gateways and waypoints are not part of this mesh"
            )));
        }
        names.push(r.name.clone());
    }
    Ok(Some(names))
}

fn rule(at: &str, r: &Rule, unsupported: &mut Vec<Unsupported>) -> Result<state::AuthzRule, Refused> {
    let mut out = state::AuthzRule::default();
    if let Some(from) = r.from.as_ref().filter(|f| !f.is_empty()) {
        let mut sources = Vec::new();
        for (i, f) in from.iter().enumerate() {
            sources.push(source(&format!("{at}.from[{i}].source"), f.source.as_ref().unwrap_or(&Source::default()), unsupported)?);
        }
        out.from = Some(sources);
    }
    if let Some(to) = r.to.as_ref().filter(|t| !t.is_empty()) {
        let mut ops = Vec::new();
        for (i, t) in to.iter().enumerate() {
            ops.push(operation(&format!("{at}.to[{i}].operation"), t.operation.as_ref().unwrap_or(&Operation::default()))?);
        }
        out.to = Some(ops);
    }
    if let Some(when) = r.when.as_ref().filter(|w| !w.is_empty()) {
        let mut conds = Vec::new();
        for (i, c) in when.iter().enumerate() {
            let at = format!("{at}.when[{i}]");
            if let Err(why) = supported_key(&c.key) {
                unsupported.push(Unsupported { field: format!("{at}.key"), why });
                continue; // dropped: see the module doc
            }
            let principal = c.key == "source.principal";
            let values = |v: &List, f: &str| -> Result<List, Refused> {
                match set(v) {
                    Some(vs) if principal => vs.iter().enumerate().map(|(j, p)| principal_pattern(&format!("{at}.{f}[{j}]"), p)).collect::<Result<_, _>>().map(Some),
                    other => Ok(other),
                }
            };
            conds.push(state::AuthzCondition {
                header: String::new(),
                key: Some(c.key.clone()),
                values: values(&c.values, "values")?,
                not_values: values(&c.not_values, "notValues")?,
            });
        }
        out.when = (!conds.is_empty()).then_some(conds);
    }
    Ok(out)
}

/// Keys refused here; the rest are checked by the policy compiler.
fn supported_key(key: &str) -> Result<(), &'static str> {
    if key.starts_with("request.auth.") {
        return Err(NO_REQUEST_AUTHN);
    }
    match key {
        "connection.sni" => Err("the mesh tunnel carries no SNI and the agent does not terminate the workload's own TLS"),
        k if k.starts_with("experimental.") => Err("Envoy filter metadata does not exist in this mesh"),
        _ => Ok(()),
    }
}

fn source(at: &str, s: &Source, unsupported: &mut Vec<Unsupported>) -> Result<state::AuthzSource, Refused> {
    for (field, v) in [("requestPrincipals", &s.request_principals), ("notRequestPrincipals", &s.not_request_principals)] {
        if set(v).is_some() {
            unsupported.push(Unsupported { field: format!("{at}.{field}"), why: NO_REQUEST_AUTHN });
        }
    }
    let principals = |v: &List, f: &str| -> Result<List, Refused> {
        set(v).map(|ps| ps.iter().enumerate().map(|(i, p)| principal_pattern(&format!("{at}.{f}[{i}]"), p)).collect()).transpose()
    };
    let mut principals_in = principals(&s.principals, "principals")?;
    let mut not_principals = principals(&s.not_principals, "notPrincipals")?;
    // serviceAccounts ("ns/sa") are principals of any trust domain; Istio's
    // schema forbids them beside principals, which keeps this a plain union.
    for (field, v, into) in [
        ("serviceAccounts", &s.service_accounts, &mut principals_in),
        ("notServiceAccounts", &s.not_service_accounts, &mut not_principals),
    ] {
        let Some(sas) = set(v) else { continue };
        if into.is_some() {
            let other = if field.starts_with("not") { "notPrincipals" } else { "principals" };
            return Err(Refused::invalid(format!("{at}.{field}: set {field} or {other}, not both")));
        }
        let mut out = Vec::new();
        for (i, sa) in sas.iter().enumerate() {
            let ok = sa.split_once('/').filter(|(ns, name)| dns_label(ns) && dns_subdomain(name));
            let Some((ns, name)) = ok else {
                return Err(Refused::invalid(format!("{at}.{field}[{i}]: {sa:?} is not NAMESPACE/SERVICE-ACCOUNT")));
            };
            out.push(format!("*/ns/{ns}/sa/{name}"));
        }
        *into = Some(out);
    }
    for (field, v) in [("trustDomains", &s.trust_domains), ("notTrustDomains", &s.not_trust_domains)] {
        if set(v).is_some() {
            // Refused, not dropped: a trust-domain constraint can narrow
            // even a DENY's principals in ways dropping would not cover.
            return Err(Refused::unsupported(format!(
                "{at}.{field}: not supported: a mesh has one trust domain, which every peer's certificate is checked against"
            )));
        }
    }
    Ok(state::AuthzSource {
        ip_blocks: set(&s.ip_blocks),
        not_ip_blocks: set(&s.not_ip_blocks),
        remote_ip_blocks: set(&s.remote_ip_blocks),
        not_remote_ip_blocks: set(&s.not_remote_ip_blocks),
        principals: principals_in,
        not_principals,
        namespaces: set(&s.namespaces),
        not_namespaces: set(&s.not_namespaces),
    })
}

/// Istio principals are SPIFFE IDs without `spiffe://`
/// (`cluster.local/ns/shop/sa/web`, `cluster.local/ns/shop/*`,
/// `*/sa/web`, `*`); the model's are whole URIs.
fn principal_pattern(at: &str, p: &str) -> Result<String, Refused> {
    if p.starts_with("spiffe://") {
        return Err(Refused::invalid(format!("{at}: {p:?}: Istio principals are written without \"spiffe://\" (cluster.local/ns/NAMESPACE/sa/NAME)")));
    }
    Ok(if p.starts_with('*') { p.to_owned() } else { format!("spiffe://{p}") })
}

fn operation(at: &str, o: &Operation) -> Result<state::AuthzOperation, Refused> {
    let ports = |v: &List, f: &str| -> Result<Option<Vec<u32>>, Refused> {
        set(v)
            .map(|ps| {
                ps.iter()
                    .enumerate()
                    .map(|(i, p)| p.parse::<u32>().map_err(|_| Refused::invalid(format!("{at}.{f}[{i}]: {p:?} is not a port number"))))
                    .collect()
            })
            .transpose()
    };
    Ok(state::AuthzOperation {
        hosts: set(&o.hosts),
        not_hosts: set(&o.not_hosts),
        ports: ports(&o.ports, "ports")?,
        not_ports: ports(&o.not_ports, "notPorts")?,
        methods: set(&o.methods),
        not_methods: set(&o.not_methods),
        paths: set(&o.paths),
        not_paths: set(&o.not_paths),
    })
}

/// A model field path (`rules[0].from[1].principals[2]`) as the Istio
/// object's (`spec.rules[0].from[1].source.principals[2]`).
fn istio_field(field: &str) -> String {
    let mut out = String::from("spec");
    for seg in field.split('.') {
        out.push('.');
        out.push_str(seg);
        if seg.starts_with("from[") {
            out.push_str(".source");
        } else if seg.starts_with("to[") {
            out.push_str(".operation");
        }
    }
    out.replace("spec.selector", "spec.selector.matchLabels").replace("spec.targetServices", "spec.targetRefs")
}

/// The stand-in for a DENY or CUSTOM policy that cannot be used at all:
/// DENY everything its selector (or targets, or else namespace) covers,
/// read from the raw spec as far as it can be. `None` for other actions.
fn fail_closed_authz(meta: &Meta<'_>, spec: &Value) -> Option<state::AuthorizationPolicy> {
    // Istio's default action is ALLOW.
    let action = spec.get("action").map_or(Some("ALLOW"), Value::as_str);
    if action == Some("ALLOW") {
        return fail_closed_allow(meta, spec);
    }
    if !matches!(action, Some("DENY" | "CUSTOM")) {
        return None;
    }
    let targets: Option<Vec<String>> = spec
        .get("targetRefs")
        .and_then(Value::as_array)
        .map(|rs| rs.iter().collect::<Vec<_>>())
        .or_else(|| spec.get("targetRef").map(|r| vec![r]))
        .map(|rs| rs.iter().filter(|r| r.get("kind").and_then(Value::as_str) == Some("Service")).filter_map(|r| r.get("name")?.as_str().map(str::to_owned)).collect());
    // Targets that are not all Services: the whole namespace.
    let all_services = spec.get("targetRefs").and_then(Value::as_array).is_none_or(|rs| rs.iter().all(|r| r.get("kind").and_then(Value::as_str) == Some("Service")));
    let targets = targets.filter(|t| !t.is_empty() && all_services);
    let selector = raw_selector(spec).filter(|_| targets.is_none());
    Some(state::AuthorizationPolicy {
        name: meta.name.to_owned(),
        namespace: meta.namespace.to_owned(),
        selector,
        action: AuthzAction::Deny,
        rules: vec![state::AuthzRule::default()],
        ignore_path_case: false,
        target_services: targets,
        refused: Some("the policy cannot be used as written, so it denies everything it selects".into()),
    })
}

/// An ALLOW policy that cannot be read: it allows nothing, so the
/// workloads it selects (read from the raw object as far as it goes; a
/// selector that cannot be read: the whole namespace) deny what no other
/// ALLOW policy allows, as its mere presence makes them do in Istio. Not
/// for a policy that targets something other than Services (a gateway or
/// waypoint policy is not about this mesh's pods).
fn fail_closed_allow(meta: &Meta<'_>, spec: &Value) -> Option<state::AuthorizationPolicy> {
    let refs: Vec<&Value> = match (spec.get("targetRefs"), spec.get("targetRef")) {
        (Some(Value::Array(rs)), _) => rs.iter().collect(),
        (None, Some(r)) => vec![r],
        (None, None) => Vec::new(),
        _ => return None,
    };
    if !refs.iter().all(|r| r.get("kind").and_then(Value::as_str) == Some("Service")) {
        return None;
    }
    let targets: Vec<String> = refs.iter().filter_map(|r| r.get("name")?.as_str().map(str::to_owned)).collect();
    if targets.len() != refs.len() {
        return None;
    }
    let targets = Some(targets).filter(|t| !t.is_empty());
    Some(state::AuthorizationPolicy {
        name: meta.name.to_owned(),
        namespace: meta.namespace.to_owned(),
        selector: raw_selector(spec).filter(|_| targets.is_none()),
        action: AuthzAction::Allow,
        rules: Vec::new(),
        ignore_path_case: false,
        target_services: targets,
        refused: Some("the ALLOW policy cannot be used as written, so it allows nothing: what it selects is denied unless another policy allows it".into()),
    })
}

/// `selector.matchLabels` if it is a map of strings; else `None`
/// (namespace-wide, the wider reading).
fn raw_selector(spec: &Value) -> Option<Labels> {
    let m = spec.get("selector")?.get("matchLabels")?.as_object()?;
    let labels: Option<Labels> = m.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect();
    labels.filter(|l| !l.is_empty())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthenticationSpec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Mtls {
    #[serde(default)]
    mode: Option<PeerAuthMode>,
}

pub fn peer_authentication(meta: &Meta<'_>, spec: &Value) -> Result<Converted, Refused> {
    let parsed: Result<PeerAuthenticationSpec, Refused> = read(spec);
    parsed.and_then(|s| convert_peer_auth(meta, &s)).map_err(|mut r| {
        r.stand_in = fail_closed_peer_auth(meta, spec).map(|p| Box::new(Converted::PeerAuthentication(p)));
        r
    })
}

fn convert_peer_auth(meta: &Meta<'_>, s: &PeerAuthenticationSpec) -> Result<Converted, Refused> {
    let selector = selector_labels(&s.selector);
    let mut port_level = BTreeMap::new();
    if let Some(ports) = s.port_level_mtls.as_ref().filter(|p| !p.is_empty()) {
        if selector.is_none() {
            return Err(Refused::invalid("spec.portLevelMtls: needs a selector with matchLabels (Istio: port-level settings apply to selected workloads only)".into()));
        }
        for (port, m) in ports {
            let n = port.parse::<u16>().ok().filter(|&p| p != 0);
            let Some(n) = n else {
                return Err(Refused::invalid(format!("spec.portLevelMtls.{port}: {port:?} is not a port (1-65535)")));
            };
            port_level.insert(n, m.mode.unwrap_or(PeerAuthMode::Unset));
        }
    }
    Ok(Converted::PeerAuthentication(state::PeerAuthentication {
        name: meta.name.to_owned(),
        namespace: meta.namespace.to_owned(),
        selector,
        mode: s.mtls.as_ref().and_then(|m| m.mode).unwrap_or(PeerAuthMode::Unset),
        port_level,
    }))
}

/// A PeerAuthentication that cannot be used but says STRICT anywhere stays
/// STRICT for what it selects: refusing it must not accept plaintext.
fn fail_closed_peer_auth(meta: &Meta<'_>, spec: &Value) -> Option<state::PeerAuthentication> {
    let strict = |m: Option<&Value>| m.and_then(|m| m.get("mode")).and_then(Value::as_str) == Some("STRICT");
    let ports_strict = spec.get("portLevelMtls").and_then(Value::as_object).is_some_and(|m| m.values().any(|v| strict(Some(v))));
    if !strict(spec.get("mtls")) && !ports_strict {
        return None;
    }
    Some(state::PeerAuthentication {
        name: meta.name.to_owned(),
        namespace: meta.namespace.to_owned(),
        selector: raw_selector(spec),
        mode: PeerAuthMode::Strict,
        port_level: BTreeMap::new(),
    })
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}
