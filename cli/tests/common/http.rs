//! Plain HTTP/1.1 as the HTTP tests speak it: one exchange per connection (chunked bodies
//! de-chunked), waiting for `/health`, and reading `/metrics`.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One HTTP/1.1 exchange: status code and body (chunked bodies de-chunked).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = exchange(addr, method, path, body, key);
    (status, body)
}

/// One HTTP/1.1 exchange: status code, the head (lower-cased) and the body.
pub fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    exchange_with(addr, method, path, body, &headers)
}

/// One HTTP/1.1 exchange with extra request headers: status code, the head (lower-cased)
/// and the body.
pub fn exchange_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    // A server may answer (413) and close before it has read a large body.
    .ok();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, tail) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, head.to_ascii_lowercase(), body)
}

/// Waits until `/health` says 200.
pub fn wait_healthy(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while http(addr, "GET", "/health", None, None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the cluster never became healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every sample of a Prometheus text page: `name{labels}` -> value. Panics on a line that
/// is neither a comment nor `series value`.
pub fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_string(), value)
        })
        .collect()
}

pub fn metrics(addr: &str) -> HashMap<String, f64> {
    let (status, body) = http(addr, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    samples(&body)
}
