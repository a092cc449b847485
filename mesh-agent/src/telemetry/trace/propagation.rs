//! Trace context in HTTP headers: W3C Trace Context (`traceparent`,
//! `tracestate`) and Zipkin's B3 (single `b3` header and multi `x-b3-*`).
//!
//! Parsing is strict where the specs are (W3C ids are lower-case hex, never
//! all zeros) and never panics: whatever does not parse counts as absent, and
//! the request simply starts a new trace.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Formats, SpanContext, SpanId, TraceId};

pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(super) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(super) const B3: HeaderName = HeaderName::from_static("b3");
pub(super) const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub(super) const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub(super) const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub(super) const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub(super) const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// W3C: "at least 512 characters of a combined header" must be propagated;
/// more is trimmed by whole members (entries over 128 characters first).
const TRACESTATE_MAX: usize = 512;
const TRACESTATE_MEMBER_MAX: usize = 128;
const TRACESTATE_MEMBERS_MAX: usize = 32;

/// What one header format yielded.
struct Parsed {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: Option<bool>,
}

pub(super) fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let formats = Formats {
        w3c: headers.contains_key(TRACEPARENT),
        b3_single: headers.contains_key(B3),
        b3_multi: headers.contains_key(B3_TRACE_ID),
    };
    let w3c = formats
        .w3c
        .then(|| headers.get(TRACEPARENT).and_then(traceparent))
        .flatten();
    // tracestate belongs to a valid traceparent only.
    let trace_state = w3c.as_ref().and_then(|_| tracestate(headers));
    let parsed = w3c
        .or_else(|| headers.get(B3).and_then(b3_single))
        .or_else(|| formats.b3_multi.then(|| b3_multi(headers)).flatten())?;
    Some(SpanContext {
        trace_id: parsed.trace_id,
        span_id: parsed.span_id,
        sampled: parsed.sampled,
        trace_state,
        formats,
        remote: true,
    })
}

/// Writes `ctx` (a span of ours, child of `parent`) for the next hop.
pub(super) fn inject(ctx: &SpanContext, parent: Option<SpanId>, headers: &mut HeaderMap) {
    let sampled = ctx.sampled == Some(true);
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex_into(&mut buf[3..35], &ctx.trace_id.0);
    buf[35] = b'-';
    hex_into(&mut buf[36..52], &ctx.span_id.0);
    buf[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    headers.insert(TRACEPARENT, header_value(&buf));
    match &ctx.trace_state {
        Some(state) => {
            headers.insert(TRACESTATE, state.clone());
        }
        None => {
            headers.remove(TRACESTATE);
        }
    }

    if ctx.formats.b3_single {
        // {trace}-{span}-{1|0}[-{parent}]
        let mut buf = [0u8; 32 + 1 + 16 + 2 + 1 + 16];
        hex_into(&mut buf[..32], &ctx.trace_id.0);
        buf[32] = b'-';
        hex_into(&mut buf[33..49], &ctx.span_id.0);
        buf[49..51].copy_from_slice(if sampled { b"-1" } else { b"-0" });
        let len = match parent {
            Some(p) => {
                buf[51] = b'-';
                hex_into(&mut buf[52..68], &p.0);
                68
            }
            None => 51,
        };
        headers.insert(B3, header_value(&buf[..len]));
    }
    if ctx.formats.b3_multi {
        let mut trace = [0u8; 32];
        hex_into(&mut trace, &ctx.trace_id.0);
        headers.insert(B3_TRACE_ID, header_value(&trace));
        let mut span = [0u8; 16];
        hex_into(&mut span, &ctx.span_id.0);
        headers.insert(B3_SPAN_ID, header_value(&span));
        match parent {
            Some(p) => {
                hex_into(&mut span, &p.0);
                headers.insert(B3_PARENT_SPAN_ID, header_value(&span));
            }
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        headers.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if sampled { "1" } else { "0" }),
        );
        // The caller's debug flag has become `sampled=1`.
        headers.remove(B3_FLAGS);
    }
}

/// `{version:2}-{trace:32}-{span:16}-{flags:2}`, more fields after a `-` for
/// versions above 00.
fn traceparent(value: &HeaderValue) -> Option<Parsed> {
    let s = value.as_bytes().trim_ascii();
    if s.len() < 55 {
        return None;
    }
    let version: [u8; 1] = hex(&s[..2], true)?;
    match version[0] {
        0xff => return None,
        0x00 if s.len() != 55 => return None,
        _ if s.len() > 55 && s[55] != b'-' => return None,
        _ => {}
    }
    if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return None;
    }
    let trace_id = TraceId(nonzero(hex(&s[3..35], true)?)?);
    let span_id = SpanId(nonzero(hex(&s[36..52], true)?)?);
    let flags: [u8; 1] = hex(&s[53..55], true)?;
    Some(Parsed {
        trace_id,
        span_id,
        sampled: Some(flags[0] & 1 == 1),
    })
}

/// Every `tracestate` line joined, bounded as the spec allows.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    if values.next().is_none() && first.len() <= TRACESTATE_MAX {
        // The common case: one line, kept as is (no copy).
        return (!first.as_bytes().trim_ascii().is_empty()).then(|| first.clone());
    }
    let mut joined = String::new();
    let mut members = 0;
    for value in headers.get_all(TRACESTATE) {
        let Ok(value) = value.to_str() else {
            return None;
        };
        for member in value.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if member.len() > TRACESTATE_MEMBER_MAX || members == TRACESTATE_MEMBERS_MAX {
                continue;
            }
            if joined.len() + member.len() + 1 > TRACESTATE_MAX {
                break;
            }
            if !joined.is_empty() {
                joined.push(',');
            }
            joined.push_str(member);
            members += 1;
        }
    }
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

/// `{trace:16|32}-{span:16}[-{1|0|d}[-{parent:16}]]`. A bare sampling
/// decision (`b3: 0`) carries no ids: absent.
fn b3_single(value: &HeaderValue) -> Option<Parsed> {
    let s = value.to_str().ok()?.trim();
    let mut parts = s.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = SpanId(nonzero(hex(parts.next()?.as_bytes(), false)?)?);
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        hex::<8>(parent.as_bytes(), false)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Parsed {
        trace_id,
        span_id,
        sampled,
    })
}

fn b3_multi(headers: &HeaderMap) -> Option<Parsed> {
    let text = |name: HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let trace_id = b3_trace_id(text(B3_TRACE_ID)?)?;
    let span_id = SpanId(nonzero(hex(text(B3_SPAN_ID)?.as_bytes(), false)?)?);
    let debug = text(B3_FLAGS) == Some("1");
    let sampled = match text(B3_SAMPLED) {
        _ if debug => Some(true),
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        None => None,
        Some(_) => return None,
    };
    Some(Parsed {
        trace_id,
        span_id,
        sampled,
    })
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is the low half.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let id = match s.len() {
        32 => hex::<16>(s.as_bytes(), false)?,
        16 => {
            let low: [u8; 8] = hex(s.as_bytes(), false)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    Some(TraceId(nonzero(id)?))
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    (id != [0; N]).then_some(id)
}

/// Exactly `2 * N` hex digits. W3C allows only lower case; B3 is lenient.
fn hex<const N: usize>(s: &[u8], lower_only: bool) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !lower_only => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Our own hex and dashes: always a valid header value.
fn header_value(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ctx_of(pairs: &[(&str, &str)]) -> Option<SpanContext> {
        extract(&headers(pairs))
    }

    #[test]
    fn w3c_traceparent_and_tracestate() {
        let ctx = ctx_of(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ])
        .unwrap();
        assert_eq!(ctx.trace_id().to_string(), TRACE);
        assert_eq!(ctx.span_id().to_string(), SPAN);
        assert!(ctx.is_sampled());
        assert!(ctx.is_remote());
        assert_eq!(
            ctx.trace_state(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(
            ctx.formats(),
            Formats {
                w3c: true,
                b3_single: false,
                b3_multi: false
            }
        );

        let ctx = ctx_of(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]).unwrap();
        assert!(!ctx.is_sampled());
        assert_eq!(ctx.trace_state(), None);
        // Other flag bits do not make it sampled.
        assert!(
            !ctx_of(&[("traceparent", &format!("00-{TRACE}-{SPAN}-02"))])
                .unwrap()
                .is_sampled()
        );
        // A later version may append fields.
        let ctx = ctx_of(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-whatever"))]).unwrap();
        assert_eq!(ctx.trace_id().to_string(), TRACE);
    }

    #[test]
    fn w3c_invalid_is_absent() {
        let upper = TRACE.to_uppercase();
        for bad in [
            format!("00-{upper}-{SPAN}-01"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("01-{TRACE}-{SPAN}-01extra"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("00_{TRACE}_{SPAN}_01"),
            format!("00-{}-{SPAN}-01", &TRACE[..31]),
            format!("0-{TRACE}-{SPAN}-01"),
            String::new(),
            "garbage".into(),
        ] {
            assert_eq!(
                ctx_of(&[("traceparent", &bad), ("tracestate", "a=b")]),
                None,
                "{bad:?}"
            );
        }
        // Not even visible ASCII.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_bytes(b"00-\xff\xfe").unwrap(),
        );
        assert_eq!(extract(&h), None);
    }

    #[test]
    fn tracestate_is_bounded() {
        let long_member = format!("big={}", "x".repeat(200));
        let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
        let ctx = ctx_of(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", &long_member),
            ("tracestate", &many.join(",")),
        ])
        .unwrap();
        let state = ctx.trace_state().unwrap();
        assert!(!state.contains("big="));
        assert_eq!(state.split(',').count(), TRACESTATE_MEMBERS_MAX);
        assert!(state.starts_with("k0=v,k1=v"));
        let filler: Vec<String> = (0..10)
            .map(|i| format!("k{i}={}", "y".repeat(100)))
            .collect();
        let ctx = ctx_of(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", &filler.join(",")),
        ])
        .unwrap();
        assert!(ctx.trace_state().unwrap().len() <= TRACESTATE_MAX);
    }

    #[test]
    fn b3_single() {
        let ctx = ctx_of(&[("b3", &format!("{TRACE}-{SPAN}-1-{SPAN}"))]).unwrap();
        assert_eq!(ctx.trace_id().to_string(), TRACE);
        assert_eq!(ctx.span_id().to_string(), SPAN);
        assert!(ctx.is_sampled());
        assert_eq!(
            ctx.formats(),
            Formats {
                w3c: false,
                b3_single: true,
                b3_multi: false
            }
        );
        assert!(
            ctx_of(&[("b3", &format!("{TRACE}-{SPAN}-d"))])
                .unwrap()
                .is_sampled()
        );
        assert!(
            !ctx_of(&[("b3", &format!("{TRACE}-{SPAN}-0"))])
                .unwrap()
                .is_sampled()
        );
        // Deferred: no decision yet.
        let ctx = ctx_of(&[("b3", &format!("{TRACE}-{SPAN}"))]).unwrap();
        assert_eq!(ctx.sampled, None);
        // 64-bit trace ids are the low half of a 128-bit one; B3 tolerates upper case.
        let ctx = ctx_of(&[("b3", &format!("A3CE929D0E0E4736-{SPAN}-1"))]).unwrap();
        assert_eq!(
            ctx.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        for bad in [
            "0".to_owned(),
            "1".to_owned(),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-{SPAN}-1-xyz"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-more"),
            format!("{}-{SPAN}-1", &TRACE[..20]),
            format!("{TRACE}-{}", "0".repeat(16)),
            format!("{TRACE}-"),
            "-".into(),
        ] {
            assert_eq!(ctx_of(&[("b3", &bad)]), None, "{bad:?}");
        }
    }

    #[test]
    fn b3_multi() {
        let ctx = ctx_of(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ])
        .unwrap();
        assert_eq!(ctx.trace_id().to_string(), TRACE);
        assert_eq!(ctx.span_id().to_string(), SPAN);
        assert!(ctx.is_sampled());
        assert_eq!(
            ctx.formats(),
            Formats {
                w3c: false,
                b3_single: false,
                b3_multi: true
            }
        );
        let sampled = |v: &str| {
            ctx_of(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", v),
            ])
        };
        assert!(sampled("true").unwrap().is_sampled());
        assert!(!sampled("0").unwrap().is_sampled());
        assert!(!sampled("false").unwrap().is_sampled());
        assert_eq!(sampled("maybe"), None);
        assert_eq!(
            ctx_of(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)])
                .unwrap()
                .sampled,
            None
        );
        let debug = ctx_of(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ])
        .unwrap();
        assert!(debug.is_sampled());
        assert_eq!(ctx_of(&[("x-b3-traceid", TRACE)]), None);
        assert_eq!(
            ctx_of(&[("x-b3-traceid", "zz"), ("x-b3-spanid", SPAN)]),
            None
        );
    }

    #[test]
    fn w3c_wins_and_every_format_seen_is_noted() {
        let other = "11111111111111111111111111111111";
        let ctx = ctx_of(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", &format!("{other}-{SPAN}-0")),
            ("x-b3-traceid", other),
            ("x-b3-spanid", SPAN),
        ])
        .unwrap();
        assert_eq!(ctx.trace_id().to_string(), TRACE);
        assert!(ctx.is_sampled());
        assert_eq!(
            ctx.formats(),
            Formats {
                w3c: true,
                b3_single: true,
                b3_multi: true
            }
        );
        // An invalid traceparent falls back to B3, and its tracestate is dropped.
        let ctx = ctx_of(&[
            ("traceparent", "junk"),
            ("tracestate", "a=b"),
            ("b3", &format!("{other}-{SPAN}-0")),
        ])
        .unwrap();
        assert_eq!(ctx.trace_id().to_string(), other);
        assert_eq!(ctx.trace_state(), None);
    }

    fn child_of(ctx: &SpanContext, sampled: bool) -> SpanContext {
        SpanContext {
            span_id: SpanId([7; 8]),
            sampled: Some(sampled),
            remote: false,
            ..ctx.clone()
        }
    }

    #[test]
    fn inject_round_trips() {
        let incoming = ctx_of(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "k=v"),
        ])
        .unwrap();
        let mine = child_of(&incoming, true);
        let mut out = headers(&[("traceparent", "stale"), ("x-b3-sampled", "0")]);
        inject(&mine, Some(incoming.span_id()), &mut out);
        assert_eq!(out[TRACEPARENT], format!("00-{TRACE}-0707070707070707-01"));
        assert_eq!(out[TRACESTATE], "k=v");
        // B3 was not used by the caller: not written, not touched.
        assert!(!out.contains_key(B3) && !out.contains_key(B3_TRACE_ID));
        assert_eq!(out[B3_SAMPLED], "0");
        let back = extract(&out).unwrap();
        assert_eq!(back.trace_id(), mine.trace_id());
        assert_eq!(back.span_id(), mine.span_id());
        assert_eq!(back.trace_state(), Some("k=v"));

        // Unsampled still propagates, with flags 00; a stale tracestate goes.
        let incoming = ctx_of(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]).unwrap();
        let mut out = headers(&[("tracestate", "stale=1")]);
        inject(&child_of(&incoming, false), None, &mut out);
        assert_eq!(out[TRACEPARENT], format!("00-{TRACE}-0707070707070707-00"));
        assert!(!out.contains_key(TRACESTATE));
    }

    #[test]
    fn inject_writes_b3_back_in_the_formats_seen() {
        let incoming = ctx_of(&[("b3", &format!("{TRACE}-{SPAN}-1"))]).unwrap();
        let mut out = HeaderMap::new();
        inject(
            &child_of(&incoming, true),
            Some(incoming.span_id()),
            &mut out,
        );
        assert_eq!(out[B3], format!("{TRACE}-0707070707070707-1-{SPAN}"));
        assert_eq!(out[TRACEPARENT], format!("00-{TRACE}-0707070707070707-01"));
        assert!(!out.contains_key(B3_TRACE_ID));
        let back = extract(&out).unwrap();
        assert_eq!(back.span_id(), SpanId([7; 8]));

        let incoming = ctx_of(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
            ("x-b3-sampled", "1"),
        ])
        .unwrap();
        let mut out = headers(&[
            ("x-b3-flags", "1"),
            ("x-b3-parentspanid", "1111111111111111"),
        ]);
        inject(
            &child_of(&incoming, true),
            Some(incoming.span_id()),
            &mut out,
        );
        assert_eq!(out[B3_TRACE_ID], TRACE);
        assert_eq!(out[B3_SPAN_ID], "0707070707070707");
        assert_eq!(out[B3_PARENT_SPAN_ID], SPAN);
        assert_eq!(out[B3_SAMPLED], "1");
        assert!(!out.contains_key(B3_FLAGS));
        assert!(!out.contains_key(B3));
        // Reading back only the B3 headers gives the same context.
        out.remove(TRACEPARENT);
        let back = extract(&out).unwrap();
        assert_eq!(
            (back.trace_id().to_string(), back.span_id()),
            (TRACE.to_owned(), SpanId([7; 8]))
        );

        // Unsampled, root (no parent): B3 single without the parent field.
        let root = SpanContext {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            sampled: Some(false),
            trace_state: None,
            formats: Formats {
                w3c: true,
                b3_single: true,
                b3_multi: true,
            },
            remote: false,
        };
        let mut out = headers(&[("x-b3-parentspanid", SPAN)]);
        inject(&root, None, &mut out);
        assert_eq!(out[B3], format!("{}-{}-0", "01".repeat(16), "02".repeat(8)));
        assert_eq!(out[B3_SAMPLED], "0");
        assert!(!out.contains_key(B3_PARENT_SPAN_ID));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = StdRng::seed_from_u64(6);
        let alphabet = b"0123456789abcdefABCDEF-_ ,=xyz\t";
        for _ in 0..20_000 {
            let len = rng.gen_range(0..80);
            let value: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let Ok(value) = HeaderValue::from_bytes(&value) else {
                continue;
            };
            let mut h = HeaderMap::new();
            for name in [
                TRACEPARENT,
                TRACESTATE,
                B3,
                B3_TRACE_ID,
                B3_SPAN_ID,
                B3_SAMPLED,
            ] {
                if rng.gen_bool(0.5) {
                    h.insert(name, value.clone());
                }
            }
            if let Some(ctx) = extract(&h) {
                // Whatever parsed writes back as a valid traceparent.
                let mut out = HeaderMap::new();
                inject(&ctx, None, &mut out);
                assert_eq!(extract(&out).map(|c| c.trace_id()), Some(ctx.trace_id()));
            }
        }
    }
}
