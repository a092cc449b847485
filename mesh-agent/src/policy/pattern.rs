//! String patterns of policies (`*`, exact, `prefix*`, `*suffix`) and the
//! per-field syntax checks, shared by validation and compilation so that a
//! policy that validates always compiles to the same matcher.

use http::HeaderName;

use crate::spiffe::SpiffeId;

use super::path::normalize_path;

/// One pattern. Case folding, where a field asks for it, happened at compile
/// time on the pattern; the request side is compared with
/// [`eq_ignore_ascii_case`](slice::eq_ignore_ascii_case), so no per-request
/// allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    /// `*` alone, or one `*` at the start or at the end, never both.
    fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        let stars = s.bytes().filter(|&b| b == b'*').count();
        let p = match (s.strip_prefix('*'), s.strip_suffix('*')) {
            (_, _) if stars == 0 => Self::Exact(s.into()),
            (Some(rest), None) if stars == 1 => Self::Suffix(rest.into()),
            (None, Some(rest)) if stars == 1 => Self::Prefix(rest.into()),
            _ => {
                return Err(format!(
                    "{s:?}: '*' is allowed only alone, or once at the start or at the end"
                ));
            }
        };
        Ok(p)
    }

    /// The part that is compared literally (empty for `*`).
    pub(crate) fn fixed(&self) -> &str {
        match self {
            Self::Any => "",
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) => s,
        }
    }

    #[inline]
    pub(crate) fn matches(&self, s: &[u8], fold_case: bool) -> bool {
        let eq = |a: &[u8], b: &[u8]| if fold_case { a.eq_ignore_ascii_case(b) } else { a == b };
        match self {
            Self::Any => true,
            Self::Exact(p) => eq(s, p.as_bytes()),
            Self::Prefix(p) => s.len() >= p.len() && eq(&s[..p.len()], p.as_bytes()),
            Self::Suffix(p) => s.len() >= p.len() && eq(&s[s.len() - p.len()..], p.as_bytes()),
        }
    }

    fn lowercase(self) -> Self {
        match self {
            Self::Any => Self::Any,
            Self::Exact(s) => Self::Exact(s.to_ascii_lowercase().into()),
            Self::Prefix(s) => Self::Prefix(s.to_ascii_lowercase().into()),
            Self::Suffix(s) => Self::Suffix(s.to_ascii_lowercase().into()),
        }
    }
}

/// A list of patterns: matches when any one does.
#[derive(Clone, Debug)]
pub(crate) struct Patterns {
    pub(crate) list: Box<[Pattern]>,
    pub(crate) fold_case: bool,
}

impl Patterns {
    pub(crate) fn any_matches(&self, s: &[u8]) -> bool {
        // Two loops so that each inlines `matches` with a constant.
        if self.fold_case {
            self.list.iter().any(|p| p.matches(s, true))
        } else {
            self.list.iter().any(|p| p.matches(s, false))
        }
    }
}

/// `*` (any authenticated peer), an exact SPIFFE ID, `spiffe://...*`, or
/// `*...`.
pub(crate) fn principal(s: &str) -> Result<Pattern, String> {
    let p = Pattern::parse(s)?;
    match &p {
        Pattern::Any => {}
        Pattern::Exact(id) => {
            id.parse::<SpiffeId>().map_err(|e| e.to_string())?;
        }
        Pattern::Prefix(pre) => {
            if !pre.starts_with("spiffe://") {
                return Err(format!("{s:?}: a principal prefix must start with \"spiffe://\""));
            }
        }
        Pattern::Suffix(suf) => {
            if suf.is_empty() {
                return Err(format!("{s:?}: the suffix after '*' is empty"));
            }
        }
    }
    if s.bytes().any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#') {
        return Err(format!("{s:?}: a SPIFFE ID has no spaces, controls, '?' or '#'"));
    }
    Ok(p)
}

/// A namespace name (DNS label), possibly with one leading or trailing `*`.
pub(crate) fn namespace(s: &str) -> Result<Pattern, String> {
    let p = Pattern::parse(s)?;
    let fixed = p.fixed();
    if !matches!(p, Pattern::Any) && fixed.is_empty() {
        return Err(format!("{s:?}: the part besides '*' is empty"));
    }
    if !fixed
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || fixed.len() > 63
    {
        return Err(format!(
            "{s:?} is not a namespace name (lower-case letters, digits and '-')"
        ));
    }
    Ok(p)
}

/// A host as in the `Host` header without its port: compared without case,
/// so stored lower case; `*.example.com` and `example.*` wildcards.
pub(crate) fn host(s: &str) -> Result<Pattern, String> {
    let p = Pattern::parse(s)?.lowercase();
    let fixed = p.fixed();
    if !matches!(p, Pattern::Any) && fixed.is_empty() {
        return Err(format!("{s:?}: the part besides '*' is empty"));
    }
    let bracketed = fixed.starts_with('[') && fixed.ends_with(']');
    if fixed.contains(':') && !bracketed {
        return Err(format!(
            "{s:?}: hosts are matched without their port: remove the \":port\""
        ));
    }
    let ok = |b: u8| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') || (bracketed && matches!(b, b':' | b'[' | b']'))
    };
    if !fixed.bytes().all(ok) {
        return Err(format!("{s:?} is not a host name"));
    }
    if fixed.ends_with('.') && matches!(p, Pattern::Exact(_) | Pattern::Suffix(_)) {
        return Err(format!("{s:?}: write the host without the trailing '.'"));
    }
    Ok(p)
}

/// An HTTP method: an RFC 9110 token, stored upper case (methods are
/// compared without case, see the module doc).
pub(crate) fn method(s: &str) -> Result<Box<str>, String> {
    if s.is_empty() || !s.bytes().all(is_tchar) {
        return Err(format!("{s:?} is not an HTTP method"));
    }
    Ok(s.to_ascii_uppercase().into())
}

/// A path pattern, written in the normalized form requests are compared in
/// (otherwise it could never match and a DENY would silently do nothing):
/// exact and prefix patterns start with '/', no query, no `//`, dot segments,
/// `\`, `;` or encoded characters other than upper-case `%XX` of reserved
/// ones.
pub(crate) fn path(s: &str, ignore_case: bool) -> Result<Pattern, String> {
    let p = Pattern::parse(s)?;
    let bad = |why: &str| Err(format!("{s:?}: {why}"));
    // Check the fixed part inside a full path, so partial segments at the
    // wildcard end are not mistaken for dot segments.
    let probe = match &p {
        Pattern::Any => return Ok(p),
        Pattern::Exact(f) | Pattern::Prefix(f) if !f.starts_with('/') => {
            return bad("a path must start with '/' (or with '*' for a suffix match)");
        }
        Pattern::Exact(f) => f.to_string(),
        Pattern::Prefix(f) => format!("{f}x"),
        Pattern::Suffix(f) if f.is_empty() => return bad("the suffix after '*' is empty"),
        Pattern::Suffix(f) => format!("/x{f}"),
    };
    if probe.contains('?') || probe.contains('#') {
        return bad("a path pattern cannot contain a query or fragment ('?', '#')");
    }
    match normalize_path(&probe) {
        Ok(n) if n.path() == probe => {}
        Ok(n) => {
            return bad(&format!(
                "it is not in normalized form (requests are normalized before matching, {probe:?} becomes {:?}), so it would never match",
                n.path()
            ));
        }
        Err(e) => return bad(&format!("requests like it are rejected before matching: {e}")),
    }
    Ok(if ignore_case { p.lowercase() } else { p })
}

pub(crate) fn port(p: u32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{p} is not a port (1-65535)")),
    }
}

pub(crate) fn header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("{s:?} is not an HTTP header name"))
}

pub(crate) fn header_value(s: &str) -> Result<Pattern, String> {
    if s.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!("{s:?}: header values have no control characters"));
    }
    Pattern::parse(s)
}

/// An IP address or CIDR block (`198.51.100.7`, `198.51.100.0/24`,
/// `2001:db8::/32`); a single address is its own /32 or /128. Host bits set
/// below the prefix are refused: `198.51.100.7/24` is probably a typo.
pub(crate) fn ip_block(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    let net: ipnet::IpNet = s.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
    if net.trunc() != net {
        return Err(format!("{s:?} has bits set past its prefix length (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

/// The condition keys of Istio's `when` that apply here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key<'a> {
    Header(&'a str),
    /// `source.ip` and `remote.ip`: without a proxy protocol or trusted
    /// `X-Forwarded-For`, the original client is the peer.
    SourceIp,
    DestinationIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

/// Parses a condition key; refuses Istio's keys that need what the mesh has
/// not (request authentication, SNI, Envoy filter metadata).
pub(crate) fn condition_key(key: &str) -> Result<Key<'_>, String> {
    if let Some(rest) = key.strip_prefix("request.headers[") {
        return match rest.strip_suffix(']') {
            Some(name) if !name.is_empty() => Ok(Key::Header(name)),
            _ => Err(format!("{key:?}: write request.headers[NAME]")),
        };
    }
    Ok(match key {
        "source.ip" | "remote.ip" => Key::SourceIp,
        "destination.ip" => Key::DestinationIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.port" => Key::DestinationPort,
        k if k.starts_with("request.auth.") => {
            return Err(format!("{k:?} is not supported: request authentication (JWT) is not implemented by this mesh"));
        }
        "connection.sni" => {
            return Err("\"connection.sni\" is not supported: the mesh tunnel carries no SNI and the agent does not terminate the workload's own TLS".into());
        }
        k if k.starts_with("experimental.") => return Err(format!("{k:?} is not supported: Envoy filter metadata does not exist here")),
        k => return Err(format!("{k:?} is not a condition key this mesh knows")),
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
        assert_eq!(Pattern::parse("/a*").unwrap(), Pattern::Prefix("/a".into()));
        assert_eq!(Pattern::parse("*.css").unwrap(), Pattern::Suffix(".css".into()));
        for bad in ["**", "*a*", "a*b", "/a**"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        let p = Pattern::parse("/Admin*").unwrap();
        assert!(p.matches(b"/Admin/x", false));
        assert!(!p.matches(b"/admin/x", false));
        assert!(p.lowercase().matches(b"/ADMIN/x", true));
        assert!(!Pattern::Suffix("/sa/admin".into()).matches(b"admin", false));
    }

    #[test]
    fn field_syntax() {
        assert!(principal("*").is_ok());
        assert!(principal("spiffe://cluster.local/ns/shop/sa/web").is_ok());
        assert!(principal("spiffe://cluster.local/ns/shop/*").is_ok());
        assert!(principal("*/sa/admin").is_ok());
        for bad in [
            "cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop",
            "spiffe://*/sa/x*",
            "http://x*",
            "**",
        ] {
            assert!(principal(bad).is_err(), "{bad}");
        }
        assert!(namespace("shop").is_ok() && namespace("shop-*").is_ok() && namespace("Shop").is_err());
        assert_eq!(host("*.Example.com").unwrap(), Pattern::Suffix(".example.com".into()));
        assert!(host("example.com:80").is_err() && host("[::1]").is_ok() && host("a b").is_err());
        assert_eq!(&*method("get").unwrap(), "GET");
        assert!(method("GET ").is_err() && method("").is_err());
        for ok in [
            "/",
            "/admin",
            "/admin/*",
            "/admin*",
            "*.css",
            "*/x",
            "/a%20b",
            "/.well-known/*",
            "/a/.*",
        ] {
            assert!(path(ok, false).is_ok(), "{ok}: {:?}", path(ok, false));
        }
        for bad in [
            "admin", "/a//b", "/a/../b", "/a/./b", "/a?x", "/a%2Fb", "/a%41", "/a%3a", "/a\\b", "/a;b", "*/../a",
        ] {
            assert!(path(bad, false).is_err(), "{bad}");
        }
        assert!(port(0).is_err() && port(65536).is_err() && port(65535).is_ok());
        assert!(header_name("x-user").is_ok() && header_name("x user").is_err());
    }
}
