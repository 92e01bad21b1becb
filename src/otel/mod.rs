//! OpenTelemetry traces (`tracing`): one server span per request, child spans for its phases
//! (authentication, limits and their Redis round trip, each upstream attempt), W3C Trace
//! Context continued from the client and passed upstream, spans exported over OTLP.
//!
//! Why not the OpenTelemetry SDK on the request path: measured on this gateway's request (a
//! server span, three children, the `traceparent` written upstream), `opentelemetry_sdk` with
//! its `BatchSpanProcessor` and the OTLP encoding cost 4.7 to 5.5 µs of CPU per request, about
//! 1.2x a plain request's CPU, over the 1.15x this feature may cost; the `tracing-opentelemetry`
//! bridge cost three to four times more, even for unsampled requests. The SDK's batch
//! processor also runs exports on its own thread without a timeout and keeps its drop count
//! private, while drops must be counted (`hexgate_tracing_dropped_spans_total`). So spans are
//! recorded here as small records (a few words each, attributes as static keys) and encoded
//! with the official OTLP protobuf types (`opentelemetry-proto`) by the exporter task
//! ([`export`]), off the request path: about 1.8 µs per sampled request. An unsampled request
//! records nothing: it gets ids and a `traceparent` written upstream, no more.

pub mod context;
pub mod export;
pub mod proto;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

use crate::config::Tracing;

pub use context::{Parent, TRACEPARENT, TRACESTATE};

/// A snapshot's tracing: how new traces are sampled, and where spans go.
pub struct Tracer {
    /// [`context::ratio_bound`] of `sampleRatio`.
    bound: u64,
    /// What the exporter needs (endpoint, headers, service name); spans carry it, so a reload
    /// that changes it sends later spans to the new collector.
    pub target: u32,
}

impl Tracer {
    /// The tracing `cfg` asks for, or `None` when it is off.
    pub fn of(cfg: Option<&Tracing>) -> Option<Arc<Tracer>> {
        let t = cfg?;
        Some(Arc::new(Tracer {
            bound: context::ratio_bound(t.sample_ratio),
            target: export::register(t),
        }))
    }

    /// The trace a request joins: the client's (parent-based: its sampled flag decides), else
    /// a new one sampled by ratio on its trace id.
    pub fn begin(&self, headers: &HeaderMap) -> Trace {
        let (parent, tracestate) = context::extract(headers);
        let (trace_id, sampled) = match parent {
            Some(p) => (p.trace_id, p.sampled),
            None => {
                let id = context::trace_id();
                (id, context::sampled_by_ratio(id, self.bound))
            }
        };
        Trace {
            trace_id,
            span_id: context::span_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            tracestate,
            rec: sampled.then(|| {
                Box::new(Recorder {
                    base_ns: unix_ns(),
                    base: Instant::now(),
                    spans: Mutex::new((Vec::with_capacity(2048), 0)),
                })
            }),
        }
    }
}

/// The longest attribute value taken from a request (its path, its user agent): a queued
/// request's spans stay a few KiB whatever the client sends (`maxHeaderSize` allows 64 KiB),
/// so the queue's memory stays bounded (OpenTelemetry's attribute value length limit).
pub const MAX_VALUE: usize = 1024;

/// `s` cut to at most [`MAX_VALUE`] bytes, at a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_VALUE {
        return s;
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The method's name when it is one of HTTP's (OpenTelemetry's known methods), else `None`
/// (then recorded as `_OTHER`).
pub fn known_method(m: &http::Method) -> Option<&'static str> {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
    ];
    KNOWN.iter().copied().find(|k| *k == m.as_str())
}

/// A request header's value as an attribute, copied (a `HeaderValue` kept as it is would keep
/// the whole buffer hyper read the request into, up to `maxHeaderSize`, for as long as the span
/// waits in the export queue) and clipped to [`MAX_VALUE`]; `None` when it is not text.
pub fn header_val(v: &HeaderValue) -> Option<Val<'_>> {
    Some(Val::from(clip(v.to_str().ok()?)))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One request's trace: its ids, and for a sampled request the spans of its phases.
pub struct Trace {
    pub trace_id: u128,
    /// The server span (the gateway's span for this request).
    pub span_id: u64,
    /// The client's span, when it sent a valid `traceparent`.
    pub parent: Option<u64>,
    pub sampled: bool,
    /// The client's `tracestate`, passed on unchanged.
    pub tracestate: Option<HeaderValue>,
    rec: Option<Box<Recorder>>,
}

/// A sampled request's finished spans, already encoded ([`proto::span`]); times are offsets
/// from one wall-clock reading.
struct Recorder {
    base_ns: u64,
    base: Instant,
    /// The encoded spans, and how many.
    spans: Mutex<(Vec<u8>, usize)>,
}

/// OTLP's span kinds (the protobuf's numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// An attribute value, borrowed from the request where it can be (a span is encoded when it
/// ends, so nothing needs to outlive the request).
#[derive(Debug, Clone)]
pub enum Val<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    /// Written as text by `crate::text` when encoded.
    Ip(std::net::IpAddr),
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(s: &'a str) -> Val<'a> {
        Val::Str(Cow::Borrowed(s))
    }
}
impl From<String> for Val<'_> {
    fn from(s: String) -> Self {
        Val::Str(Cow::Owned(s))
    }
}
impl From<i64> for Val<'_> {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct SpanRec<'a> {
    pub span_id: u64,
    /// 0: no parent (a server span without a client's).
    pub parent_id: u64,
    pub name: Cow<'a, str>,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: Vec<(&'static str, Val<'a>)>,
    /// The span's status is Error with this message.
    pub error: Option<Cow<'a, str>>,
}

/// A child span being timed (only for a sampled request).
pub struct Timer {
    pub span_id: u64,
    start: Instant,
}

impl Trace {
    /// Whether this request's spans are recorded (and exported).
    pub fn recording(&self) -> bool {
        self.rec.is_some()
    }

    /// Starts timing a child span, when recording.
    pub fn start(&self) -> Option<Timer> {
        self.rec.as_ref().map(|_| Timer {
            span_id: context::span_id(),
            start: Instant::now(),
        })
    }

    /// A child span that started when `timer` did (the Redis round trip within `limits`),
    /// when recording.
    pub fn start_at(&self, timer: &Timer) -> Option<Timer> {
        self.rec.as_ref().map(|_| Timer {
            span_id: context::span_id(),
            start: timer.start,
        })
    }

    /// Records a child span of `parent` (the server span when `None`) that ends now.
    pub fn end<'a>(
        &self,
        timer: Timer,
        parent: Option<u64>,
        name: impl Into<Cow<'a, str>>,
        kind: Kind,
        attrs: Vec<(&'static str, Val<'a>)>,
        error: Option<Cow<'a, str>>,
    ) {
        let Some(rec) = &self.rec else { return };
        let at = |i: Instant| rec.base_ns + i.saturating_duration_since(rec.base).as_nanos() as u64;
        let span = SpanRec {
            span_id: timer.span_id,
            parent_id: parent.unwrap_or(self.span_id),
            name: name.into(),
            kind,
            start_ns: at(timer.start),
            end_ns: at(Instant::now()),
            attrs,
            error,
        };
        let state = self.tracestate.as_ref().map_or(&b""[..], |s| s.as_bytes());
        let mut spans = match rec.spans.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        proto::span(&mut spans.0, self.trace_id, state, &span);
        spans.1 += 1;
    }

    /// The `traceparent` for a request sent upstream by the span `span_id` (an upstream
    /// attempt's span, or the server span).
    pub fn traceparent(&self, span_id: u64) -> HeaderValue {
        context::traceparent(self.trace_id, span_id, self.sampled)
    }

    /// Writes `traceparent` (and the client's `tracestate`) on a request going upstream; any
    /// the client sent are replaced.
    pub fn inject(&self, headers: &mut HeaderMap, span_id: u64) {
        headers.insert(TRACEPARENT, self.traceparent(span_id));
        match &self.tracestate {
            Some(s) => {
                headers.insert(TRACESTATE, s.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// Ends the request: its server span (started at `start`, named and described by the
    /// caller) and the children recorded, handed to the exporter. Nothing when not recording.
    pub fn finish<'a>(
        self,
        tracer: &Tracer,
        start: Instant,
        name: String,
        attrs: Vec<(&'static str, Val<'a>)>,
        error: Option<Cow<'a, str>>,
    ) {
        let Some(rec) = self.rec else { return };
        let at = |i: Instant| rec.base_ns + i.saturating_duration_since(rec.base).as_nanos() as u64;
        let (mut bytes, count) = match rec.spans.into_inner() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        let server = SpanRec {
            span_id: self.span_id,
            parent_id: self.parent.unwrap_or(0),
            name: Cow::Owned(name),
            kind: Kind::Server,
            // From the request's start when it came before the recorder's base (a start read
            // after the base counts from the base).
            start_ns: rec
                .base_ns
                .saturating_sub(rec.base.saturating_duration_since(start).as_nanos() as u64),
            end_ns: at(Instant::now()),
            attrs,
            error,
        };
        let state = self.tracestate.as_ref().map_or(&b""[..], |s| s.as_bytes());
        proto::span(&mut bytes, self.trace_id, state, &server);
        export::send(Finished {
            target: tracer.target,
            bytes,
            spans: count + 1,
        });
    }
}

/// A finished request's spans, encoded, on their way to the exporter.
pub struct Finished {
    /// Where they go ([`export::register`]).
    pub target: u32,
    /// `ScopeSpans.spans` entries ([`proto::span`]).
    pub bytes: Vec<u8>,
    /// How many spans `bytes` holds (what the counters count).
    pub spans: usize,
}
