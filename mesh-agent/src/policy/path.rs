//! Request-path normalization: the one spelling of a path that policies are
//! matched against and that is forwarded to the application. The rules and
//! the reasons for them are in the [`policy`](super) module doc.

use std::borrow::Cow;

/// Why a request target was refused (the caller answers 400). Offsets are
/// into the target as received; the target itself is left to the caller's
/// log, which knows how much of it is safe to print.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not a path (origin-form, starting with '/')")]
    NotOriginForm,
    #[error("byte 0x{byte:02x} at offset {at} is not allowed in a request target")]
    InvalidByte { byte: u8, at: usize },
    #[error("a fragment ('#') is not allowed in a request target")]
    Fragment,
    #[error("';' path parameters are refused: backends disagree on them (some strip them, some read `..;` as `..`)")]
    Semicolon,
    #[error("invalid percent-encoding at offset {at}")]
    BadPercentEncoding { at: usize },
    #[error(
        "an encoded '/' or '\\' (%2F, %5C) at offset {at} is refused: backends disagree on whether it separates segments"
    )]
    EncodedSlash { at: usize },
    #[error("an encoded control character at offset {at} is refused")]
    EncodedControl { at: usize },
}

/// A request target in normal form: `path()` is what policies match,
/// `as_str()` (path and query) is what must be forwarded. Borrows the input
/// when it was already normal, which is the common case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedPath<'a> {
    text: Cow<'a, str>,
    path_len: usize,
}

impl NormalizedPath<'_> {
    /// The normalized path, without the query.
    pub fn path(&self) -> &str {
        &self.text[..self.path_len]
    }

    /// The query, verbatim, without the '?'.
    pub fn query(&self) -> Option<&str> {
        self.text.get(self.path_len + 1..)
    }

    /// Path and query: the request target to forward.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether normalization changed the target (the request must then be
    /// rewritten before it is forwarded).
    pub fn is_rewritten(&self) -> bool {
        matches!(self.text, Cow::Owned(_))
    }

    pub fn into_owned(self) -> NormalizedPath<'static> {
        NormalizedPath {
            text: Cow::Owned(self.text.into_owned()),
            path_len: self.path_len,
        }
    }
}

impl std::fmt::Display for NormalizedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Normalizes an origin-form request target (`/path?query`); see the
/// [`policy`](super) module doc for the rules. Errors mean 400.
pub fn normalize_path(target: &str) -> Result<NormalizedPath<'_>, PathError> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut path_len = bytes.len();
    let mut rewrite = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !(0x21..=0x7e).contains(&b) {
            return Err(PathError::InvalidByte { byte: b, at: i });
        }
        if b == b'#' {
            return Err(PathError::Fragment);
        }
        if i < path_len {
            match b {
                b'?' => path_len = i,
                b';' => return Err(PathError::Semicolon),
                b'%' => {
                    escape(bytes, i)?;
                    rewrite = true;
                }
                b'\\' => rewrite = true,
                b'/' => rewrite |= is_dot_or_empty_segment(&bytes[i + 1..]),
                _ => {}
            }
        }
        i += 1;
    }
    if !rewrite {
        return Ok(NormalizedPath {
            text: Cow::Borrowed(target),
            path_len,
        });
    }

    // Decode unreserved characters and turn '\' into '/'; other escapes stay
    // encoded, with upper-case hex.
    let mut decoded = String::with_capacity(path_len);
    let mut i = 0;
    while i < path_len {
        match bytes[i] {
            b'%' => {
                let v = escape(bytes, i)?;
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    decoded.push('%');
                    decoded.push(HEX[usize::from(v >> 4)] as char);
                    decoded.push(HEX[usize::from(v & 0xf)] as char);
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            b => {
                decoded.push(b as char);
                i += 1;
            }
        }
    }

    // Merge slashes and resolve dot segments, never above the root.
    let mut out = String::with_capacity(target.len());
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                out.truncate(out.rfind('/').unwrap_or(0));
                trailing_slash = true;
            }
            s => {
                out.push('/');
                out.push_str(s);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    let normalized_len = out.len();
    out.push_str(&target[path_len..]);
    let text = if out == target {
        Cow::Borrowed(target)
    } else {
        Cow::Owned(out)
    };
    Ok(NormalizedPath {
        text,
        path_len: normalized_len,
    })
}

/// The byte a `%XX` at `i` encodes, if it is a valid escape we accept.
fn escape(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hex = |b: u8| (b as char).to_digit(16);
    let (Some(h), Some(l)) = (
        bytes.get(i + 1).and_then(|&b| hex(b)),
        bytes.get(i + 2).and_then(|&b| hex(b)),
    ) else {
        return Err(PathError::BadPercentEncoding { at: i });
    };
    let v = (h * 16 + l) as u8;
    match v {
        b'/' | b'\\' => Err(PathError::EncodedSlash { at: i }),
        0..=0x1f | 0x7f => Err(PathError::EncodedControl { at: i }),
        _ => Ok(v),
    }
}

/// RFC 3986 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether the segment starting at `rest` (just after a '/') is empty, `.`
/// or `..`: the fast path's test for "needs merging or resolving".
fn is_dot_or_empty_segment(rest: &[u8]) -> bool {
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let seg = &rest[..end];
    // A trailing empty segment ("/a/") is kept as is; an empty one in the
    // middle ("/a//b") or at the start ("//a") is merged.
    (seg.is_empty() && end < rest.len() && rest[end] == b'/') || seg == b"." || seg == b".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms() {
        #[rustfmt::skip]
        let table: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/b?x=1&y=/../z", "/a/b?x=1&y=/../z"),
            ("//a///b", "/a/b"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/../../a", "/a"),
            ("/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/%61%62c", "/abc"),
            ("/%7e%2D%2e%5f", "/~-._"),
            ("/%2e%2e/%2E/a", "/a"),
            ("/a%20b%3a", "/a%20b%3A"),
            ("/a%25%32%46", "/a%252F"),
            ("/a\\b\\..\\c", "/a/c"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/..b/.c", "/a/..b/.c"),
            ("/a//b?q//./", "/a/b?q//./"),
            ("/a?", "/a?"),
            ("/a%20b", "/a%20b"),
        ];
        for (input, want) in table {
            let n = normalize_path(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(n.as_str(), *want, "{input:?}");
            assert_eq!(n.is_rewritten(), input != want, "{input:?}");
        }
        let n = normalize_path("/a/./b?x=1").unwrap();
        assert_eq!((n.path(), n.query()), ("/a/b", Some("x=1")));
        let n = normalize_path("/a/b").unwrap();
        assert_eq!((n.path(), n.query()), ("/a/b", None));
        let n = normalize_path("/a?").unwrap();
        assert_eq!((n.path(), n.query()), ("/a", Some("")));
    }

    #[test]
    fn refusals() {
        use PathError as E;
        #[rustfmt::skip]
        let table: &[(&str, E)] = &[
            ("", E::NotOriginForm),
            ("*", E::NotOriginForm),
            ("a/b", E::NotOriginForm),
            ("http://x/a", E::NotOriginForm),
            ("\\a", E::NotOriginForm),
            ("/a b", E::InvalidByte { byte: b' ', at: 2 }),
            ("/a\tb", E::InvalidByte { byte: b'\t', at: 2 }),
            ("/\u{e9}", E::InvalidByte { byte: 0xc3, at: 1 }),
            ("/a?b c", E::InvalidByte { byte: b' ', at: 4 }),
            ("/a#x", E::Fragment),
            ("/a?x#y", E::Fragment),
            ("/a;x", E::Semicolon),
            ("/a/..;/b", E::Semicolon),
            ("/a%", E::BadPercentEncoding { at: 2 }),
            ("/a%4", E::BadPercentEncoding { at: 2 }),
            ("/a%zz", E::BadPercentEncoding { at: 2 }),
            ("/a%2F", E::EncodedSlash { at: 2 }),
            ("/a%2fb", E::EncodedSlash { at: 2 }),
            ("/a%5cb", E::EncodedSlash { at: 2 }),
            ("/a%00.png", E::EncodedControl { at: 2 }),
            ("/a%7F", E::EncodedControl { at: 2 }),
        ];
        for (input, want) in table {
            assert_eq!(normalize_path(input).as_ref(), Err(want), "{input:?}");
            assert!(!want.to_string().is_empty());
        }
        // The query is not decoded, so escapes there are the application's.
        assert!(normalize_path("/a?x=%2F%zz;").is_ok());
    }

    #[test]
    fn idempotent() {
        for input in ["//a/./b/../%63?q", "/x/%2e%2e/%2e%2e/y/", "/\\\\a\\.\\b"] {
            let once = normalize_path(input).unwrap().into_owned();
            let twice = normalize_path(once.as_str()).unwrap();
            assert_eq!(once.as_str(), twice.as_str(), "{input:?}");
            assert!(!twice.is_rewritten(), "{input:?}");
        }
    }
}
