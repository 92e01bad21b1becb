//! The access log (`accessLog`), off the request path.
//!
//! A request's [`finish`](crate::proxy) builds its line (one `String`, no lock) and hands it to
//! [`Sink::send`], which `try_send`s it into one bounded queue ([`CAPACITY`] lines) shared by
//! every worker. The writer task ([`start`], on the control runtime) drains the queue every
//! [`DRAIN_EVERY`] without ever waiting on it, so a line wakes no thread: measured, a writer
//! woken by each line (`recv`) cost about 15 µs of CPU per request in futex wake-ups and context
//! switches, more than the gateway's whole work on a request. It appends the lines to one buffer
//! per destination and writes the buffers at least every [`FLUSH_EVERY`] or once they hold
//! [`FLUSH_BYTES`]; the write itself runs on tokio's blocking pool, so neither the workers nor
//! the control runtime ever wait on a disk or a stdout pipe.
//! When the queue is full the line is dropped and counted (`hexgate_access_log_dropped_total`),
//! as are lines whose write failed; such failures are logged at most every [`WARN_EVERY`].
//!
//! Each line carries its destination (stdout or a file, from the snapshot the request ran on),
//! so a reload that changes `accessLog.path` applies to the requests that start after it; a file
//! no line went to for [`IDLE_CLOSE`] is closed. SIGUSR1 reopens the files (logrotate's
//! `create` mode: the old file was renamed, lines go on in a fresh file at the same path): what
//! was queued before the signal is written to the old file first. The handler is installed once,
//! by [`start`], whatever the config says, so SIGUSR1 never kills the gateway.
//!
//! JSON lines are written by hand ([`json_line`]): the fields are few and known, the escaper
//! copies runs of plain bytes, and no intermediate `serde_json::Value` is built.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, Method, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

use crate::body::Body;
use crate::config::{AccessLogFormat, Config};
use crate::error::GatewayError;
use crate::metrics::Registry;

/// Lines the queue holds before new ones are dropped.
pub const CAPACITY: usize = 8192;
/// How often the writer takes lines off the queue: [`CAPACITY`] lines per period is the most a
/// gateway can log without dropping (819,200 lines a second).
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// The longest a line waits in the writer's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffers this large are written at once.
pub const FLUSH_BYTES: usize = 256 * 1024;
/// Write failures are logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(5);
/// A file no line went to for this long is closed (after a reload moved the log elsewhere).
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// A snapshot's access log: its format and destination, and where dropped lines are counted.
pub struct Sink {
    pub format: AccessLogFormat,
    target: Arc<Target>,
    /// The target's index in [`targets`]: what a line carries.
    id: u32,
    metrics: Arc<Registry>,
}

impl Sink {
    /// The access log `cfg` asks for, or `None` when it is off.
    pub fn of(cfg: &Config, metrics: &Arc<Registry>) -> Option<Sink> {
        let a = &cfg.access_log;
        a.enabled.then(|| {
            let (id, target) = register(match a.file(cfg.base_dir.as_deref()) {
                Some(p) => Target::File(p),
                None => Target::Stdout,
            });
            Sink {
                format: a.format,
                target,
                id,
                metrics: metrics.clone(),
            }
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Queues `text` (one line, with its newline); never waits. A full queue drops it.
    pub fn send(&self, text: String) {
        let line = Line {
            target: self.id,
            text,
        };
        if queue().tx.try_send(line).is_err() {
            self.metrics
                .access_log_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One line on its way to the writer.
struct Line {
    /// Index in [`targets`].
    target: u32,
    text: String,
}

/// Every destination a snapshot has named, each once (a handful per process): lines carry an
/// index rather than a reference count to bump and drop on two threads.
fn targets() -> &'static Mutex<Vec<Arc<Target>>> {
    static TARGETS: OnceLock<Mutex<Vec<Arc<Target>>>> = OnceLock::new();
    TARGETS.get_or_init(|| Mutex::new(Vec::new()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The index of `t` in [`targets`], added if new.
fn register(t: Target) -> (u32, Arc<Target>) {
    let mut all = lock(targets());
    if let Some(i) = all.iter().position(|x| **x == t) {
        return (i as u32, all[i].clone());
    }
    let t = Arc::new(t);
    all.push(t.clone());
    ((all.len() - 1) as u32, t)
}

/// What is asked of the writer besides lines.
enum Control {
    /// Write what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

struct Queue {
    tx: mpsc::Sender<Line>,
    rx: Mutex<Option<mpsc::Receiver<Line>>>,
    control: mpsc::UnboundedSender<Control>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
}

/// The process's one queue (created on first use; its receiver taken by [`start`]).
fn queue() -> &'static Queue {
    static QUEUE: OnceLock<Queue> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let (control, control_rx) = mpsc::unbounded_channel();
        Queue {
            tx,
            rx: Mutex::new(Some(rx)),
            control,
            control_rx: Mutex::new(Some(control_rx)),
        }
    })
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    lock(m).take()
}

/// Starts the writer on the current (control) runtime and installs the SIGUSR1 handler; once
/// per process (later calls do nothing). The file `cfg` names is opened here, so a file that
/// cannot be opened stops the start, reported at `accessLog.path`.
pub fn start(cfg: &Config, metrics: Arc<Registry>) -> Result<(), String> {
    let mut out = Outputs::default();
    if let Some(sink) = Sink::of(cfg, &metrics) {
        if let Target::File(path) = sink.target() {
            let file = open(path).map_err(|e| {
                format!(
                    "{}:{}: accessLog.path: cannot open {}: {e}",
                    cfg.file,
                    cfg.line_of("accessLog.path"),
                    path.display()
                )
            })?;
            out.files.insert(path.clone(), (file, Instant::now()));
        }
    }
    let (Some(rx), Some(control)) = (take(&queue().rx), take(&queue().control_rx)) else {
        return Ok(());
    };
    #[cfg(unix)]
    let usr1 = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGUSR1: the access log cannot be reopened");
            None
        }
    };
    #[cfg(not(unix))]
    let usr1: Option<()> = None;
    tokio::spawn(writer(rx, control, usr1, out, metrics));
    Ok(())
}

/// Writes what is queued now, waiting at most `limit` (at shutdown, so the last requests'
/// lines are not lost).
pub async fn flush(limit: Duration) {
    let (tx, rx) = oneshot::channel();
    if queue().control.send(Control::Flush(tx)).is_ok() {
        let _ = tokio::time::timeout(limit, rx).await;
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// The open files, by path, with when a line last went to each; stdout is always there.
#[derive(Default)]
struct Outputs {
    files: HashMap<PathBuf, (std::fs::File, Instant)>,
    /// Lines lost to failed writes since the last warning, and when it was.
    failed: u64,
    warned: Option<Instant>,
    last_error: String,
}

impl Outputs {
    /// Writes every buffer (emptying them; `pending[i]` goes to `targets[i]`); returns how
    /// many lines were lost.
    fn write(&mut self, pending: &mut [Pending], targets: &[Arc<Target>]) -> u64 {
        let mut lost = 0;
        let now = Instant::now();
        for (target, Pending { buf, lines }) in targets.iter().zip(pending.iter_mut()) {
            if buf.is_empty() {
                continue;
            }
            let result = match &**target {
                Target::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(buf).and_then(|()| out.flush())
                }
                Target::File(path) => {
                    let entry = match self.files.entry(path.clone()) {
                        std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            open(path).map(|f| v.insert((f, now)))
                        }
                    };
                    entry.and_then(|(f, used)| {
                        *used = now;
                        f.write_all(buf)
                    })
                }
            };
            if let Err(e) = result {
                lost += *lines;
                self.last_error = format!("{target:?}: {e}");
                if let Target::File(path) = &**target {
                    // Opened again at the next write (the directory may come back).
                    self.files.remove(path);
                }
            }
            buf.clear();
            *lines = 0;
        }
        self.files
            .retain(|_, (_, used)| now.duration_since(*used) < IDLE_CLOSE);
        lost
    }

    /// Reopens every file (SIGUSR1): a file renamed away gets a fresh one at its path.
    fn reopen(&mut self) {
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in paths {
            match open(&path) {
                Ok(f) => {
                    if let Some(entry) = self.files.get_mut(&path) {
                        entry.0 = f;
                    }
                }
                Err(e) => {
                    self.files.remove(&path);
                    tracing::warn!(path = %path.display(), error = %e, "SIGUSR1: cannot reopen the access log; trying again at the next line");
                }
            }
        }
    }

    fn note_failures(&mut self, lost: u64) {
        self.failed += lost;
        if self.failed > 0 && self.warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                lines = self.failed,
                error = %self.last_error,
                "access log lines could not be written (counted in hexgate_access_log_dropped_total)"
            );
            self.failed = 0;
            self.warned = Some(Instant::now());
        }
    }
}

#[cfg(unix)]
type Usr1 = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Usr1 = ();

async fn next_usr1(s: &mut Option<Usr1>) {
    #[cfg(unix)]
    if let Some(s) = s {
        if s.recv().await.is_some() {
            return;
        }
    }
    let _ = s;
    std::future::pending::<()>().await
}

/// Lines waiting for one destination.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    lines: u64,
}

/// The writer task: drains the queue every [`DRAIN_EVERY`], batches lines per destination and
/// writes them off the runtime.
async fn writer(
    mut rx: mpsc::Receiver<Line>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut usr1: Option<Usr1>,
    out: Outputs,
    metrics: Arc<Registry>,
) {
    let mut out = Some(out);
    let mut pending: Vec<Pending> = Vec::new();
    let mut known: Vec<Arc<Target>> = Vec::new();
    let mut bytes = 0usize;
    let mut last_write = Instant::now();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let mut reopen = false;
        tokio::select! {
            _ = tick.tick() => {}
            () = next_usr1(&mut usr1) => reopen = true,
            Some(Control::Flush(ack)) = control.recv() => waiting.push(ack),
        }
        // Never `recv`: a waiting receiver would be woken by every line.
        while let Ok(line) = rx.try_recv() {
            let i = line.target as usize;
            if i >= pending.len() {
                pending.resize_with(i + 1, Pending::default);
            }
            let p = &mut pending[i];
            bytes += line.text.len();
            p.buf.extend_from_slice(line.text.as_bytes());
            p.lines += 1;
        }
        let due = bytes > 0 && (bytes >= FLUSH_BYTES || last_write.elapsed() >= FLUSH_EVERY);
        if due || reopen || !waiting.is_empty() {
            if known.len() < pending.len() {
                known = lock(targets()).clone();
            }
            let Some(mut o) = out.take() else { return };
            let mut p = std::mem::take(&mut pending);
            let t = known.clone();
            let done = tokio::task::spawn_blocking(move || {
                // What was queued before the signal goes to the old file, then it is reopened.
                let lost = o.write(&mut p, &t);
                if reopen {
                    o.reopen();
                }
                (o, p, lost)
            })
            .await;
            let Ok((mut o, p, lost)) = done else {
                tracing::error!("the access log writer failed; access logging stops");
                return;
            };
            if lost > 0 {
                metrics
                    .access_log_dropped
                    .fetch_add(lost, Ordering::Relaxed);
            }
            o.note_failures(lost);
            out = Some(o);
            pending = p; // emptied, its buffers kept for reuse
            bytes = 0;
            last_write = Instant::now();
        }
        for ack in waiting.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// What the access log needs of a request beyond the [`Context`](crate::proxy::Context):
/// the path and version as received, and a refusal's reason.
pub struct Access {
    pub path: String,
    pub version: &'static str,
    pub refusal: Option<Refusal>,
    /// The request's trace: the gateway's (with `tracing`), else the client's `traceparent`.
    pub trace_id: Option<u128>,
}

/// A refusal made by the gateway, as the log shows it.
pub struct Refusal {
    /// The error's text, as the client was told it.
    pub reason: String,
    pub phase: Phase,
}

/// Where a refusal stands relative to the limits phase (for `limit_outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Refused before limits were checked (routing, admission, authentication, ...).
    Before,
    /// Refused by a limit (429).
    Limited,
    /// Failed after the limits let the request through (upstream errors, timeouts).
    After,
}

impl Refusal {
    pub fn of(e: &GatewayError) -> Refusal {
        use GatewayError as E;
        let phase = match e {
            E::TooManyRequests => Phase::Limited,
            E::RequestTimeout
            | E::NoHealthyBackend
            | E::ConnectFailed
            | E::UpstreamTimeout
            | E::DeadlineExceeded
            | E::Upstream(_)
            | E::UpstreamTls { .. }
            | E::GrpcNeedsHttp2
            | E::BadUpgrade(_)
            | E::Internal(_) => Phase::After,
            // BodyTooLarge may be either (declared: before; streamed: after): not said.
            _ => Phase::Before,
        };
        Refusal {
            reason: e.to_string(),
            phase,
        }
    }
}

/// What `forward` learned of the upstream, carried in the response's extensions.
#[derive(Clone)]
pub struct Upstream {
    /// The backend that answered.
    pub backend: Arc<crate::upstream::Backend>,
    /// From sending the request to the response head.
    pub took: Duration,
    /// Attempts beyond the first, when known.
    pub retries: Option<u32>,
}

/// The fields of one request's line.
pub struct Fields<'a> {
    pub time: SystemTime,
    pub request_id: &'a str,
    pub trace_id: Option<u128>,
    pub client_ip: IpAddr,
    pub method: &'a Method,
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes_sent: Option<u64>,
    pub duration: Duration,
    pub upstream: Option<&'a Upstream>,
    pub service: &'a str,
    pub consumer: Option<&'a str>,
    pub limit_outcome: Option<&'static str>,
    pub reason: Option<&'a str>,
}

/// The size of the body `resp` sends, when known without reading it: nothing for HEAD and
/// bodiless statuses, else Content-Length, else the body's exact size hint.
pub fn bytes_sent(method: &Method, resp: &Response<Body>) -> Option<u64> {
    let s = resp.status();
    if *method == Method::HEAD
        || s.is_informational()
        || s == StatusCode::NO_CONTENT
        || s == StatusCode::NOT_MODIFIED
    {
        return Some(0);
    }
    if let Some(v) = resp.headers().get(header::CONTENT_LENGTH) {
        return v.to_str().ok()?.parse().ok();
    }
    http_body::Body::size_hint(resp.body()).exact()
}

/// The seed's text line and its newline:
/// `IP "METHOD PATH VERSION" STATUS TIMEms service=S request_id=R`.
#[allow(clippy::too_many_arguments)]
pub fn text_line(
    peer: IpAddr,
    method: &Method,
    path: &str,
    version: &str,
    status: u16,
    elapsed: Duration,
    service: &str,
    request_id: &str,
) -> String {
    let path = escape_text(path);
    let mut o = String::with_capacity(96 + path.len() + request_id.len());
    crate::text::push_ip(&mut o, peer);
    o.push_str(" \"");
    o.push_str(method.as_str());
    o.push(' ');
    o.push_str(&path);
    o.push(' ');
    o.push_str(version);
    o.push_str("\" ");
    crate::text::push_u64(&mut o, u64::from(status));
    o.push(' ');
    crate::text::push_millis(&mut o, elapsed);
    o.push_str("ms service=");
    o.push_str(service);
    o.push_str(" request_id=");
    o.push_str(request_id);
    o.push('\n');
    o
}

/// One JSON object and its newline.
pub fn json_line(f: &Fields) -> String {
    let mut o = String::with_capacity(384);
    o.push_str("{\"time\":\"");
    rfc3339_millis(&mut o, f.time);
    o.push_str("\",\"request_id\":");
    json_str(&mut o, f.request_id);
    match f.trace_id {
        Some(id) => {
            o.push_str(",\"trace_id\":\"");
            o.push_str(&crate::otel::context::hex32(id));
            o.push('"');
        }
        None => o.push_str(",\"trace_id\":null"),
    }
    o.push_str(",\"client_ip\":\"");
    crate::text::push_ip(&mut o, f.client_ip);
    o.push_str("\",\"method\":");
    json_str(&mut o, f.method.as_str());
    o.push_str(",\"path\":");
    json_str(&mut o, f.path);
    o.push_str(",\"protocol\":");
    json_str(&mut o, f.version);
    o.push_str(",\"status\":");
    crate::text::push_u64(&mut o, u64::from(f.status));
    o.push_str(",\"bytes_sent\":");
    match f.bytes_sent {
        Some(n) => crate::text::push_u64(&mut o, n),
        None => o.push_str("null"),
    }
    o.push_str(",\"duration_ms\":");
    crate::text::push_millis(&mut o, f.duration);
    o.push_str(",\"upstream\":");
    match f.upstream {
        Some(u) => {
            // Written in place; escaped only in the (never seen) case it needs it.
            let at = o.len();
            // `BackendAddr`'s Display, without `core::fmt`.
            o.push('"');
            o.push_str(u.backend.addr.scheme.as_str());
            o.push_str("://");
            o.push_str(&u.backend.authority);
            o.push('"');
            if o[at + 1..o.len() - 1]
                .bytes()
                .any(|b| b == b'"' || b == b'\\' || b < 0x20)
            {
                let addr = o.split_off(at);
                json_str(&mut o, &addr[1..addr.len() - 1]);
            }
            o.push_str(",\"upstream_ms\":");
            crate::text::push_millis(&mut o, u.took);
        }
        None => o.push_str("null,\"upstream_ms\":null"),
    }
    o.push_str(",\"service\":");
    json_str(&mut o, f.service);
    o.push_str(",\"consumer\":");
    json_opt(&mut o, f.consumer);
    o.push_str(",\"limit_outcome\":");
    json_opt(&mut o, f.limit_outcome);
    o.push_str(",\"retries\":");
    match f.upstream.and_then(|u| u.retries) {
        Some(n) => crate::text::push_u64(&mut o, u64::from(n)),
        None => o.push_str("null"),
    }
    o.push_str(",\"reason\":");
    json_opt(&mut o, f.reason);
    o.push_str("}\n");
    o
}

fn json_opt(o: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(o, s),
        None => o.push_str("null"),
    }
}

/// `s` as a JSON string: `"` and `\` escaped, control characters as `\n`, `\t`, ... or
/// `\u00XX`; everything else (any Unicode) copied as it is.
pub fn json_str(o: &mut String, s: &str) {
    o.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        o.push_str(&s[plain..i]);
        if esc.is_empty() {
            let _ = write!(o, "\\u{b:04x}");
        } else {
            o.push_str(esc);
        }
        plain = i + 1;
    }
    o.push_str(&s[plain..]);
    o.push('"');
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-12-01T12:00:00.123Z`.
pub fn rfc3339_millis(o: &mut String, t: SystemTime) {
    // The text changes once a millisecond while a busy worker logs dozens of lines in one:
    // each thread keeps the last millisecond's text.
    thread_local! {
        static LAST: std::cell::RefCell<(u128, String)> =
            const { std::cell::RefCell::new((u128::MAX, String::new())) };
    }
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = d.as_millis();
    LAST.with(|cell| {
        let Ok(mut last) = cell.try_borrow_mut() else {
            return write_rfc3339(o, d);
        };
        if last.0 != ms {
            last.1.clear();
            write_rfc3339(&mut last.1, d);
            last.0 = ms;
        }
        o.push_str(&last.1);
    });
}

fn write_rfc3339(o: &mut String, d: Duration) {
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    use crate::text::push_padded;
    // By hand (`crate::text`): `write!` cost about 2,000 instructions here.
    push_padded(o, y.max(0) as u64, 4);
    o.push('-');
    push_padded(o, u64::from(m), 2);
    o.push('-');
    push_padded(o, u64::from(day), 2);
    o.push('T');
    push_padded(o, rem / 3600, 2);
    o.push(':');
    push_padded(o, rem / 60 % 60, 2);
    o.push(':');
    push_padded(o, rem % 60, 2);
    o.push('.');
    push_padded(o, u64::from(d.subsec_millis()), 3);
    o.push('Z');
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The compile step's check: the directory of `accessLog.path` exists (the file itself is
/// created at start). `Some((key, message))` when it does not.
/// A request path for the text line, as nginx writes its log: `"`, `\\`, controls and bytes
/// outside printable ASCII as `\xNN`, so a line always splits on its quotes.
pub fn escape_text(path: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\';
    if path.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for b in path.bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            use std::fmt::Write as _;
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_line_is_the_seeds() {
        for _ in 0..2000 {
            let peer = IpAddr::from(fastrand::u32(..).to_be_bytes());
            let elapsed = Duration::from_micros(fastrand::u64(..100_000_000));
            let status = fastrand::u16(100..600);
            let want = format!(
                "{} \"{} {} {}\" {} {:.3}ms service={} request_id={}\n",
                peer,
                Method::POST,
                escape_text("/a b\""),
                "HTTP/1.1",
                status,
                elapsed.as_secs_f64() * 1000.0,
                "svc",
                "r-1"
            );
            let got = text_line(
                peer,
                &Method::POST,
                "/a b\"",
                "HTTP/1.1",
                status,
                elapsed,
                "svc",
                "r-1",
            );
            assert_eq!(got, want);
        }
    }

    #[test]
    fn text_paths_are_escaped_as_nginx_does() {
        assert_eq!(escape_text("/a/b?c=1"), "/a/b?c=1");
        assert_eq!(escape_text("/a\"b"), "/a\\x22b");
        assert_eq!(escape_text("/a\\b c"), "/a\\x5Cb\\x20c");
        assert_eq!(escape_text("/é"), "/\\xC3\\xA9");
    }

    fn at_millis(ms: u64) -> String {
        let mut s = String::new();
        rfc3339_millis(&mut s, UNIX_EPOCH + Duration::from_millis(ms));
        s
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(at_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(at_millis(1_796_126_400_123), "2026-12-01T12:00:00.123Z");
        assert_eq!(at_millis(1_709_251_199_500), "2024-02-29T23:59:59.500Z");
        assert_eq!(at_millis(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        // Every day boundary of four centuries agrees with a day-by-day count.
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for days in 0..(146_097 + 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_json() {
        for s in [
            "plain",
            "/a\"b\\c",
            "tab\there\nnl\r\u{1}\u{1f}\u{7f}",
            "ünïcødé ✓ 𝄞",
            "",
            "\"",
        ] {
            let mut o = String::new();
            json_str(&mut o, s);
            let back: String = serde_json::from_str(&o).unwrap();
            assert_eq!(back, s, "{o}");
            assert!(!o.bytes().any(|b| b < 0x20), "{o}");
        }
    }

    fn fields() -> Fields<'static> {
        Fields {
            time: UNIX_EPOCH + Duration::from_millis(1_796_126_400_123),
            request_id: "r-1",
            trace_id: None,
            client_ip: IpAddr::from([10, 0, 0, 1]),
            method: &Method::GET,
            path: "/x\"y",
            version: "HTTP/1.1",
            status: 200,
            bytes_sent: Some(5),
            duration: Duration::from_micros(1500),
            upstream: None,
            service: "web",
            consumer: Some("al\\ice"),
            limit_outcome: Some("allowed"),
            reason: None,
        }
    }

    #[test]
    fn a_json_line_has_every_field_typed() {
        let line = json_line(&fields());
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let o = v.as_object().unwrap();
        let names: Vec<&str> = o.keys().map(String::as_str).collect();
        let mut want = vec![
            "time",
            "request_id",
            "trace_id",
            "client_ip",
            "method",
            "path",
            "protocol",
            "status",
            "bytes_sent",
            "duration_ms",
            "upstream",
            "upstream_ms",
            "service",
            "consumer",
            "limit_outcome",
            "retries",
            "reason",
        ];
        want.sort_unstable();
        let mut got = names.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["time"], "2026-12-01T12:00:00.123Z");
        assert_eq!(v["status"], 200);
        assert!(v["duration_ms"].is_f64());
        assert_eq!(v["duration_ms"].as_f64(), Some(1.5));
        assert_eq!(v["path"], "/x\"y");
        assert_eq!(v["consumer"], "al\\ice");
        assert!(v["trace_id"].is_null() && v["upstream"].is_null() && v["reason"].is_null());

        // With the upstream `forward` reports.
        let up = Upstream {
            backend: Arc::new(crate::upstream::Backend::new(crate::config::BackendAddr {
                scheme: crate::config::Scheme::Http,
                host: "::1".into(),
                port: 8081,
            })),
            took: Duration::from_micros(2250),
            retries: Some(1),
        };
        let line = json_line(&Fields {
            upstream: Some(&up),
            ..fields()
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["upstream"], "http://[::1]:8081");
        assert_eq!(v["upstream_ms"].as_f64(), Some(2.25));
        assert_eq!(v["retries"], 1);

        // A trace id: 32 lower-case hex digits, leading zeros kept.
        let line = json_line(&Fields {
            trace_id: Some(0xabc),
            ..fields()
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["trace_id"], "00000000000000000000000000000abc");
    }

    /// A full queue drops and counts; the line that fits is delivered.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Registry::default());
        let cfg = crate::config::parse("accessLog: {format: json}\nservices: []\n", "t").unwrap();
        let sink = Sink::of(&cfg, &metrics).unwrap();
        assert_eq!(sink.target(), &Target::Stdout);
        // The process's queue: nothing takes lines off it in this test binary.
        for _ in 0..CAPACITY + 10 {
            sink.send("x\n".into());
        }
        let dropped = metrics.access_log_dropped.load(Ordering::Relaxed);
        assert!(dropped >= 10, "{dropped}");
        let mut rx = take(&queue().rx).unwrap();
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n as u64 + dropped, CAPACITY as u64 + 10);
        assert!(metrics
            .render(&[], crate::metrics::Format::Text)
            .contains(&format!("hexgate_access_log_dropped_total {dropped}\n")));
    }
}
