//! A small pipelined Redis client for the limit checks on a single Redis, over plain TCP or TLS:
//! commands encoded once, written by one connection task in arrival order, replies read back in
//! the same order by a hand-written RESP2 reader. (redis-rs stays for clusters only; its generic
//! reply parser cost about 10k instructions per request for two four-integer replies.)
//!
//! One `Client` per worker runtime. A call sends its encoded commands and a reply slot to the
//! connection task; a caller that gives up (timeout) just drops its slot, and the task still
//! consumes the replies meant for it, so replies never go to the wrong caller.
//!
//! TLS is rustls (tokio-rustls) with the client config the caller gives, verified against the
//! host part of the address (a name or an IP address).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;

/// A reply value (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Ok(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PipelinedError {
    #[error("connection to Redis lost")]
    Closed,
    #[error("Redis I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed reply from Redis")]
    Protocol,
    #[error("Redis refused: {0}")]
    Refused(String),
    #[error("Redis TLS: {0}")]
    Tls(String),
}

/// Appends one command in RESP array form.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_num(out, args.len());
    for a in args {
        out.push(b'$');
        push_num(out, a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `EVALSHA sha 1 key args...` without allocating beyond `out`.
pub fn encode_evalsha(out: &mut Vec<u8>, sha: &str, key: &str, args: &[u64]) {
    out.push(b'*');
    push_num(out, 4 + args.len());
    for part in [b"EVALSHA".as_slice(), sha.as_bytes(), b"1", key.as_bytes()] {
        out.push(b'$');
        push_num(out, part.len());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    for a in args {
        let len = a.checked_ilog10().map_or(1, |l| l as usize + 1);
        out.push(b'$');
        push_num(out, len);
        push_decimal(out, *a);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_num(out: &mut Vec<u8>, n: usize) {
    push_decimal(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal without allocating.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Parses one reply from the start of `buf`: `Ok(None)` if it is not complete yet, else the value
/// and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, PipelinedError> {
    parse_at(buf, 0, 0)
}

const MAX_DEPTH: usize = 8;

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let mut at = from;
    loop {
        let cr = at + buf.get(at..)?.iter().position(|&b| b == b'\r')?;
        if *buf.get(cr + 1)? == b'\n' {
            return Some((&buf[from..cr], cr + 2));
        }
        // A bare CR inside a simple string or error: keep looking past it.
        at = cr + 1;
    }
}

/// A RESP integer: optional minus, then 1 to 19 digits.
fn int(bytes: &[u8]) -> Result<i64, PipelinedError> {
    let (neg, digits) = match bytes {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(PipelinedError::Protocol);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(PipelinedError::Protocol);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or(PipelinedError::Protocol)?;
    }
    Ok(if neg { -n } else { n })
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Value, usize)>, PipelinedError> {
    if depth > MAX_DEPTH {
        return Err(PipelinedError::Protocol);
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((head, next)) = line(buf, at + 1) else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(head).into_owned();
    match kind {
        b'+' => Ok(Some((Value::Ok(text()), next))),
        b'-' => Ok(Some((Value::Error(text()), next))),
        b':' => Ok(Some((Value::Int(int(head)?), next))),
        b'$' => {
            let n = int(head)?;
            if n < 0 {
                return Ok(Some((Value::Bulk(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| PipelinedError::Protocol)?;
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(PipelinedError::Protocol);
            }
            Ok(Some((Value::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            let n = int(head)?;
            if n < 0 {
                return Ok(Some((Value::Array(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| PipelinedError::Protocol)?;
            let mut items = Vec::with_capacity(n.min(64));
            let mut pos = next;
            for _ in 0..n {
                match parse_at(buf, pos, depth + 1)? {
                    Some((v, p)) => {
                        items.push(v);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(Some(items)), pos)))
        }
        _ => Err(PipelinedError::Protocol),
    }
}

/// A script reply `{int, int, ...}` as integers.
pub fn ints(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Array(Some(items)) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Some(*n),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

struct Call {
    bytes: Vec<u8>,
    replies: usize,
    tx: oneshot::Sender<Result<Vec<Value>, PipelinedError>>,
}

struct Pending {
    replies: usize,
    got: Vec<Value>,
    tx: oneshot::Sender<Result<Vec<Value>, PipelinedError>>,
}

/// A connection to one Redis, driven by its own task on the runtime that opened it.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Call>,
}

/// How to reach and log in to Redis.
pub struct Target<'a> {
    /// `host:port` (`[v6]:port`).
    pub addr: &'a str,
    /// TLS with this client config; `None`: plain TCP.
    pub tls: Option<Arc<ClientConfig>>,
    pub username: Option<&'a str>,
    pub password: &'a str,
    pub db: u64,
}

impl Client {
    /// Connects (TLS handshake included), logs in (AUTH, SELECT) and starts the connection task.
    pub async fn connect(t: &Target<'_>, timeout: Duration) -> Result<Client, PipelinedError> {
        let timed_out = || PipelinedError::Io(std::io::ErrorKind::TimedOut.into());
        let stream = tokio::time::timeout(timeout, TcpStream::connect(t.addr))
            .await
            .map_err(|_| timed_out())??;
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        match &t.tls {
            None => {
                let mut stream = stream;
                tokio::time::timeout(timeout, login(&mut stream, t))
                    .await
                    .map_err(|_| timed_out())??;
                let (rd, wr) = stream.into_split();
                tokio::spawn(drive(rd, wr, rx));
            }
            Some(cfg) => {
                let name = server_name(t.addr)?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone());
                let mut stream = tokio::time::timeout(timeout, tls.connect(name, stream))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| PipelinedError::Tls(e.to_string()))?;
                tokio::time::timeout(timeout, login(&mut stream, t))
                    .await
                    .map_err(|_| timed_out())??;
                let (rd, wr) = tokio::io::split(stream);
                tokio::spawn(drive(rd, wr, rx));
            }
        }
        Ok(Client { tx })
    }

    /// Whether the connection task has ended (connection lost).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends `bytes` (holding `replies` commands) and waits for their replies, in order.
    pub async fn call(&self, bytes: Vec<u8>, replies: usize) -> Result<Vec<Value>, PipelinedError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Call { bytes, replies, tx })
            .map_err(|_| PipelinedError::Closed)?;
        rx.await.map_err(|_| PipelinedError::Closed)?
    }
}

/// The name the server's certificate must carry: the host part of `host:port`.
fn server_name(addr: &str) -> Result<ServerName<'static>, PipelinedError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| PipelinedError::Tls(format!("not a host name or IP address: {host}")))
}

/// Sends AUTH and SELECT as configured, then PING, and reads their replies.
async fn login<S>(stream: &mut S, t: &Target<'_>) -> Result<(), PipelinedError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::new();
    let mut expect = 0;
    if !t.password.is_empty() {
        match t.username {
            Some(u) => encode(&mut hello, &[b"AUTH", u.as_bytes(), t.password.as_bytes()]),
            None => encode(&mut hello, &[b"AUTH", t.password.as_bytes()]),
        }
        expect += 1;
    }
    if t.db != 0 {
        encode(&mut hello, &[b"SELECT", t.db.to_string().as_bytes()]);
        expect += 1;
    }
    encode(&mut hello, &[b"PING"]);
    expect += 1;
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut seen = 0;
    while seen < expect {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(PipelinedError::Closed);
        }
        while let Some((v, used)) = parse(&buf)? {
            buf.drain(..used);
            seen += 1;
            if let Value::Error(e) = v {
                return Err(PipelinedError::Refused(e));
            }
        }
    }
    Ok(())
}

/// The connection task: writes calls in arrival order, hands replies back in the same order; on
/// a lost connection every waiting call gets `Closed` and the task ends.
async fn drive<R, W>(mut rd: R, mut wr: W, mut rx: mpsc::UnboundedReceiver<Call>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut inbuf: Vec<u8> = Vec::with_capacity(4096);
    let mut outbuf: Vec<u8> = Vec::with_capacity(4096);
    let fail = |pending: &mut VecDeque<Pending>| {
        for p in pending.drain(..) {
            let _ = p.tx.send(Err(PipelinedError::Closed));
        }
    };
    loop {
        tokio::select! {
            call = rx.recv() => {
                let Some(call) = call else { break };
                // Everything queued now goes out in one write.
                let mut next = Some(call);
                while let Some(c) = next {
                    outbuf.extend_from_slice(&c.bytes);
                    pending.push_back(Pending { replies: c.replies, got: Vec::with_capacity(c.replies), tx: c.tx });
                    next = rx.try_recv().ok();
                }
                // (A flush is a no-op on TCP; TLS may hold the last record until flushed.)
                let res = match wr.write_all(&outbuf).await {
                    Ok(()) => wr.flush().await,
                    Err(e) => Err(e),
                };
                outbuf.clear();
                if res.is_err() {
                    break;
                }
            }
            n = rd.read_buf(&mut inbuf) => {
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let mut used = 0;
                loop {
                    match parse(&inbuf[used..]) {
                        Ok(Some((v, n))) => {
                            used += n;
                            let Some(front) = pending.front_mut() else {
                                // A reply nobody asked for: the stream is out of step.
                                fail(&mut pending);
                                return;
                            };
                            front.got.push(v);
                            if front.got.len() == front.replies {
                                if let Some(done) = pending.pop_front() {
                                    let _ = done.tx.send(Ok(done.got));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            fail(&mut pending);
                            return;
                        }
                    }
                }
                inbuf.drain(..used);
            }
        }
    }
    fail(&mut pending);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_evalsha_like_the_generic_encoder() {
        for args in [vec![], vec![0u64], vec![9, 10, 99, 100, u64::MAX]] {
            let mut fast = Vec::new();
            encode_evalsha(&mut fast, "sha", "k", &args);
            let text: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let mut parts: Vec<&[u8]> = vec![b"EVALSHA", b"sha", b"1", b"k"];
            parts.extend(text.iter().map(|t| t.as_bytes()));
            let mut generic = Vec::new();
            encode(&mut generic, &parts);
            assert_eq!(fast, generic);
        }
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode(&mut out, &[b"EVALSHA", b"abc", b"1", b"key"]);
        assert_eq!(
            out,
            b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$3\r\nkey\r\n"
        );
    }

    #[test]
    fn parses_replies_whole_and_in_pieces() {
        let reply =
            b"*4\r\n:1\r\n:-2\r\n$3\r\nabc\r\n$-1\r\n+OK\r\n-NOSCRIPT No matching script\r\n";
        let (v, n) = parse(reply).unwrap().unwrap();
        assert_eq!(
            v,
            Value::Array(Some(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Bulk(Some(b"abc".to_vec())),
                Value::Bulk(None)
            ]))
        );
        let (v, m) = parse(&reply[n..]).unwrap().unwrap();
        assert_eq!(v, Value::Ok("OK".into()));
        let (v, _) = parse(&reply[n + m..]).unwrap().unwrap();
        assert_eq!(v, Value::Error("NOSCRIPT No matching script".into()));
        for cut in 0..n {
            assert_eq!(parse(&reply[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(b"?x\r\n").is_err());
        assert_eq!(
            parse(b"-ERR a\rb\r\n").unwrap().unwrap().0,
            Value::Error("ERR a\rb".into())
        );
        assert_eq!(parse(b"-ERR a\r").unwrap(), None);
        assert_eq!(
            parse(b":-9223372036854775807\r\n").unwrap().unwrap().0,
            Value::Int(-i64::MAX)
        );
        assert!(parse(b":99999999999999999999\r\n").is_err());
        assert!(parse(b":\r\n").is_err());
        assert!(parse(b":-\r\n").is_err());
        assert!(parse(b":abc\r\n").is_err());
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        let deep = "*1\r\n".repeat(20) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
        assert_eq!(
            ints(&parse(b"*2\r\n:5\r\n:6\r\n").unwrap().unwrap().0),
            Some(vec![5, 6])
        );
    }
}
