//! HTTP routing: the config schema of `httpRoutes`, its validation, and pure
//! route selection, applied by the **source** workload's agent. No I/O; the
//! proxy calls [`RouteTable::select`] per HTTP request to a service and then
//! picks an endpoint among the pods the selected [`Backend`] covers.
//!
//! # Using it
//!
//! ```text
//! on each new state snapshot:  routes = RouteTable::from_state(&state)
//! per HTTP request to a service (ns, name):
//!                              path = policy::normalize_path(target)?      -> 400 on Err
//!                              req = RequestView { method, path: path.path(), query, headers, client_namespace, port }
//!                              sel = routes.select(ns, name, &req, rand_below_100)
//!   NoRoute:                   no route or no rule matched: any endpoint, default_retry_policy(), no timeout
//!   Unmatched:                 Gateway API routes attached (or an Istio VirtualService), no rule matched: 404
//!   Rule(sel):                 sel.rule.filters (redirect: answer; mirror, rewrite, headers), then
//!                              endpoints = the backend's service (sel.backend.service, else this one)
//!                              filtered by sel.backend.selects(&pod.labels); no backend or an invalid one: 500
//!                              whole request bounded by sel.timeout (504 on expiry),
//!                              retries by sel.retry (see RetryPolicy)
//! per service, for limits:     routes.service_policy(ns, name) -> circuit breaker, outlier detection
//! ```
//!
//! # Two forms, one model
//!
//! Gateway API `HTTPRoute` / `GRPCRoute` objects attached to a Service
//! ([`gateway`], from the cluster or the local file) and the local file's
//! `httpRoutes` become the same [`HttpRoute`]s. Gateway API routes carry an
//! [`Attachment`]: several may attach to one service, consumer routes apply
//! to their own namespace's clients only, and their matches rank by the
//! HTTPRoute spec's precedence across routes ([`RouteTable::select`]); when
//! any applies to a request, the service's `httpRoutes` rules do not (its
//! service-level settings still do). The rest of this doc is the
//! `httpRoutes` form.
//!
//! # Schema (`httpRoutes` in the local file)
//!
//! ```yaml
//! httpRoutes:
//!   - name: web-canary
//!     namespace: shop
//!     service: web                 # a service of this namespace with an HTTP port
//!     rules:                       # ordered; the first matching rule wins
//!       - matches:                 # any entry; inside an entry, every set part
//!           - headers: [{name: x-canary, exact: "1"}]
//!           - cookies: [{name: group, exact: beta}]
//!         backends: [{subset: {version: v2}}]
//!       - matches: [{path: {prefix: /api}, method: GET}]
//!         backends:
//!           - {subset: {version: v1}, weight: 90}
//!           - {subset: {version: v2}, weight: 10}
//!         timeout: 2s
//!         retries: {attempts: 3, perTryTimeout: 500ms, retryOn: [connect-failure, reset, 503, 502]}
//!       - backends: [{}]           # no matches: matches everything; no subset: every endpoint
//!     circuitBreaker: {maxConnections: 100, maxPendingRequests: 50, maxRequests: 200}
//!     outlierDetection: {consecutive5xx: 3, baseEjectionTime: 10s}
//!     loadBalancer: roundRobin      # or leastRequest (the default)
//! ```
//!
//! # Semantics and the choices made
//!
//! - **One route per service**: at most one `HttpRoute` names a given
//!   service, so the service-level settings (`circuitBreaker`,
//!   `outlierDetection`) have a single source. A second one is refused
//!   rather than merged (Istio's VirtualService merging is order-dependent).
//! - **Rules** are tried in order; the first whose `matches` succeed wins.
//!   A rule without `matches` matches every request. When no rule matches,
//!   [`RouteTable::select`] returns `None` and the request goes to any
//!   endpoint of the service, as without a route.
//! - **Matches**: a rule matches when any entry of `matches` does; an entry
//!   matches when every part it sets does (`path`, `method`, all `headers`,
//!   all `cookies`). The empty entry `{}` matches everything. A set but empty
//!   list (`matches: []`, `headers: []`, ...) is refused: "nothing" and
//!   "anything" are both plausible readings.
//! - **Paths** are matched on the normalized path (see
//!   [`crate::policy::normalize_path`]) without the query; anything from a
//!   `?` on is ignored. `exact` compares the whole path. `prefix` matches
//!   whole segments (Gateway API `PathPrefix`): `/api` matches `/api` and
//!   `/api/x` but not `/apix`; a trailing `/` in the prefix is ignored and
//!   `/` matches every path. Both are case-sensitive, must start with `/`
//!   and must already be in normalized form (a path such as `/a//b` could
//!   never match a normalized request, so it is refused rather than ignored).
//! - **Methods** are compared without ASCII case, as in [`crate::policy`].
//! - **Headers**: names without case; exactly one of `exact`, `prefix`
//!   (case-sensitive, on the value as sent) or `present` (`true`: the header
//!   is there, whatever its value; `false`: it is absent). A header sent
//!   several times matches when any of its values does.
//! - **Cookies**: `{name, exact}`, read from every `cookie` header
//!   (`a=1; b=2`, several headers allowed, whitespace around pairs ignored,
//!   a value in double quotes compared without them). A cookie sent several
//!   times matches when any occurrence does.
//! - **Backends** are weighted: several backends each need a `weight`, and
//!   the weights must add up to exactly 100 (a weight may be 0, to keep a
//!   subset declared but idle). A single backend may omit its weight (it
//!   gets 100). The choice uses the caller's random number `rand % 100`
//!   against cumulative weights, so 90/10 over the values 0..100 is exactly
//!   90/10 and tests are deterministic. `subset` is the pod labels a backend
//!   covers, on top of the service's selector; without it, every endpoint.
//!   A subset must not be empty. Whether a subset selects any pod is *not*
//!   validated: pods come and go; the proxy answers 503 when a backend has
//!   no endpoint.
//! - **Durations** are strings: an integer followed by `ms`, `s`, `m` or
//!   `h` (`250ms`, `2s`). Timeouts must be positive.
//! - **Timeout** (per rule): bounds the whole request, retries and backoff
//!   included; 504 on expiry. Default: none (the request may take as long
//!   as the backend does, as in Istio).
//! - **Retries** (per rule, defaults from [`RetryPolicy::default`]):
//!   `attempts: 2` retries after the first try (so 3 tries at most; `0`
//!   disables retries; at most 10), `perTryTimeout` none, `retryOn:
//!   [connect-failure, reset, 503]` (also any status code 100-599), only
//!   for idempotent methods ([`is_idempotent`]) unless `allMethods: true`,
//!   `budgetPercent: 20` (retries in flight may be at most that share of
//!   the requests in flight, with at least [`MIN_RETRY_CONCURRENCY`]
//!   allowed), backoff with full jitter between `baseBackoff: 25ms` and
//!   `maxBackoff: 250ms`. A rule without `retries` gets all the defaults;
//!   so does a request that matches no rule ([`default_retry_policy`]).
//! - **Load balancing** (per service, per agent): `leastRequest` (default:
//!   of two endpoints picked at random, the one with fewer requests in
//!   flight from this agent) or `roundRobin` (each endpoint in turn).
//!   Ejected endpoints are skipped by both; a retry prefers an endpoint not
//!   tried yet. Services without a route, and L4 connections, use
//!   `leastRequest`.
//! - **Circuit breaker** (per service, per agent, [`CircuitBreaker::default`]):
//!   `maxConnections: 1024`, `maxPendingRequests: 1024`, `maxRequests:
//!   1024` (Envoy's defaults); each at least 1; excess fails fast with 503.
//! - **Outlier detection** (per service, per agent,
//!   [`OutlierDetection::default`]): `consecutive5xx: 5`,
//!   `consecutiveConnectFailures: 5` (0 disables either), `baseEjectionTime:
//!   30s`, growing linearly with the number of times the endpoint was
//!   ejected, capped at `maxEjectionTime: 300s`; `maxEjectionPercent: 50`,
//!   but at least one and never all endpoints (see
//!   [`OutlierDetection::max_ejected`]).
//! - **Errors** name the field relative to the route (`rules[1].backends`),
//!   so each source prefixes its own location; the local file reports e.g.
//!   `httpRoutes[0].rules[1].backends: weights add up to 90, not 100`. An
//!   invalid route rejects the whole edit: the previous state keeps serving.

pub mod gateway;
pub mod istio;
mod table;
mod validate;

/// The route schema lives beside the state it is part of
/// ([`crate::state::route`]); this module gives it its meaning.
pub use crate::state::route::*;
pub use table::{RequestView, RouteTable, Selected, Selection, ServicePolicy, parse_cookies};
pub use validate::{InvalidRoute, validate};

#[cfg(test)]
mod tests;
