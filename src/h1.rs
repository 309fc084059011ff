//! HTTP/1.1 on the wire, for the direct path of plain keep-alive requests (see
//! `proxy::direct`): request and response heads parsed in place with `httparse` (the parser
//! hyper uses, with hyper's defaults), heads written back out, and the body framing of a
//! backend's response, including a chunked body decoded and written again chunk by chunk.
//!
//! Only what the direct path serves is accepted here: an HTTP/1.1 request without a body, in
//! origin form, that asks for no upgrade and no `Expect`. Anything else, well-formed or not, is
//! [`Parsed::Other`], and the connection's bytes go to hyper's server untouched, which answers
//! it (or refuses it) as it always has. The direct path never has to say no to a client itself.

use std::fmt::Write as _;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, StatusCode, Uri, Version};

/// Most headers in a request head, as hyper's server allows.
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Most headers in a backend's response head: a session's changes come as headers, one each.
pub const MAX_RESPONSE_HEADERS: usize = 256;
/// Headers the proxy adds to a request and to a response, reserved in their maps up front.
const ADDED_REQUEST_HEADERS: usize = 8;
const ADDED_RESPONSE_HEADERS: usize = 4;
/// Longest chunk-size line (with its extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of a chunked body's trailer section, which is read and dropped.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// A request head the direct path can serve.
pub struct RequestHead {
    /// The request, without a body: method, target (origin form), `HTTP/1.1`, headers.
    pub request: Request<()>,
    /// Whether the client asked to close the connection after this request.
    pub close: bool,
    /// Whether the client takes trailers (`TE: trailers`).
    pub trailers: bool,
}

/// What the bytes at the start of a client's buffer are.
// Returned once per request and taken apart at once: boxing the head would cost an allocation
// per request for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A complete head the direct path serves; its bytes have been taken from the buffer.
    Direct(RequestHead),
    /// Not a whole head yet.
    Partial,
    /// Anything else: hyper's server is to read it from the same bytes.
    Other,
}

/// Parses the request head at the start of `buf`; a [`Parsed::Direct`] head is split off it.
pub fn parse_request(buf: &mut BytesMut) -> Parsed {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Other;
    };
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) if m != Method::CONNECT => m,
        _ => return Parsed::Other,
    };
    if !path.starts_with('/') {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    // Offsets into a head of at most a few hundred KiB.
    let span = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
    let path = span(path.as_bytes());
    let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_REQUEST_HEADERS];
    let count = req.headers.len();
    for (slot, h) in fields.iter_mut().zip(req.headers.iter()) {
        let (n, nl) = span(h.name.as_bytes());
        let (v, vl) = span(h.value);
        *slot = (n, nl, v, vl);
    }
    let head = buf.split_to(len).freeze();
    match build_request(&head, method, path, &fields[..count]) {
        Some(parsed) => Parsed::Direct(parsed),
        None => {
            // Put back for hyper, in front of whatever followed it.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Parsed::Other
        }
    }
}

/// The request of a parsed head, if the direct path serves it: no body (no `Transfer-Encoding`,
/// a `Content-Length` of 0 if any), no `Expect`, no `Upgrade`, every header a valid name and value.
fn build_request(
    head: &Bytes,
    method: Method,
    (path_at, path_len): (u32, u32),
    fields: &[(u32, u32, u32, u32)],
) -> Option<RequestHead> {
    let at = |at: u32, len: u32| at as usize..(at + len) as usize;
    let path = PathAndQuery::from_maybe_shared(head.slice(at(path_at, path_len))).ok()?;
    // Room for what the proxy adds (forwarding headers, the request id, the session's status)
    // without growing the map.
    let mut headers = HeaderMap::with_capacity(fields.len() + ADDED_REQUEST_HEADERS);
    let (mut close, mut trailers) = (false, false);
    for &(n, nl, v, vl) in fields {
        let name = HeaderName::from_bytes(&head[at(n, nl)]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(at(v, vl))).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return None;
        }
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0" {
            return None;
        }
        if name == header::CONNECTION {
            close |= tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name == header::TE {
            trailers |= tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from(path);
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(RequestHead {
        request,
        close,
        trailers,
    })
}

/// The comma-separated tokens of one header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// How a backend's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a HEAD's answer, 204, 304).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// A backend's response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The final status (interim 1xx answers are skipped).
    pub status: StatusCode,
    /// The headers as sent, values sharing the head's buffer; empty when the head was plain
    /// (see [`parse_response`]), its header lines then being written to `lines`.
    pub headers: HeaderMap,
    /// Whether the head was plain: its headers are in the `lines` given to [`parse_response`]
    /// (left empty otherwise), ready to be written back out, and none of them needs the proxy's
    /// attention.
    pub plain: bool,
    /// Whether those lines include a `Date`.
    pub dated: bool,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the backend connection can carry another request once the body is read.
    pub reusable: bool,
}

/// Why a backend's response head cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not HTTP/1 as `httparse` reads it.
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    /// A status, header name or value that is not valid.
    #[error("invalid header in the response")]
    InvalidHeader,
    /// A `Content-Length` that is not a number, or two that differ.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    /// A head larger than the limit.
    #[error("response head larger than {0} bytes")]
    TooLarge(usize),
}

/// Parses the response head at the start of `buf` (the answer to a `method` request): `None`
/// until it is whole. An interim (1xx other than 101) response is skipped.
///
/// A head is *plain* when none of its headers needs the proxy's attention beyond being left
/// out: no `Transfer-Encoding` or `Upgrade`, no `Connection` that names other headers, and no
/// name that `special` picks out (the session protocol's headers, the request id). Its header
/// lines, less the hop-by-hop ones (`Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`), are
/// then written to `lines` (`name: value` and CRLF each, as the backend sent them), to be copied
/// to the client as they are, and no header map is built: most responses of most backends are
/// plain.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    limit: usize,
    (special, lines): (&Special<'_>, &mut Vec<u8>),
) -> Result<Option<ResponseHead>, ResponseError> {
    loop {
        let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= limit => {
                return Err(ResponseError::TooLarge(limit))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ResponseError::Malformed(e)),
        };
        if len > limit {
            return Err(ResponseError::TooLarge(limit));
        }
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| ResponseError::InvalidHeader)?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let http11 = resp.version == Some(1);
        let base = buf.as_ptr() as usize;
        let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
        let count = resp.headers.len();
        for (slot, h) in fields.iter_mut().zip(resp.headers.iter()) {
            *slot = (
                (h.name.as_ptr() as usize - base) as u32,
                h.name.len() as u32,
                (h.value.as_ptr() as usize - base) as u32,
                h.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let at = |at: u32, len: u32| at as usize..(at + len) as usize;
        let fields = &fields[..count];
        let (mut length, mut dated, mut plain) = (None, false, true);
        let (mut chunked, mut encoded, mut close) = (false, false, !http11);
        for &(n, nl, v, vl) in fields {
            let (name, value) = (&head[at(n, nl)], &head[at(v, vl)]);
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(value).ok_or(ResponseError::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ResponseError::ContentLength);
                }
                // Several that agree (`2` and `02`) go on as one, through the map.
                plain &= length.is_none();
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"date") {
                dated = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        close &= http11;
                    } else if !t.is_empty() {
                        // It names headers that go no further.
                        plain = false;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                encoded = true;
                plain = false;
                // Only the last coding says whether the body is chunked.
                chunked = tokens(value)
                    .filter(|t| !t.is_empty())
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"upgrade") || special(name) {
                plain = false;
            }
        }
        lines.clear();
        let headers = if plain {
            for &(n, nl, v, vl) in fields {
                let name = &head[at(n, nl)];
                // Hop-by-hop: they go no further.
                if DROPPED.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                    continue;
                }
                lines.extend_from_slice(name);
                lines.extend_from_slice(b": ");
                lines.extend_from_slice(&head[at(v, vl)]);
                lines.extend_from_slice(b"\r\n");
            }
            HeaderMap::new()
        } else {
            // Room for the request id and the cookies the proxy adds.
            let mut headers = HeaderMap::with_capacity(count + ADDED_RESPONSE_HEADERS);
            for &(n, nl, v, vl) in fields {
                let name = HeaderName::from_bytes(&head[at(n, nl)])
                    .map_err(|_| ResponseError::InvalidHeader)?;
                let value = HeaderValue::from_maybe_shared(head.slice(at(v, vl)))
                    .map_err(|_| ResponseError::InvalidHeader)?;
                headers.append(name, value);
            }
            if let Some(n) = length {
                if headers
                    .get_all(header::CONTENT_LENGTH)
                    .iter()
                    .nth(1)
                    .is_some()
                {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
            }
            headers
        };
        let bodiless = *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS;
        let framing = match (bodiless, encoded, chunked, length) {
            (true, ..) => Framing::None,
            (false, true, true, _) => Framing::Chunked,
            (false, true, false, _) => Framing::Close,
            (false, false, _, Some(n)) => Framing::Length(n),
            (false, false, _, None) => Framing::Close,
        };
        // Both framings at once: the message is suspect, the connection is not used again.
        let reusable = !close && framing != Framing::Close && !(encoded && length.is_some());
        return Ok(Some(ResponseHead {
            status,
            headers,
            plain,
            // A head taken apart may lose its Date to a Connection that names it.
            dated: plain && dated,
            framing,
            reusable,
        }));
    }
}

/// Picks out the response header names the proxy has to look at.
pub type Special<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// The hop-by-hop headers of a response (RFC 9110, 7.6.1) that a plain head may have, and
/// that are left out of its lines: a `Connection` that names no other header, and the rest.
const DROPPED: [&[u8]; 4] = [b"connection", b"keep-alive", b"proxy-connection", b"te"];

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes the start of a request head: `method path HTTP/1.1`, then `headers`; the caller adds
/// its own header lines (each ending in CRLF) and the blank line.
pub fn write_request_start(
    out: &mut Vec<u8>,
    (method, path): (&Method, &str),
    headers: &HeaderMap,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_headers(out, headers);
}

/// Writes a response head: the status line, the header `lines` already written (CRLF each) and
/// `headers`, a `Date` when `dated` says they have none (as hyper's server adds one), the
/// request id, `extra` header lines (each ending in CRLF) and the blank line.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    (lines, headers, dated): (&[u8], &HeaderMap, bool),
    request_id: &HeaderValue,
    extra: &[&str],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(lines);
    write_headers(out, headers);
    if !dated && !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    for line in extra {
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes `data` as one chunk of a chunked body.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = String::with_capacity(16);
    let _ = write!(size, "{:x}\r\n", data.len());
    out.extend_from_slice(size.as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body, without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Writes the end of a chunked body with the trailer fields of `raw` (lines as the backend sent
/// them) that `keep` accepts by name. A line that is not a valid field is left out.
pub fn write_last_chunk(out: &mut Vec<u8>, raw: &[u8], keep: impl Fn(&HeaderName) -> bool) {
    out.extend_from_slice(b"0\r\n");
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let Ok(name) = HeaderName::from_bytes(&line[..colon]) else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()) else {
            continue;
        };
        if keep(&name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a chunked body from the backend cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk-size line that is not hex digits (and extensions), or too long.
    #[error("malformed chunk size line")]
    SizeLine,
    /// A chunk's data not followed by its line end.
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    /// A trailer section past its bound.
    #[error("trailer section larger than {MAX_TRAILER_BYTES} bytes")]
    Trailers,
}

/// Reads a chunked body as it arrives, handing out its data; the trailer section is read and,
/// when asked for, kept as it came (at most [`MAX_TRAILER_BYTES`]) for [`write_last_chunk`].
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    keep_trailers: bool,
    trailers: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk-size line.
    #[default]
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// In the trailer section, this many bytes of it read so far.
    Trailers(usize),
    /// The body is complete.
    Done,
}

/// What [`ChunkedDecoder::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body data.
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The body has ended.
    End,
}

impl ChunkedDecoder {
    /// A decoder that keeps the trailer section when `keep_trailers`.
    pub fn new(keep_trailers: bool) -> Self {
        ChunkedDecoder {
            keep_trailers,
            ..Default::default()
        }
    }

    /// The trailer section's lines, once the body has ended (empty unless kept).
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// The next piece of the body from `buf`, consuming what it reads.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Chunk, ChunkError> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Chunk::End),
                ChunkState::Size => {
                    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(ChunkError::SizeLine)
                        } else {
                            Ok(Chunk::More)
                        };
                    };
                    if eol > MAX_CHUNK_LINE {
                        return Err(ChunkError::SizeLine);
                    }
                    let size = chunk_size(&buf[..eol]).ok_or(ChunkError::SizeLine)?;
                    buf.advance(eol + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => match buf.first() {
                    None => return Ok(Chunk::More),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.state = ChunkState::Size;
                    }
                    Some(b'\r') if buf.len() < 2 => return Ok(Chunk::More),
                    Some(b'\r') if buf[1] == b'\n' => {
                        buf.advance(2);
                        self.state = ChunkState::Size;
                    }
                    Some(_) => return Err(ChunkError::DataEnd),
                },
                ChunkState::Trailers(read) => {
                    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                        return if read + buf.len() > MAX_TRAILER_BYTES {
                            Err(ChunkError::Trailers)
                        } else {
                            Ok(Chunk::More)
                        };
                    };
                    let read = read + eol + 1;
                    if read > MAX_TRAILER_BYTES {
                        return Err(ChunkError::Trailers);
                    }
                    let blank = buf[..eol].iter().all(|&b| b == b'\r');
                    if self.keep_trailers && !blank {
                        self.trailers.extend_from_slice(&buf[..eol + 1]);
                    }
                    buf.advance(eol + 1);
                    self.state = if blank {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailers(read)
                    };
                }
            }
        }
    }
}

/// The size of a chunk-size line (without its LF): hex digits, then optional whitespace and
/// extensions, which are dropped.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// The `Date` header's value, made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime};

    thread_local! {
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }

    pub fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                c.1.clear();
                c.1.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
                c.0 = secs;
            }
            out.extend_from_slice(&c.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(raw: &[u8]) -> (RequestHead, BytesMut) {
        let mut buf = BytesMut::from(raw);
        match parse_request(&mut buf) {
            Parsed::Direct(head) => (head, buf),
            Parsed::Partial => panic!("partial"),
            Parsed::Other => panic!("other"),
        }
    }

    fn is_other(raw: &[u8]) -> bool {
        let mut buf = BytesMut::from(raw);
        let other = matches!(parse_request(&mut buf), Parsed::Other);
        // Nothing is taken from a head handed to hyper.
        assert_eq!(&buf[..], raw);
        other
    }

    #[test]
    fn a_plain_get_is_served_directly_and_the_next_request_stays() {
        let (head, rest) = direct(
            b"GET /cart?x=1 HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /n",
        );
        let req = head.request;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/cart");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers()["host"], "a");
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert!(!head.close);
        assert_eq!(&rest[..], b"GET /n");
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n"[..]);
        assert!(matches!(parse_request(&mut buf), Parsed::Partial));
        assert_eq!(buf.len(), 25);
    }

    #[test]
    fn connection_close_is_noticed() {
        let (head, _) =
            direct(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(head.close);
    }

    #[test]
    fn everything_but_a_bodiless_origin_form_http11_request_goes_to_hyper() {
        assert!(is_other(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(is_other(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        ));
        assert!(is_other(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(is_other(
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        ));
        assert!(is_other(
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(is_other(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_other(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_other(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_other(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n"
        ));
        // Malformed: hyper answers them.
        assert!(is_other(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"));
        assert!(is_other(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"));
        assert!(is_other(b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n"));
        let many: String = (0..=MAX_REQUEST_HEADERS)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        assert!(is_other(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()));
    }

    #[test]
    fn a_body_of_zero_length_is_direct() {
        let (head, rest) = direct(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(head.request.method(), Method::POST);
        assert!(rest.is_empty());
    }

    fn response(raw: &[u8], method: &Method) -> Result<Option<ResponseHead>, ResponseError> {
        parse_response(
            &mut BytesMut::from(raw),
            method,
            64 * 1024,
            (&|_| false, &mut Vec::new()),
        )
    }

    /// A head with nothing for the proxy to look at comes out as header lines, as sent; any
    /// hop-by-hop or special header makes it a header map, to be taken apart.
    #[test]
    fn plain_heads_are_copied_as_lines() {
        let special = |name: &[u8]| name.eq_ignore_ascii_case(b"x-special");
        let parse = |raw: &[u8], lines: &mut Vec<u8>| {
            parse_response(
                &mut BytesMut::from(raw),
                &Method::GET,
                64 * 1024,
                (&special, lines),
            )
            .unwrap()
            .unwrap()
        };
        let mut lines = b"left over".to_vec();
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nDate:  d \r\n\r\nok",
            &mut lines,
        );
        assert!(r.plain && r.dated && r.headers.is_empty());
        assert_eq!(r.framing, Framing::Length(2));
        assert_eq!(
            lines,
            b"Content-Length: 2\r\nSet-Cookie: a=1\r\nDate: d\r\n".to_vec()
        );
        for raw in [
            &b"HTTP/1.1 200 OK\r\nX-Special: 1\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let r = parse(raw, &mut lines);
            assert!(!r.plain && !r.headers.is_empty() && !r.dated);
        }
        // Connection and Keep-Alive that name nothing else are left out of a plain head's lines,
        // and still say whether the connection can be used again.
        let r = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
            &mut lines,
        );
        assert!(r.plain && r.reusable);
        assert_eq!(lines, b"X-A: 1\r\nContent-Length: 0\r\n".to_vec());
        let r = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            &mut lines,
        );
        assert!(r.plain && !r.reusable);
        let r = parse(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            &mut lines,
        );
        assert!(r.plain && r.reusable);
        // A plain head's framing is read from it all the same.
        let r = parse(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", &mut lines);
        assert!(r.plain && !r.reusable);
        assert_eq!(r.framing, Framing::Close);
        let r = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &mut lines);
        assert!(r.plain && !r.reusable);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let get = &Method::GET;
        let f = |raw: &[u8]| response(raw, get).unwrap().unwrap();
        let r = f(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!((r.framing, r.reusable), (Framing::Length(5), true));
        let r = f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::Chunked, true));
        let r = f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::Chunked, false));
        let r = f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::Close, false));
        let r = f(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::Close, false));
        let r = f(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::Length(5), false));
        let r = f(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert!(!r.reusable);
        let r = f(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.framing, Framing::None);
        let r = f(b"HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!((r.framing, r.reusable), (Framing::None, true));
        let r = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(r.unwrap().unwrap().framing, Framing::None);
        // Interim responses are skipped.
        let r = f(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((r.status, r.framing), (StatusCode::OK, Framing::Length(0)));
    }

    #[test]
    fn broken_response_heads_are_errors() {
        let get = &Method::GET;
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(
                response(bad, get).unwrap_err(),
                ResponseError::ContentLength
            );
        }
        assert!(matches!(
            response(b"HTTP/1.1 2x0 OK\r\n\r\n", get),
            Err(ResponseError::Malformed(_))
        ));
        let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(70 * 1024));
        assert_eq!(
            response(big.as_bytes(), get).unwrap_err(),
            ResponseError::TooLarge(64 * 1024)
        );
        assert!(response(b"HTTP/1.1 200 OK\r\nX: 1\r\n", get)
            .unwrap()
            .is_none());
        let same = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 02\r\n\r\n",
            get,
        )
        .unwrap()
        .unwrap();
        assert_eq!(same.framing, Framing::Length(2));
        // Passed on as one.
        assert!(!same.plain);
        let lengths: Vec<_> = same
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["2"]);
    }

    fn decode_all(parts: &[&[u8]]) -> Result<Vec<u8>, ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in parts {
            buf.extend_from_slice(part);
            loop {
                match d.next(&mut buf)? {
                    Chunk::Data(b) => out.extend_from_slice(&b),
                    Chunk::More => break,
                    Chunk::End => {
                        assert!(buf.is_empty(), "left over: {buf:?}");
                        return Ok(out);
                    }
                }
            }
        }
        panic!("body did not end");
    }

    #[test]
    fn chunked_bodies_decode_whole_or_byte_by_byte() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Session-Set-user: mallory\r\n\r\n";
        assert_eq!(decode_all(&[body]).unwrap(), b"hello world");
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode_all(&bytes).unwrap(), b"hello world");
        assert_eq!(
            decode_all(&[b"A\nabcdefghij\n0\n\n"]).unwrap(),
            b"abcdefghij"
        );
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        assert_eq!(decode_all(&[b"z\r\n"]), Err(ChunkError::SizeLine));
        assert_eq!(decode_all(&[b"\r\n"]), Err(ChunkError::SizeLine));
        assert_eq!(decode_all(&[b"1 x\r\n"]), Err(ChunkError::SizeLine));
        assert_eq!(
            decode_all(&[b"1000000000000000\r\n"]),
            Err(ChunkError::SizeLine)
        );
        assert_eq!(decode_all(&[b"1\r\nab\r\n"]), Err(ChunkError::DataEnd));
        let long_line = format!("1;{}", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode_all(&[long_line.as_bytes()]),
            Err(ChunkError::SizeLine)
        );
        let trailers = format!("0\r\n{}", "X: y\r\n".repeat(MAX_TRAILER_BYTES / 6 + 1));
        assert_eq!(
            decode_all(&[trailers.as_bytes()]),
            Err(ChunkError::Trailers)
        );
    }

    #[test]
    fn trailers_are_kept_when_asked_for_and_filtered_by_name() {
        let mut d = ChunkedDecoder::new(true);
        let mut buf =
            BytesMut::from(&b"0\r\nX-Session-Set-a: 1\r\nX-Sum: abc \r\nbroken\r\n\r\n"[..]);
        assert_eq!(d.next(&mut buf), Ok(Chunk::End));
        let mut out = Vec::new();
        write_last_chunk(&mut out, d.trailers(), |n| {
            !n.as_str().starts_with("x-session-")
        });
        assert_eq!(out, b"0\r\nx-sum: abc\r\n\r\n");
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"0\r\nX-Sum: abc\r\n\r\n"[..]);
        assert_eq!(d.next(&mut buf), Ok(Chunk::End));
        assert!(d.trailers().is_empty());
    }

    #[test]
    fn heads_are_written_back_out() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a"));
        let mut out = Vec::new();
        write_request_start(&mut out, (&Method::GET, "/x?y"), &h);
        assert_eq!(out, b"GET /x?y HTTP/1.1\r\nhost: a\r\n");
        out.clear();
        h.insert("date", HeaderValue::from_static("d"));
        let id = HeaderValue::from_static("r1");
        write_response_head(
            &mut out,
            StatusCode::NOT_FOUND,
            (b"x-a: 1\r\n", &h, false),
            &id,
            &["connection: close\r\n", "transfer-encoding: chunked\r\n"],
        );
        assert_eq!(
            out,
            &b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\nhost: a\r\ndate: d\r\nx-request-id: r1\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
                [..]
        );
        // Lines that carry a date get no second one.
        out.clear();
        write_response_head(
            &mut out,
            StatusCode::OK,
            (b"Date: d\r\n", &HeaderMap::new(), true),
            &id,
            &[],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nDate: d\r\nx-request-id: r1\r\n\r\n"
        );
        out.clear();
        write_chunk(&mut out, b"hello world!!!!!!");
        assert_eq!(out, b"11\r\nhello world!!!!!!\r\n");
    }
}
