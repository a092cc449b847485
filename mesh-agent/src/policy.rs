//! Authorization policy: pure evaluation of Istio-`AuthorizationPolicy`-like
//! rules, applied by the **destination** workload's agent. No I/O; the proxy
//! calls it per HTTP request, or per connection for non-HTTP traffic.
//!
//! # Using it
//!
//! ```text
//! on each new state snapshot:  authz = Authorizer::from_state(&state)        // compiles all policies
//!   per local workload:        wp = authz.for_workload(&pod.key.namespace, &pod.labels)  // indexes its rules
//! per inbound connection:      peer = tunnel identity.map(Peer::new)          // None for plaintext
//!                              conn = Connection { peer: peer.as_ref(), port: target port }
//!   non-HTTP:                  wp.check_connection(&conn)      -> close it if !allowed
//!   HTTP, per request:         path = normalize_path(target)?  -> 400 on Err
//!                              wp.check_http(&conn, &Request { method, path: &path, host, headers })
//!                              -> 403 naming `decision.policy` if !allowed,
//!                                 else forward with the target set to `path.as_str()`
//! ```
//!
//! For HTTP traffic call only [`WorkloadPolicy::check_http`], not also
//! `check_connection`: the L4 check applies DENY rules' HTTP conditions as if
//! they matched (below), so it would refuse connections that only some
//! requests should be refused on. [`WorkloadPolicy::uses_http_attributes`]
//! says when the per-connection decision is also every request's.
//!
//! # Semantics (Istio's, with the choices Istio leaves open made explicit)
//!
//! - **Selection**: a policy applies to the workloads of its namespace that
//!   its `selector` labels match, or that its `target_services` select
//!   (Istio `targetRefs` of kind Service); without either, to every workload
//!   of the namespace. A policy of the root namespace (`--root-namespace`,
//!   Istio's `istio-system`) selects in every namespace (by labels; its
//!   Service targets only in its own). An empty selector is refused
//!   (ambiguous; Istio's empty `matchLabels` is converted to none).
//! - **Order**: DENY policies first: if any matches, the request is denied,
//!   naming the first matching policy in config order. Then, if any ALLOW
//!   policy selects the workload, the request must match one of them, else it
//!   is denied by default ("no ALLOW policy matched"). With no ALLOW policy
//!   selecting the workload, it is allowed. AUDIT policies never change the
//!   decision: the first that matches is reported with it
//!   ([`Decision::audit`]).
//! - **Rules**: a policy matches when any of its rules does; an ALLOW policy
//!   with no rules therefore matches nothing (it only switches the workload
//!   to default-deny), and the empty rule `{}` matches everything. A rule
//!   matches when all the parts it sets match: any `from` entry, any `to`
//!   entry, and *all* `when` conditions. Within an entry, all set fields must
//!   match; within a field's list, any item. A set but empty list is refused
//!   (nothing or anything?), so "not set" is the only way to say "any".
//! - **Sources** come from the peer's verified SPIFFE ID
//!   (`spiffe://<td>/ns/<ns>/sa/<sa>`): `principals` compare the whole URI,
//!   `namespaces` its namespace. A **plaintext** peer has neither:
//!   `principals`/`namespaces` never match it and `notPrincipals`/
//!   `notNamespaces` always do. `principals: ["*"]` thus means "any mTLS
//!   peer".
//! - **Wildcards** (principals, namespaces, hosts, paths, header values):
//!   `*` alone, or one `*` at the start (suffix match) or at the end (prefix
//!   match). Principals must be `*`, a valid SPIFFE ID, `spiffe://...*` or
//!   `*...`.
//! - **Case**: principals, namespaces, paths and header values are
//!   case-sensitive (paths as in Istio; `ignorePathCase: true` on a policy
//!   compares its `paths`/`notPaths` without ASCII case, for backends that
//!   route without case, where `/ADMIN` would otherwise escape a DENY on
//!   `/admin`). Hosts are compared without case, without the port and
//!   without a trailing dot. **Methods are compared without case**, unlike
//!   Istio: it is the safe reading both ways (a DENY on `DELETE` also stops
//!   `delete`, which some servers route as DELETE; an ALLOW on `GET` lets
//!   `get` through to a server that treats it as GET or refuses it).
//! - **Paths**: an exact pattern does not match with a trailing slash
//!   (`/admin` is not `/admin/`); to cover a subtree write both `/admin` and
//!   `/admin/*` (the prefix `/admin/` matches `/admin/` itself). Patterns must
//!   be written in normalized form, or validation refuses them (they could
//!   never match).
//! - **Headers** (`when: [{header, values, notValues}]`): names without case.
//!   Each value of a repeated header is compared on its own: `values` needs
//!   one to match, `notValues` needs none to (joining them with ',' as Envoy
//!   does would let `x: bad` + `x: ok` slip past a DENY on `bad`). An absent
//!   header matches `notValues` only. A condition needs at least one of the
//!   two lists.
//! - **Ports** are the workload's own (target) ports.
//! - **Addresses** (`ipBlocks`, `remoteIpBlocks` and their `not*` forms,
//!   conditions on `source.ip`, `remote.ip`, `destination.ip`): IPs or
//!   CIDRs, against the peer's address (the source pod's over the tunnel,
//!   the client's for plaintext; no proxy protocol or `X-Forwarded-For` is
//!   trusted, so `remote` is the peer) and the workload address the
//!   connection came to. Known at L4 too, as are the conditions on
//!   `source.namespace`, `source.principal` and `destination.port`.
//! - **L4** (non-HTTP traffic, checked at connection time): only the peer
//!   identity, namespace and port are known. A field that needs HTTP
//!   (`methods`, `paths`, `hosts`, their `not*`, `when` headers) evaluates to
//!   *false* in an ALLOW policy (its entry cannot allow a TCP connection) and
//!   to *true* in a DENY policy, so a DENY rule is enforced on TCP as if its
//!   HTTP conditions matched: L4 enforcement may deny more than HTTP would,
//!   never less (the stance Istio's ztunnel takes on L7 attributes it
//!   cannot see). Hence a DENY on `/admin` alone denies every TCP connection
//!   to the workloads it selects: scope such policies to HTTP workloads.
//! - **Invalid policies**: sources validate before publishing (the local file
//!   rejects the whole edit and keeps the last good state). A policy that
//!   still reaches [`Authorizer::new`] unvalidated is replaced by a DENY of
//!   everything it selects ([`Reason::InvalidPolicy`]), never dropped: a lost
//!   DENY, or a lost last ALLOW, would open access. A source's fail-closed
//!   stand-in for a refused object (`refused` set, see
//!   [`crate::objects::istio`]) decides with the same reason.
//!
//! # Path normalization ([`normalize_path`])
//!
//! The path a policy sees is the path the application gets: the caller
//! forwards [`NormalizedPath::as_str`]. In order:
//!
//! 1. The target must be origin-form (`/...`); `*`, absolute-form and
//!    anything else is refused. Bytes outside visible ASCII (controls,
//!    space, DEL, non-ASCII) and a fragment (`#`) are refused anywhere.
//! 2. The query (after the first `?`) is kept verbatim and never matched.
//! 3. In the path, `;` is refused: backends disagree on path parameters
//!    (Tomcat and Spring strip `;...` from each segment and read `..;` as
//!    `..`), so no single reading of `/admin;x` or `/public/..;/admin` is
//!    safe. Clients that use `;jsessionid=` get 400.
//! 4. Percent-escapes must be `%` + two hex digits. **`%2F` and `%5C` (any
//!    case) are refused** (Istio's `REJECT` option): whether they separate
//!    segments depends on the backend, so neither decoding nor keeping them
//!    is safe for every app. Encoded controls (`%00`-`%1F`, `%7F`) are refused
//!    (`/admin%00.png`). Escapes of unreserved characters (letters, digits,
//!    `-._~`) are decoded; other escapes stay, with upper-case hex. Decoding
//!    is done once: `%252F` stays `%252F`.
//! 5. `\` becomes `/`; repeated slashes merge; `.` and `..` segments are
//!    resolved, never above the root (`/../a` is `/a`). A trailing slash is
//!    kept.
//!
//! Result: `/admin`, `//admin`, `/./admin`, `/x/../admin`, `/%61dmin`,
//! `/%2e/admin`, `/\admin` all become `/admin`; `/admin%2F`, `/admin%2fx`,
//! `/admin;x`, `/admin#x`, `\admin` are refused. Normalization is idempotent.
//!
//! # Speed
//!
//! [`Authorizer`] compiles each policy once per snapshot (patterns parsed,
//! hosts and methods case-folded); [`Authorizer::for_workload`] files the
//! rules that select a workload into an index (`index.rs`: by principal,
//! path, host, namespace, port, header presence or method, whichever the
//! rule cannot match without). Per request that is about a dozen hash
//! probes, then only the rules filed under the request's own values are
//! evaluated, with no allocation (a lower-case method is the exception).
//! Rules that constrain none of these (only negations, or `*`) are evaluated
//! on every request: each costs about what one rule of a linear scan costs
//! (~15 ns), so a config with hundreds of them pays for it; the benchmark
//! (`benches/policy.rs`) measures both.

use std::{borrow::Cow, collections::HashMap, fmt, net::IpAddr, sync::Arc};

use http::HeaderMap;

use crate::{
    spiffe::SpiffeId,
    state::{AuthorizationPolicy, AuthzAction, Labels, MeshState, Selector, Service},
};

mod index;
mod path;
mod pattern;
mod rule;

use index::{Index, Mode};
pub use path::{NormalizedPath, PathError, normalize_path};
pub use rule::InvalidPolicy;
use rule::{CompiledPolicy, Ctx, HttpCtx};

/// Checks a policy as every config source must before publishing it.
pub fn validate(policy: &AuthorizationPolicy) -> Result<(), InvalidPolicy> {
    rule::compile(policy).map(drop)
}

/// The verified identity of a peer, prepared once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    principal: Box<str>,
    namespace: Box<str>,
}

impl Peer {
    pub fn new(id: &SpiffeId) -> Self {
        Self {
            principal: id.to_string().into(),
            namespace: id.namespace().into(),
        }
    }

    pub fn principal(&self) -> &str {
        &self.principal
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl From<&SpiffeId> for Peer {
    fn from(id: &SpiffeId) -> Self {
        Self::new(id)
    }
}

/// What is known of a connection: who (`None`: plaintext, unauthenticated),
/// from which address, and to which of the workload's addresses and ports.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub peer: Option<&'a Peer>,
    pub port: u16,
    /// The peer's address: the source pod's over the tunnel, the client's
    /// for plaintext (`ipBlocks`, `source.ip`, `remote.ip`).
    pub source: IpAddr,
    /// The workload's address the connection is for (`destination.ip`).
    pub destination: IpAddr,
}

/// One HTTP request, as the proxy will forward it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a NormalizedPath<'a>,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1), as received; the port and
    /// a trailing dot are ignored. The proxy must refuse a request whose
    /// `Host` and `:authority` disagree, or policies see one and the app the
    /// other.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// Why a decision came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched.
    DenyMatched,
    /// An ALLOW policy matched (and no DENY did).
    AllowMatched,
    /// ALLOW policies select the workload and none matched: default deny.
    NoAllowMatched,
    /// No DENY matched and no ALLOW policy selects the workload.
    NoAllowPolicy,
    /// The policy did not compile, or a source refused it and keeps it as a
    /// DENY that fails closed.
    InvalidPolicy,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DenyMatched => "a DENY policy matched",
            Self::AllowMatched => "an ALLOW policy matched",
            Self::NoAllowMatched => {
                "no ALLOW policy matched (ALLOW policies select this workload, so anything they do not allow is denied)"
            }
            Self::NoAllowPolicy => "no policy denies it and no ALLOW policy selects this workload",
            Self::InvalidPolicy => "the policy is invalid or unsupported, so it fails closed and denies until it is fixed",
        })
    }
}

/// The outcome of a check. `policy` (`namespace/name`) borrows from the
/// [`WorkloadPolicy`] so that a check allocates nothing; `to_owned()` it to
/// keep it. `audit` is the first AUDIT policy that matched, whatever the
/// decision: AUDIT never changes it, it is reported with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    pub policy: Option<&'a str>,
    pub reason: Reason,
    pub audit: Option<&'a str>,
}

/// "allowed by shop/get-only: an ALLOW policy matched", or "denied: no ALLOW
/// policy matched (...)": short enough for a 403 body and a log line.
impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "allowed" } else { "denied" })?;
        if let Some(p) = self.policy {
            write!(f, " by {p}")?;
        }
        write!(f, ": {}", self.reason)?;
        if let Some(a) = self.audit {
            write!(f, " (audited by {a})")?;
        }
        Ok(())
    }
}

/// Every policy of a snapshot, compiled, by namespace.
#[derive(Debug)]
pub struct Authorizer {
    by_namespace: HashMap<Box<str>, Vec<Arc<CompiledPolicy>>>,
    invalid: Vec<(String, InvalidPolicy)>,
    /// Its policies select workloads of every namespace (Istio's root
    /// namespace, `--root-namespace`).
    root_namespace: Box<str>,
}

impl Default for Authorizer {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Authorizer {
    pub fn from_state(state: &MeshState) -> Self {
        Self::build(&state.authorization_policies, &state.root_namespace, &state.services)
    }

    /// Compiles `policies` (config order is kept: decisions name the first
    /// match), with Istio's default root namespace. Invalid ones become
    /// DENY-all stand-ins, see the module doc.
    pub fn new(policies: &[AuthorizationPolicy]) -> Self {
        Self::build(policies, crate::state::DEFAULT_ROOT_NAMESPACE, &[])
    }

    /// `services` resolve the policies' `target_services` (to the pods the
    /// services select, in the policy's namespace).
    pub fn build(policies: &[AuthorizationPolicy], root_namespace: &str, services: &[Service]) -> Self {
        let mut me = Self { by_namespace: HashMap::new(), invalid: Vec::new(), root_namespace: root_namespace.into() };
        for p in policies {
            let mut compiled = rule::compile(p).unwrap_or_else(|e| {
                me.invalid.push((format!("{}/{}", p.namespace, p.name), e));
                rule::deny_all(p)
            });
            if let Some(names) = &p.target_services {
                let selectors = services
                    .iter()
                    .filter(|s| s.namespace == p.namespace && names.contains(&s.name) && !s.selector.is_empty())
                    .map(|s| s.selector.clone());
                compiled.services = Some(selectors.collect());
            }
            me.by_namespace
                .entry(p.namespace.as_str().into())
                .or_default()
                .push(Arc::new(compiled));
        }
        me
    }

    /// Policies that did not compile (`namespace/name`, why), for status.
    pub fn invalid(&self) -> &[(String, InvalidPolicy)] {
        &self.invalid
    }

    /// The policies that select one workload, indexed: the root namespace's
    /// (mesh-wide) first, then its namespace's. Build it once per workload
    /// and snapshot, not per request.
    pub fn for_workload(&self, namespace: &str, labels: &Labels) -> WorkloadPolicy {
        let root = (namespace != &*self.root_namespace).then(|| self.by_namespace.get(&*self.root_namespace)).flatten();
        let selects = |p: &CompiledPolicy| p.selector.as_ref().is_none_or(|s| Selector(s).matches(labels));
        // A Service selects pods of its own namespace only.
        let by_service = |p: &CompiledPolicy| p.services.as_ref().is_none_or(|ss| ss.iter().any(|s| Selector(s).matches(labels)));
        let policies: Vec<Arc<CompiledPolicy>> = root
            .into_iter()
            .flatten()
            .filter(|p| p.services.is_none())
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .filter(|p| selects(p) && by_service(p))
            .cloned()
            .collect();
        WorkloadPolicy::new(policies)
    }
}

/// The policies of one workload, ready for per-request checks.
#[derive(Debug)]
pub struct WorkloadPolicy {
    policies: Vec<Arc<CompiledPolicy>>,
    /// Every rule in config order: (policy index, rule index). A rule's id
    /// in the indexes is its position here.
    rules: Vec<(u32, u32)>,
    http: Index,
    l4: Index,
    has_allow: bool,
    has_audit: bool,
    uses_http: bool,
}

impl WorkloadPolicy {
    fn new(policies: Vec<Arc<CompiledPolicy>>) -> Self {
        let rules: Vec<(u32, u32)> = policies
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| (0..p.rules.len()).map(move |ri| (pi as u32, ri as u32)))
            .collect();
        let iter = || {
            rules
                .iter()
                .map(|&(p, r)| (&policies[p as usize].rules[r as usize], policies[p as usize].action))
        };
        let http = Index::build(iter(), Mode::Http);
        let l4 = Index::build(iter(), Mode::L4);
        let has_allow = policies.iter().any(|p| p.action == AuthzAction::Allow);
        let has_audit = policies.iter().any(|p| p.action == AuthzAction::Audit);
        let uses_http = iter().any(|(r, _)| r.has_http_fields());
        Self {
            policies,
            rules,
            http,
            l4,
            has_allow,
            has_audit,
            uses_http,
        }
    }

    /// Whether no policy selects the workload (every check allows).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// How many rules the selected policies hold.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether any rule looks at HTTP attributes. When not, the connection's
    /// decision is every request's, and HTTP needs no per-request check.
    pub fn uses_http_attributes(&self) -> bool {
        self.uses_http
    }

    /// The check for one HTTP request on `conn`.
    pub fn check_http(&self, conn: &Connection<'_>, req: &Request<'_>) -> Decision<'_> {
        // Methods are compared without case; rules hold them upper case.
        // Only an odd client sends lower case, so only it pays a copy.
        let method: Cow<'_, str> = if req.method.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(req.method.to_ascii_uppercase())
        } else {
            Cow::Borrowed(req.method)
        };
        let ctx = Ctx {
            peer: conn.peer,
            port: conn.port,
            source: conn.source.to_canonical(),
            destination: conn.destination.to_canonical(),
            http: Some(HttpCtx {
                method: &method,
                path: req.path.path(),
                host: host_for_match(req.host),
                headers: req.headers,
            }),
        };
        self.evaluate(&self.http, &ctx)
    }

    /// The check for a non-HTTP connection, at connection time.
    pub fn check_connection(&self, conn: &Connection<'_>) -> Decision<'_> {
        let ctx = Ctx {
            peer: conn.peer,
            port: conn.port,
            source: conn.source.to_canonical(),
            destination: conn.destination.to_canonical(),
            http: None,
        };
        self.evaluate(&self.l4, &ctx)
    }

    fn evaluate(&self, index: &Index, ctx: &Ctx<'_>) -> Decision<'_> {
        const NONE: u32 = u32::MAX;
        let (mut deny, mut allow, mut audit) = (NONE, NONE, NONE);
        if !self.rules.is_empty() {
            index.candidates(ctx, |bucket| {
                // AUDIT first and on its own: it never changes the decision,
                // so finding a DENY must not stop it.
                if self.has_audit {
                    for &id in &bucket.audit {
                        if id >= audit {
                            break;
                        }
                        if self.rule(id).matches(ctx, AuthzAction::Audit) {
                            audit = id;
                            break;
                        }
                    }
                }
                // Lists are ascending: the first match is the bucket's
                // earliest, and a later one cannot beat the best so far.
                for &id in &bucket.deny {
                    if id >= deny {
                        break;
                    }
                    if self.rule(id).matches(ctx, AuthzAction::Deny) {
                        deny = id;
                        break;
                    }
                }
                if deny != NONE {
                    return;
                }
                for &id in &bucket.allow {
                    if id >= allow {
                        break;
                    }
                    if self.rule(id).matches(ctx, AuthzAction::Allow) {
                        allow = id;
                        break;
                    }
                }
            });
        }
        let audit = (audit != NONE).then(|| &*self.policy_of(audit).id);
        let decide = |allowed, policy, reason| Decision { allowed, policy, reason, audit };
        if deny != NONE {
            let p = self.policy_of(deny);
            let reason = if p.invalid {
                Reason::InvalidPolicy
            } else {
                Reason::DenyMatched
            };
            return decide(false, Some(&p.id), reason);
        }
        if allow != NONE {
            return decide(true, Some(&self.policy_of(allow).id), Reason::AllowMatched);
        }
        if self.has_allow {
            return decide(false, None, Reason::NoAllowMatched);
        }
        decide(true, None, Reason::NoAllowPolicy)
    }

    fn rule(&self, id: u32) -> &rule::Rule {
        let (p, r) = self.rules[id as usize];
        &self.policies[p as usize].rules[r as usize]
    }

    fn policy_of(&self, id: u32) -> &CompiledPolicy {
        &self.policies[self.rules[id as usize].0 as usize]
    }
}

/// The host as hosts are matched: no port (`[v6]:port` too), no trailing
/// dot. Case is left to the comparison.
fn host_for_match(host: &str) -> &str {
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests;
