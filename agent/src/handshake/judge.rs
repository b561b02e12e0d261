//! The verdict on one HTTP request head.

use std::net::IpAddr;

use base64::prelude::{BASE64_STANDARD, Engine};

use super::ticket::{self, TicketError};

/// Every reason a handshake is rejected: a fixed set, documented in the
/// README, used in logs, events and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    BadOrigin,
    MissingOrigin,
    BadPath,
    BadHost,
    NotAnUpgrade,
    BadVersion,
    BadKey,
    TooLarge,
    Deadline,
    TicketMissing,
    TicketExpired,
    TicketBadSignature,
    TicketWrongIp,
    /// A single-use ticket presented a second time.
    TicketReplayed,
    /// The replay cache of single-use tickets is full of live tickets.
    TicketCacheFull,
    /// `Origin`, `Host`, `Upgrade`, `Connection`, `Sec-WebSocket-Key`,
    /// `Sec-WebSocket-Version`, `Content-Length` or the ticket parameter
    /// given twice: servers differ in which one they read.
    DuplicateHeader,
    /// A `Connection` value that is not a clean comma-separated token list.
    BadConnectionHeader,
    /// A header line continued on the next line (obsolete line folding).
    ObsFold,
    /// Whitespace between a header name and its colon.
    SpaceBeforeColon,
    /// A control character (NUL, a bare CR, ...) in the head.
    ControlCharacter,
    /// A line that ends in a bare LF rather than CRLF.
    BareLf,
    /// An absolute-form target whose authority is not the `Host` header.
    HostMismatch,
    /// An encoded `/`, `\`, `.` or NUL, a raw `\`, or a `.`/`..` segment
    /// in the path: servers resolve these differently.
    AmbiguousPath,
    /// `Transfer-Encoding`, or a `Content-Length` that is not one plain
    /// number: where the request ends is ambiguous.
    AmbiguousFraming,
    /// The agent's table of connections awaiting a verdict was full.
    TooManyPending,
    /// Stream bytes of the connection could not be handed to the agent, or
    /// it could not enter inspection: it cannot be judged.
    InspectionLost,
    /// The ticket's user has `concurrent_connections` open already.
    UserConcurrency,
    /// The ticket's user opened `new_connections` too fast.
    UserConnectionRate,
    /// The ticket's user is banned.
    UserBanned,
    /// The kernel's user map has no room for the ticket's user (no idle
    /// user to forget): its bytes could not be held to a budget.
    UserTableFull,
}

impl Rejection {
    pub const fn name(self) -> &'static str {
        match self {
            Rejection::BadOrigin => "bad_origin",
            Rejection::MissingOrigin => "missing_origin",
            Rejection::BadPath => "bad_path",
            Rejection::BadHost => "bad_host",
            Rejection::NotAnUpgrade => "not_an_upgrade",
            Rejection::BadVersion => "bad_version",
            Rejection::BadKey => "bad_key",
            Rejection::TooLarge => "too_large",
            Rejection::Deadline => "deadline",
            Rejection::TicketMissing => "ticket_missing",
            Rejection::TicketExpired => "ticket_expired",
            Rejection::TicketBadSignature => "ticket_bad_signature",
            Rejection::TicketWrongIp => "ticket_wrong_ip",
            Rejection::TicketReplayed => "ticket_replayed",
            Rejection::TicketCacheFull => "ticket_cache_full",
            Rejection::DuplicateHeader => "duplicate_header",
            Rejection::BadConnectionHeader => "bad_connection_header",
            Rejection::ObsFold => "obs_fold",
            Rejection::SpaceBeforeColon => "space_before_colon",
            Rejection::ControlCharacter => "control_character",
            Rejection::BareLf => "bare_lf",
            Rejection::HostMismatch => "host_mismatch",
            Rejection::AmbiguousPath => "ambiguous_path",
            Rejection::AmbiguousFraming => "ambiguous_framing",
            Rejection::TooManyPending => "too_many_pending",
            Rejection::InspectionLost => "inspection_lost",
            Rejection::UserConcurrency => "user_concurrency",
            Rejection::UserConnectionRate => "user_connection_rate",
            Rejection::UserBanned => "user_banned",
            Rejection::UserTableFull => "user_table_full",
        }
    }

    /// Whether the rejection says something about the client's address, so
    /// that it counts towards `failures_before_ban`. Rejections caused by
    /// the agent's own limits never do, and neither do a user's: the
    /// address may be shared by many users (a NAT), and the user has its
    /// own ban.
    pub const fn counts_towards_ban(self) -> bool {
        !matches!(
            self,
            Rejection::TooManyPending
                | Rejection::InspectionLost
                | Rejection::TicketCacheFull
                | Rejection::UserConcurrency
                | Rejection::UserConnectionRate
                | Rejection::UserBanned
                | Rejection::UserTableFull
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A valid upgrade that meets the policy.
    Accept,
    /// A plain HTTP request, allowed by `non_upgrade_requests = "allow"`.
    AcceptPlainHttp,
    /// The head is not complete yet.
    Incomplete,
    Reject(Rejection),
}

/// What a policy does with a request of a kind (one without `Origin`, or
/// one that is not an upgrade): let it through or reject it. Read straight
/// from the config (`"allow"` or `"reject"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowOrReject {
    Allow,
    Reject,
}

/// An allowed Origin: exactly `scheme://host[:port]`, or with a `*.`
/// wildcard for any subdomain (`https://*.example.com` matches
/// `https://a.example.com` and `https://a.b.example.com`, never
/// `https://example.com` or `https://evil-example.com`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Lowercased host; for a wildcard, the suffix after `*.`.
    host: String,
    wildcard: bool,
    port: u16,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `scheme://host[:port]` (host may be `[v6]`) into its normalised
/// parts, with the scheme's default port when none is given.
fn split_origin(origin: &str) -> Option<(String, String, u16)> {
    let (scheme, authority) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            (format!("[{v6}]"), after.strip_prefix(':'))
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port(&scheme)?,
    };
    if host.is_empty() || default_port(&scheme).is_none() {
        return None;
    }
    Some((scheme, host.to_ascii_lowercase(), port))
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let err = || {
            format!(
                "\"{text}\" is not an origin such as \"https://app.example.com\" or \"https://*.example.com\""
            )
        };
        let (scheme, host, port) = split_origin(text).ok_or_else(err)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                (suffix.to_string(), true)
            }
            _ if host.contains('*') => return Err(err()),
            _ => (host, false),
        };
        Ok(OriginPattern {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    pub fn matches(&self, origin: &str) -> bool {
        let Some((scheme, host, port)) = split_origin(origin) else {
            return false;
        };
        if scheme != self.scheme || port != self.port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

/// An allowed request path: exact (`/ws`), or a prefix by whole segments
/// (`/live/*` matches `/live/a` and `/live/a/b`, not `/live` or `/lively`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    path: String,
    prefix: bool,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        if !text.starts_with('/') {
            return Err(format!("path \"{text}\" must start with /"));
        }
        match text.strip_suffix("/*") {
            Some(base) if !base.contains('*') => Ok(PathPattern {
                path: format!("{base}/"),
                prefix: true,
            }),
            _ if text.contains('*') => Err(format!(
                "path \"{text}\": only a trailing /* is allowed as a wildcard"
            )),
            _ => Ok(PathPattern {
                path: text.to_string(),
                prefix: false,
            }),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.len() > self.path.len() && path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

#[derive(Clone, Debug)]
pub struct TicketPolicy {
    pub required: bool,
    pub secret: Vec<u8>,
    pub query_param: String,
    pub max_age_secs: u64,
    pub bind_to_source_ip: bool,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub allowed_origins: Vec<OriginPattern>,
    pub missing_origin: AllowOrReject,
    /// Empty: any host.
    pub allowed_hosts: Vec<String>,
    /// Empty: any path.
    pub allowed_paths: Vec<PathPattern>,
    pub max_request_bytes: usize,
    pub non_upgrade_requests: AllowOrReject,
    pub ticket: Option<TicketPolicy>,
}

/// Headers kept for judging; a head with more is too large to be sane.
const MAX_HEADERS: usize = 64;

/// Headers that decide a verdict or where the request ends: each may appear
/// once, since servers differ in whether they take the first, the last or
/// all of them.
const SINGLE_HEADERS: [&str; 7] = [
    "origin",
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "content-length",
];

/// What the judge makes of the bytes at the start of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The head is not complete yet.
    Incomplete,
    /// A valid upgrade that meets the policy, `head_len` bytes long; with the
    /// ticket it presented, for the single-use check.
    Upgrade {
        head_len: usize,
        ticket: Option<ticket::Ticket>,
    },
    /// A plain HTTP request allowed by the policy: `head_len` bytes of head,
    /// then `body_len` bytes of body.
    PlainHttp {
        head_len: usize,
        body_len: u64,
    },
    Reject(Rejection),
}

/// The verdict alone (tests and the fuzz target).
pub fn judge(policy: &Policy, head: &[u8], source: IpAddr, now: u64) -> Verdict {
    match judge_request(policy, head, source, now) {
        Judgement::Incomplete => Verdict::Incomplete,
        Judgement::Upgrade { .. } => Verdict::Accept,
        Judgement::PlainHttp { .. } => Verdict::AcceptPlainHttp,
        Judgement::Reject(r) => Verdict::Reject(r),
    }
}

/// Reads the head line by line, in order, so that the first problem in the
/// bytes decides the reason, however the bytes arrived: the end of the head
/// (the index after its blank line), `None` while incomplete, or the reason
/// the bytes can never be a head two conforming parsers read alike.
fn scan_head(bytes: &[u8], limit: usize) -> Result<Option<usize>, Rejection> {
    let window = &bytes[..bytes.len().min(limit + 2)];
    let mut start = 0;
    let mut first = true;
    let is_control = |b: u8| b == b'\r' || b == 0x7f || (b < 0x20 && b != b'\t');
    while let Some(lf) = window[start..].iter().position(|b| *b == b'\n') {
        let end = start + lf + 1;
        let crlf = lf > 0 && window[start + lf - 1] == b'\r';
        let line = &window[start..start + lf - usize::from(crlf)];
        // Control characters first: they are seen before the line ends.
        if line.iter().any(|&b| is_control(b)) {
            return Err(Rejection::ControlCharacter);
        }
        if !crlf {
            return Err(Rejection::BareLf);
        }
        if !first && line.is_empty() {
            return Ok(Some(end));
        }
        if !first {
            if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                return Err(Rejection::ObsFold);
            }
            if let Some(colon) = line.iter().position(|b| *b == b':') {
                if line[..colon]
                    .last()
                    .is_some_and(|b| *b == b' ' || *b == b'\t')
                {
                    return Err(Rejection::SpaceBeforeColon);
                }
            }
        }
        // What httparse makes of the lines so far (it stops at the first
        // error, so this keeps the order too).
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&window[..end]) {
            Err(httparse::Error::TooManyHeaders) => return Err(Rejection::TooLarge),
            Err(_) => return Err(Rejection::NotAnUpgrade),
            Ok(_) => {}
        }
        first = false;
        start = end;
    }
    // The line in progress: a control character is wrong wherever it ends
    // up (a CR only as its last byte may still start its CRLF).
    let tail = &window[start..];
    if tail
        .iter()
        .enumerate()
        .any(|(i, &b)| is_control(b) && !(b == b'\r' && i + 1 == tail.len()))
    {
        return Err(Rejection::ControlCharacter);
    }
    if bytes.len() > limit {
        return Err(Rejection::TooLarge);
    }
    Ok(None)
}

/// RFC 9110 §5.6.2 tchar.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A `Connection` value's tokens, or `None` when it is not a clean
/// comma-separated token list (RFC 9110 §7.6.1; empty elements are allowed).
fn connection_tokens(value: &str) -> Option<Vec<String>> {
    let mut tokens = Vec::new();
    for element in value.split(',') {
        let element = element.trim_matches([' ', '\t']);
        if element.is_empty() {
            continue;
        }
        if !is_token(element) {
            return None;
        }
        tokens.push(element.to_ascii_lowercase());
    }
    Some(tokens)
}

fn header<'a>(request: &'a httparse::Request, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| std::str::from_utf8(h.value).unwrap_or("\u{fffd}"))
        .map(|v| v.trim_matches([' ', '\t']))
}

/// The values of a query parameter (raw, not decoded).
fn query_params<'a>(target: &'a str, name: &str) -> Vec<&'a str> {
    let Some((_, query)) = target.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
        .collect()
}

/// The path to match against `allowed_paths`: percent-encoded unreserved
/// characters decoded (RFC 3986 §2.3). Rejected when servers could resolve
/// it to different resources: an encoded `/`, `\`, `.` or NUL, a raw `\`,
/// an invalid escape, or a `.` or `..` segment (which RFC 3986 §5.2.4
/// resolves but many servers and routers do not).
pub fn normalise_path(path: &str) -> Result<String, Rejection> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Rejection::AmbiguousPath),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(Rejection::AmbiguousPath)?;
                let hex = std::str::from_utf8(hex).map_err(|_| Rejection::AmbiguousPath)?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| Rejection::AmbiguousPath)?;
                match byte {
                    b'/' | b'\\' | b'.' | 0 => return Err(Rejection::AmbiguousPath),
                    b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'~' => {
                        out.push(b as char)
                    }
                    _ => {
                        out.push('%');
                        out.push_str(&hex.to_ascii_uppercase());
                    }
                }
                i += 3;
            }
            b => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    if !out.starts_with('/')
        || out
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return Err(Rejection::AmbiguousPath);
    }
    Ok(out)
}

/// Splits `host[:port]` (host may be `[v6]`) into the lowercased host and
/// the port, if any.
fn split_host(host: &str) -> (String, Option<&str>) {
    let lower = host.to_ascii_lowercase();
    let cut = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else if host.matches(':').count() == 1 {
        host.find(':')
    } else {
        None
    };
    match cut {
        Some(at) => (lower[..at].to_string(), Some(&host[at + 1..])),
        None => (lower, None),
    }
}

/// Judges the bytes at the start of a stream (one request, possibly
/// followed by more bytes) from `source` at `now` (Unix seconds).
pub fn judge_request(policy: &Policy, bytes: &[u8], source: IpAddr, now: u64) -> Judgement {
    let end = match scan_head(bytes, policy.max_request_bytes) {
        Ok(Some(end)) => end,
        Ok(None) => return Judgement::Incomplete,
        Err(r) => return Judgement::Reject(r),
    };
    let head = &bytes[..end];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == end => {}
        Err(httparse::Error::TooManyHeaders) => return Judgement::Reject(Rejection::TooLarge),
        _ => return Judgement::Reject(Rejection::NotAnUpgrade),
    }
    for name in SINGLE_HEADERS {
        if request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
            > 1
        {
            return Judgement::Reject(Rejection::DuplicateHeader);
        }
    }
    if request
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Judgement::Reject(Rejection::AmbiguousFraming);
    }
    let body_len = match header(&request, "Content-Length") {
        None => 0,
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.len() <= 15 => {
            v.parse::<u64>().unwrap_or(0)
        }
        Some(_) => return Judgement::Reject(Rejection::AmbiguousFraming),
    };
    let connection = match header(&request, "Connection").map(connection_tokens) {
        None => Vec::new(),
        Some(Some(tokens)) => tokens,
        Some(None) => return Judgement::Reject(Rejection::BadConnectionHeader),
    };
    // Anything a lenient server might take as an upgrade is judged as one:
    // only a request with no sign of an upgrade is plain HTTP.
    let looks_like_upgrade = connection.iter().any(|t| t == "upgrade")
        || request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade")
                || h.name.len() >= 14 && h.name[..14].eq_ignore_ascii_case("sec-websocket-")
        });
    let target = request.path.unwrap_or("");
    // Absolute form (RFC 9112 §3.2.2): its authority must be the Host header.
    let (authority, path_and_query) = match target.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") =>
        {
            let at = rest.find(['/', '?']).unwrap_or(rest.len());
            (Some(&rest[..at]), &rest[at..])
        }
        Some(_) => return Judgement::Reject(Rejection::NotAnUpgrade),
        None => (None, target),
    };
    let host = header(&request, "Host");
    if let Some(authority) = authority {
        if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
            return Judgement::Reject(Rejection::HostMismatch);
        }
    }
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    let raw_path = path_and_query.split(['?', '#']).next().unwrap_or("");
    let path = match normalise_path(raw_path) {
        Ok(p) => p,
        Err(r) => return Judgement::Reject(r),
    };

    if !looks_like_upgrade {
        if policy.non_upgrade_requests == AllowOrReject::Reject {
            return Judgement::Reject(Rejection::NotAnUpgrade);
        }
        return Judgement::PlainHttp {
            head_len: end,
            body_len,
        };
    }
    let is_valid_upgrade = request.method == Some("GET")
        && request.version == Some(1)
        && body_len == 0
        && connection.iter().any(|t| t == "upgrade")
        && header(&request, "Upgrade")
            .and_then(connection_tokens)
            .is_some_and(|t| t.iter().any(|t| t == "websocket"));
    if !is_valid_upgrade {
        return Judgement::Reject(Rejection::NotAnUpgrade);
    }
    if header(&request, "Sec-WebSocket-Version") != Some("13") {
        return Judgement::Reject(Rejection::BadVersion);
    }
    let key_ok = header(&request, "Sec-WebSocket-Key")
        .and_then(|k| BASE64_STANDARD.decode(k).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Judgement::Reject(Rejection::BadKey);
    }
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Judgement::Reject(Rejection::BadHost);
    };
    if !policy.allowed_hosts.is_empty() {
        let (bare, port) = split_host(host);
        let full = host.to_ascii_lowercase();
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
        if !port_ok
            || !policy
                .allowed_hosts
                .iter()
                .any(|allowed| *allowed == full || *allowed == bare)
        {
            return Judgement::Reject(Rejection::BadHost);
        }
    }
    if !policy.allowed_paths.is_empty() && !policy.allowed_paths.iter().any(|p| p.matches(&path)) {
        return Judgement::Reject(Rejection::BadPath);
    }
    match header(&request, "Origin") {
        None if policy.missing_origin == AllowOrReject::Reject => {
            return Judgement::Reject(Rejection::MissingOrigin);
        }
        Some(origin) if !policy.allowed_origins.iter().any(|p| p.matches(origin)) => {
            return Judgement::Reject(Rejection::BadOrigin);
        }
        None | Some(_) => {}
    }
    let mut presented_ticket = None;
    if let Some(t) = policy.ticket.as_ref().filter(|t| t.required) {
        let values = query_params(path_and_query, &t.query_param);
        if values.len() > 1 {
            return Judgement::Reject(Rejection::DuplicateHeader);
        }
        let Some(presented) = values.first().filter(|v| !v.is_empty()) else {
            return Judgement::Reject(Rejection::TicketMissing);
        };
        match ticket::verify(
            &t.secret,
            presented,
            source,
            now,
            t.max_age_secs,
            t.bind_to_source_ip,
        ) {
            Ok(opened) => presented_ticket = Some(opened),
            Err(e) => {
                return Judgement::Reject(match e {
                    TicketError::BadSignature => Rejection::TicketBadSignature,
                    TicketError::Expired => Rejection::TicketExpired,
                    TicketError::WrongIp => Rejection::TicketWrongIp,
                });
            }
        }
    }
    Judgement::Upgrade {
        head_len: end,
        ticket: presented_ticket,
    }
}

#[cfg(test)]
mod tests;
