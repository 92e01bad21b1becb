//! The OTLP `ExportTraceServiceRequest`, written straight into bytes.
//!
//! Hand-written because of a measurement: encoding through the official `opentelemetry-proto`
//! types builds a `String` per attribute key and value and a `Vec` per id (some 40 allocations
//! for a request's four spans) and was 5.5 % of the gateway's CPU at `sampleRatio: 1` (perf,
//! `bench/run.sh tracing`), a third of what tracing may cost. This writer copies the recorded
//! values once into one buffer. The message layout is OTLP's
//! (opentelemetry-proto `trace/v1/trace.proto`, `collector/trace/v1/trace_service.proto`); the
//! tests decode what it writes with the official types and compare it with what they encode
//! (`tests::agrees_with_the_official_types`).

use bytes::Bytes;

use super::{Finished, SpanRec, Val};

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from((field << 3) | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A string or bytes field, left out when empty (proto3's default, as prost writes it).
fn opt_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        bytes_field(out, field, b);
    }
}

/// The length of [`opt_bytes`]'s output.
fn opt_len(b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        1 + varint_len(b.len() as u64) + b.len()
    }
}

/// A nested message already written to `body`.
fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    bytes_field(out, field, body);
}

/// A `KeyValue`'s head (field `field` of its parent): its tag and length, its key, and the
/// tag and length of its `AnyValue` of `any` bytes, which the caller writes next.
fn kv_head(out: &mut Vec<u8>, field: u32, key: &str, any: usize) {
    // KeyValue { key = 1, value = 2 }
    let kv = opt_len(key.as_bytes()) + 1 + varint_len(any as u64) + any;
    tag(out, field, LEN);
    varint(out, kv as u64);
    opt_bytes(out, 1, key.as_bytes());
    tag(out, 2, LEN);
    varint(out, any as u64);
}

/// A `KeyValue` with a string value (`AnyValue { string_value = 1 }`).
fn kv_str(out: &mut Vec<u8>, field: u32, key: &str, value: &[u8]) {
    kv_head(
        out,
        field,
        key,
        1 + varint_len(value.len() as u64) + value.len(),
    );
    bytes_field(out, 1, value);
}

/// A `KeyValue` with an int value (`AnyValue { int_value = 3 }`; int64: a negative number
/// takes ten bytes).
fn kv_int(out: &mut Vec<u8>, field: u32, key: &str, value: i64) {
    kv_head(out, field, key, 1 + varint_len(value as u64));
    tag(out, 3, VARINT);
    varint(out, value as u64);
}

fn kv(out: &mut Vec<u8>, field: u32, key: &str, value: &Val, scratch: &mut String) {
    match value {
        Val::Str(s) => kv_str(out, field, key, s.as_bytes()),
        Val::Int(i) => kv_int(out, field, key, *i),
        Val::Ip(ip) => {
            // By hand (`crate::text`): `Display` cost about 1,600 instructions per address.
            scratch.clear();
            crate::text::push_ip(scratch, *ip);
            kv_str(out, field, key, scratch.as_bytes());
        }
    }
}

/// The resource and scope every export names.
pub struct Names<'a> {
    pub service: &'a str,
    pub version: &'a str,
}

/// Writes `s` as one `ScopeSpans.spans` entry (tag, length, `Span`) of the trace `trace_id`:
/// done when the span ends, on the request's own thread, where its data is still in cache and
/// the allocations it frees were made (measured: encoding on the exporter's thread, from
/// records, cost the gateway half as much CPU again as the encoding itself).
pub fn span(out: &mut Vec<u8>, trace_id: u128, trace_state: &[u8], s: &SpanRec) {
    // W3C flags (sampled), plus OTLP's "the parent's remoteness is known" and "is remote".
    const SAMPLED: u32 = 0x01;
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<u8>, String)> =
            std::cell::RefCell::new((Vec::with_capacity(2048), String::new()));
    }
    SCRATCH.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            // Never re-entered; a fresh buffer if it were.
            return span_with(
                out,
                trace_id,
                trace_state,
                s,
                &mut Vec::new(),
                &mut String::new(),
            );
        };
        let (body, text) = &mut *guard;
        span_with(out, trace_id, trace_state, s, body, text);
    });

    fn span_with(
        out: &mut Vec<u8>,
        trace_id: u128,
        trace_state: &[u8],
        s: &SpanRec,
        span: &mut Vec<u8>,
        scratch: &mut String,
    ) {
        span.clear();
        bytes_field(span, 1, &trace_id.to_be_bytes());
        bytes_field(span, 2, &s.span_id.to_be_bytes());
        if !trace_state.is_empty() {
            bytes_field(span, 3, trace_state);
        }
        if s.parent_id != 0 {
            bytes_field(span, 4, &s.parent_id.to_be_bytes());
        }
        opt_bytes(span, 5, s.name.as_bytes());
        tag(span, 6, VARINT);
        varint(span, s.kind as u64);
        for (field, t) in [(7, s.start_ns), (8, s.end_ns.max(s.start_ns))] {
            if t != 0 {
                tag(span, field, FIXED64);
                span.extend_from_slice(&t.to_le_bytes());
            }
        }
        for (k, v) in &s.attrs {
            kv(span, 9, k, v, scratch);
        }
        if let Some(m) = &s.error {
            // Status { message = 2, code = 3 (STATUS_CODE_ERROR = 2) }
            let body = opt_len(m.as_bytes()) + 2;
            tag(span, 15, LEN);
            varint(span, body as u64);
            opt_bytes(span, 2, m.as_bytes());
            tag(span, 3, VARINT);
            varint(span, 2);
        }
        let remote = s.kind == super::Kind::Server && s.parent_id != 0;
        tag(span, 16, FIXED32);
        let flags = SAMPLED | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 };
        span.extend_from_slice(&flags.to_le_bytes());
        message(out, 2, span);
    }
}

/// The encoded request for `batch` (each request's spans already written by [`span`]). The
/// spans, nearly all of it, are copied once: into the buffer the request is sent from, after
/// room left for the few header bytes that go before them once their length is known.
pub fn encode(names: &Names, batch: &[Finished]) -> Bytes {
    // Resource { attributes = 1 }
    let mut resource = Vec::with_capacity(128);
    kv_str(&mut resource, 1, "service.name", names.service.as_bytes());
    kv_str(
        &mut resource,
        1,
        "service.version",
        names.version.as_bytes(),
    );
    kv_str(&mut resource, 1, "telemetry.sdk.name", b"hexgate");
    kv_str(&mut resource, 1, "telemetry.sdk.language", b"rust");
    // Room for: ExportTraceServiceRequest's tag and length, ResourceSpans' resource (tag,
    // length, bytes) and its scope_spans' tag and length (a length takes at most 10 bytes).
    let room = 1 + 10 + 1 + 10 + resource.len() + 1 + 10;
    let bytes: usize = batch.iter().map(|f| f.bytes.len()).sum();
    let mut out = Vec::with_capacity(room + 64 + bytes);
    out.resize(room, 0);
    // ScopeSpans { scope = 1, spans = 2 }, written at `room`.
    let mut scope = Vec::with_capacity(64);
    bytes_field(&mut scope, 1, b"hexgate");
    bytes_field(&mut scope, 2, names.version.as_bytes());
    message(&mut out, 1, &scope);
    for f in batch {
        out.extend_from_slice(&f.bytes);
    }
    let scope_spans = out.len() - room;
    // ResourceSpans { resource = 1, scope_spans = 2 }
    let resource_spans = 1
        + varint_len(resource.len() as u64)
        + resource.len()
        + 1
        + varint_len(scope_spans as u64)
        + scope_spans;
    let mut head = Vec::with_capacity(room);
    // ExportTraceServiceRequest { resource_spans = 1 }
    tag(&mut head, 1, LEN);
    varint(&mut head, resource_spans as u64);
    message(&mut head, 1, &resource);
    tag(&mut head, 2, LEN);
    varint(&mut head, scope_spans as u64);
    let start = room - head.len();
    out[start..room].copy_from_slice(&head);
    Bytes::from(out).slice(start..)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::borrow::Cow;

    use http::HeaderValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, InstrumentationScope, KeyValue,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message as _;

    use super::*;
    use crate::otel::{Kind, SpanRec};

    /// A request's spans as recorded.
    struct Req {
        trace_id: u128,
        tracestate: Option<HeaderValue>,
        spans: Vec<SpanRec<'static>>,
    }

    /// The reference: the same request built with the official types and encoded by prost.
    fn official(names: &Names, batch: &[Req]) -> ExportTraceServiceRequest {
        let kv = |k: &str, v: any_value::Value| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        let text = |s: &str| any_value::Value::StringValue(s.into());
        let mut spans = Vec::new();
        for f in batch {
            for s in &f.spans {
                let remote = s.kind == Kind::Server && s.parent_id != 0;
                spans.push(Span {
                    trace_id: f.trace_id.to_be_bytes().to_vec(),
                    span_id: s.span_id.to_be_bytes().to_vec(),
                    trace_state: f
                        .tracestate
                        .as_ref()
                        .map(|t| t.to_str().unwrap().to_string())
                        .unwrap_or_default(),
                    parent_span_id: if s.parent_id == 0 {
                        vec![]
                    } else {
                        s.parent_id.to_be_bytes().to_vec()
                    },
                    flags: 0x101 | if remote { 0x200 } else { 0 },
                    name: s.name.to_string(),
                    kind: s.kind as i32,
                    start_time_unix_nano: s.start_ns,
                    end_time_unix_nano: s.end_ns.max(s.start_ns),
                    attributes: s
                        .attrs
                        .iter()
                        .map(|(k, v)| {
                            kv(
                                k,
                                match v {
                                    Val::Str(s) => text(s),
                                    Val::Ip(ip) => text(&ip.to_string()),
                                    Val::Int(i) => any_value::Value::IntValue(*i),
                                },
                            )
                        })
                        .collect(),
                    status: s.error.as_ref().map(|m| Status {
                        message: m.to_string(),
                        code: 2,
                    }),
                    ..Default::default()
                });
            }
        }
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", text(names.service)),
                        kv("service.version", text(names.version)),
                        kv("telemetry.sdk.name", text("hexgate")),
                        kv("telemetry.sdk.language", text("rust")),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "hexgate".into(),
                        version: names.version.into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn random_text(max: usize) -> String {
        let n = fastrand::usize(..=max);
        (0..n)
            .map(|_| match fastrand::u8(..4) {
                0 => fastrand::char('\u{80}'..'\u{3000}'),
                _ => fastrand::alphanumeric(),
            })
            .collect()
    }

    fn random_val() -> Val<'static> {
        match fastrand::u8(..6) {
            0 => Val::Str(Cow::Owned(random_text(300))),
            1 => Val::Str(Cow::Owned(random_text(20))),
            2 => Val::Int(fastrand::i64(..)),
            3 => Val::Ip(if fastrand::bool() {
                std::net::IpAddr::from(fastrand::u32(..).to_be_bytes())
            } else {
                std::net::IpAddr::from(fastrand::u128(..).to_be_bytes())
            }),
            4 => Val::Str(Cow::Owned("a".repeat(fastrand::usize(..200)))),
            _ => Val::Int(fastrand::i64(-5..5)),
        }
    }

    const KEYS: [&str; 4] = ["http.route", "k", "a.much.longer.attribute.name", ""];

    #[test]
    fn agrees_with_the_official_types() {
        for case in 0..300 {
            fastrand::seed(case);
            let batch: Vec<Req> = (0..fastrand::usize(1..5))
                .map(|_| Req {
                    trace_id: fastrand::u128(1..),
                    tracestate: fastrand::bool().then(|| HeaderValue::from_static("k=v,x=y")),
                    spans: (0..fastrand::usize(1..6))
                        .map(|_| SpanRec {
                            span_id: fastrand::u64(1..),
                            parent_id: if fastrand::bool() {
                                0
                            } else {
                                fastrand::u64(1..)
                            },
                            name: Cow::Owned(random_text(40)),
                            kind: [Kind::Server, Kind::Client, Kind::Internal]
                                [fastrand::usize(..3)],
                            start_ns: fastrand::u64(..),
                            end_ns: fastrand::u64(..),
                            attrs: (0..fastrand::usize(..20))
                                .map(|_| (KEYS[fastrand::usize(..KEYS.len())], random_val()))
                                .collect(),
                            error: fastrand::bool().then(|| Cow::Owned(random_text(100))),
                        })
                        .collect(),
                })
                .collect();
            let names = Names {
                service: "svc",
                version: "1.2.3",
            };
            let finished: Vec<Finished> = batch
                .iter()
                .map(|r| {
                    let mut bytes = Vec::new();
                    let state = r.tracestate.as_ref().map_or(&b""[..], |s| s.as_bytes());
                    for s in &r.spans {
                        span(&mut bytes, r.trace_id, state, s);
                    }
                    Finished {
                        target: 0,
                        bytes,
                        spans: r.spans.len(),
                    }
                })
                .collect();
            let ours = encode(&names, &finished);
            let decoded = ExportTraceServiceRequest::decode(&ours[..]).unwrap();
            let reference = official(&names, &batch);
            assert_eq!(decoded, reference, "case {case}");
            // Byte for byte too: prost writes fields in field-number order, as this writer does.
            assert_eq!(ours, reference.encode_to_vec(), "case {case}");
        }
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
