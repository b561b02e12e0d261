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
        }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingOrigin {
    Reject,
    Allow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonUpgrade {
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
    pub missing_origin: MissingOrigin,
    /// Empty: any host.
    pub allowed_hosts: Vec<String>,
    /// Empty: any path.
    pub allowed_paths: Vec<PathPattern>,
    pub max_request_bytes: usize,
    pub non_upgrade_requests: NonUpgrade,
    pub ticket: Option<TicketPolicy>,
}

/// Headers kept for judging; a head with more is too large to be sane.
const MAX_HEADERS: usize = 64;

fn header<'a>(request: &'a httparse::Request, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1.split('#').next()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Judges the bytes of one request head from `source` at `now` (Unix seconds).
pub fn judge(policy: &Policy, head: &[u8], source: IpAddr, now: u64) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(head);
    let too_large = head.len() > policy.max_request_bytes;
    let upgrade_or = |r: Rejection| {
        if policy.non_upgrade_requests == NonUpgrade::Allow {
            Verdict::AcceptPlainHttp
        } else {
            Verdict::Reject(r)
        }
    };
    match parsed {
        Ok(httparse::Status::Partial) if too_large => return Verdict::Reject(Rejection::TooLarge),
        Ok(httparse::Status::Partial) => return Verdict::Incomplete,
        Ok(httparse::Status::Complete(len)) if len > policy.max_request_bytes => {
            return Verdict::Reject(Rejection::TooLarge);
        }
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Verdict::Reject(Rejection::TooLarge),
        Err(_) => return Verdict::Reject(Rejection::NotAnUpgrade),
    }

    let is_upgrade = request.method == Some("GET")
        && has_token(header(&request, "Upgrade"), "websocket")
        && has_token(header(&request, "Connection"), "upgrade");
    if !is_upgrade {
        return upgrade_or(Rejection::NotAnUpgrade);
    }
    if header(&request, "Sec-WebSocket-Version") != Some("13") {
        return Verdict::Reject(Rejection::BadVersion);
    }
    let key_ok = header(&request, "Sec-WebSocket-Key")
        .and_then(|k| BASE64_STANDARD.decode(k).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Verdict::Reject(Rejection::BadKey);
    }
    if !policy.allowed_hosts.is_empty() {
        let host = header(&request, "Host").unwrap_or("").to_ascii_lowercase();
        let bare = host
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map_or(host.as_str(), |(h, _)| h);
        if !policy
            .allowed_hosts
            .iter()
            .any(|allowed| *allowed == host || *allowed == bare)
        {
            return Verdict::Reject(Rejection::BadHost);
        }
    }
    let target = request.path.unwrap_or("");
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !policy.allowed_paths.is_empty() && !policy.allowed_paths.iter().any(|p| p.matches(path)) {
        return Verdict::Reject(Rejection::BadPath);
    }
    match header(&request, "Origin") {
        None if policy.missing_origin == MissingOrigin::Reject => {
            return Verdict::Reject(Rejection::MissingOrigin);
        }
        None => {}
        Some(origin) => {
            if !policy.allowed_origins.iter().any(|p| p.matches(origin)) {
                return Verdict::Reject(Rejection::BadOrigin);
            }
        }
    }
    if let Some(t) = policy.ticket.as_ref().filter(|t| t.required) {
        let Some(presented) = query_param(target, &t.query_param).filter(|v| !v.is_empty()) else {
            return Verdict::Reject(Rejection::TicketMissing);
        };
        if let Err(e) = ticket::verify(
            &t.secret,
            presented,
            source,
            now,
            t.max_age_secs,
            t.bind_to_source_ip,
        ) {
            return Verdict::Reject(match e {
                TicketError::BadSignature => Rejection::TicketBadSignature,
                TicketError::Expired => Rejection::TicketExpired,
                TicketError::WrongIp => Rejection::TicketWrongIp,
            });
        }
    }
    Verdict::Accept
}

#[cfg(test)]
mod tests;
