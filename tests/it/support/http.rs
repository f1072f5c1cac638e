//! A small HTTP/1.1 client over a plain TcpStream, with SSE follow streams.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;

use super::*;

/// One HTTP response, body already de-chunked.
#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone())
            .unwrap_or_else(|_| panic!("body is not UTF-8: {:?}", self.body))
    }

    #[track_caller]
    pub fn json(&self) -> Json {
        let text = self.text();
        parse_json(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self}"))
    }

    /// Asserts `status` and the error body `{"error": message}` served as JSON.
    #[track_caller]
    pub fn assert_error(&self, status: u16, message: &str) {
        assert_eq!(
            self.status, status,
            "expected {status} {message:?}, got: {self}"
        );
        self.assert_json_content_type();
        let j = self.json();
        let expected = serde_json::json!({ "error": message });
        assert_eq!(j, expected, "error body mismatch; response: {self}");
    }

    #[track_caller]
    pub fn assert_json_content_type(&self) {
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.to_ascii_lowercase().starts_with("application/json"),
            "content-type must be application/json: {self}"
        );
    }

    #[track_caller]
    pub fn assert_text_content_type(&self) {
        let ct = self.header("content-type").unwrap_or("");
        assert_eq!(
            ct.to_ascii_lowercase().replace(' ', ""),
            "text/plain;charset=utf-8",
            "content-type must be text/plain; charset=utf-8: {self}"
        );
    }

    /// The `Allow` header as a sorted list of methods.
    pub fn allow(&self) -> Vec<String> {
        let mut methods: Vec<String> = self
            .header("allow")
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .filter(|m| !m.is_empty())
            .collect();
        methods.sort();
        methods
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = if body.chars().count() > 2000 {
            let head: String = body.chars().take(2000).collect();
            format!("{head}… ({} bytes)", self.body.len())
        } else {
            body.to_string()
        };
        write!(f, "HTTP {} {:?} body={body:?}", self.status, self.headers)
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Sends one request and panics on any I/O error.
#[track_caller]
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    try_http(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} on 127.0.0.1:{port} failed: {e}"))
}

fn build_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// Sends one request on a fresh connection (`Connection: close`) and reads
/// the response: by Content-Length, by chunked framing, or to EOF.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = build_request(port, method, path, headers, body);
    // A server may answer (e.g. 413) and close before reading the whole body;
    // the answer is still there to read, so a failed write is not the end.
    if let Err(e) = stream.write_all(&request) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e);
        }
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(resp) = parse_response(&raw, false)? {
            return Ok(resp);
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{e} (after {} bytes of response)", raw.len()),
                ))
            }
        }
    }
    match parse_response(&raw, true)? {
        Some(resp) => Ok(resp),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed before a complete response; got {:?}",
                String::from_utf8_lossy(&raw)
            ),
        )),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Status, headers, and the offset where the body starts.
type Head = (u16, Vec<(String, String)>, usize);

/// Parses the status line and headers, once they are all in `raw`.
fn parse_head(raw: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((status, headers, end + 4)))
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header_of(headers, "transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false)
}

/// Returns a complete response if `raw` holds one (or, at `eof`, whatever a
/// close-delimited body holds).
fn parse_response(raw: &[u8], eof: bool) -> io::Result<Option<Response>> {
    let Some((status, headers, start)) = parse_head(raw)? else {
        return Ok(None);
    };
    let rest = &raw[start..];
    let body = if is_chunked(&headers) {
        match decode_chunked(rest)? {
            (body, true) => body,
            (_, false) => return Ok(None),
        }
    } else if let Some(len) = header_of(&headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad content-length {len:?}")))?;
        if rest.len() < len {
            if eof {
                return Err(bad(format!(
                    "body truncated: {} of {len} bytes",
                    rest.len()
                )));
            }
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// Decodes as many complete chunks as `raw` holds. Returns the decoded bytes
/// and whether the terminating zero-size chunk (and trailers) was seen.
fn decode_chunked(raw: &[u8]) -> io::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find(&raw[pos..], b"\r\n") else {
            return Ok((body, false));
        };
        let size_line = String::from_utf8_lossy(&raw[pos..pos + line_end]).to_string();
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size line {size_line:?}")))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers, each ending in CRLF, then an empty line.
            loop {
                let Some(end) = find(&raw[pos..], b"\r\n") else {
                    return Ok((body, false));
                };
                pos += end + 2;
                if end == 0 {
                    return Ok((body, true));
                }
            }
        }
        if raw.len() < pos + size + 2 {
            return Ok((body, false));
        }
        body.extend_from_slice(&raw[pos..pos + size]);
        if &raw[pos + size..pos + size + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF".to_string()));
        }
        pos += size + 2;
    }
}

/// A streaming response (e.g. `/stdout?follow=true`) read incrementally.
pub struct FollowStream {
    stream: TcpStream,
    raw: Vec<u8>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl FollowStream {
    /// Opens a streamed GET and waits (with the deadline) for its head.
    #[track_caller]
    pub fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> FollowStream {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(POLL))
            .expect("set_read_timeout");
        stream
            .write_all(&build_request(port, "GET", path, headers, None))
            .expect("write request");
        let mut s = FollowStream {
            stream,
            raw: Vec::new(),
            status: 0,
            headers: Vec::new(),
        };
        let what = format!("response head of GET {path}");
        let (status, headers) = poll(&what, || {
            s.read_some();
            match parse_head(&s.raw).expect("parse head") {
                Some((status, headers, _)) => Ok((status, headers)),
                None => Err(String::from_utf8_lossy(&s.raw).to_string()),
            }
        });
        s.status = status;
        s.headers = headers;
        s
    }

    /// Reads whatever is available now (up to 1 MiB); returns false at
    /// EOF.
    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 65536];
        for _ in 0..16 {
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) => return self.read_error(e),
            }
        }
        true
    }

    /// A read that found nothing yet (timeout) keeps the stream open; any
    /// other error fails the test.
    fn read_error(&self, e: io::Error) -> bool {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                true
            }
            _ => panic!("reading streamed response: {e}"),
        }
    }

    /// The body decoded so far, and whether it is complete.
    pub fn body(&self) -> (Vec<u8>, bool) {
        let (_, headers, start) = parse_head(&self.raw)
            .expect("parse head")
            .expect("head complete");
        let rest = &self.raw[start..];
        if is_chunked(&headers) {
            decode_chunked(rest).expect("decode chunked")
        } else {
            (rest.to_vec(), false)
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    #[track_caller]
    pub fn read_until_contains(&mut self, needle: &str) {
        self.read_until(&format!("streamed body to contain {needle:?}"), |body| {
            find(body, needle.as_bytes()).map(|_| ())
        })
    }

    /// Reads until `f` finds what it wants in the body decoded so far
    /// (panics if the stream ends first).
    #[track_caller]
    pub fn read_until<T>(&mut self, what: &str, mut f: impl FnMut(&[u8]) -> Option<T>) -> T {
        poll(what, || {
            let open = self.read_some();
            let (body, done) = self.body();
            if let Some(t) = f(&body) {
                Ok(t)
            } else if done || !open {
                panic!(
                    "stream ended before {what}; body: {:?}",
                    String::from_utf8_lossy(&body)
                )
            } else {
                Err(String::from_utf8_lossy(&body).to_string())
            }
        })
    }

    /// Reads until the response is complete (terminating chunk or EOF);
    /// returns the whole decoded body.
    #[track_caller]
    pub fn read_to_end(&mut self) -> Vec<u8> {
        poll("streamed response to end", || {
            let open = self.read_some();
            let (body, done) = self.body();
            if done || !open {
                Ok(body)
            } else {
                Err(String::from_utf8_lossy(&body).to_string())
            }
        })
    }
}
