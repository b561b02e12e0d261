//! Handshake tickets: short-lived, signed proof that the application's HTTP
//! side authenticated the client, bound to the client's IP address.
//!
//! Format (all integers big-endian), specified byte by byte in the README
//! ("Tickets") so that an application in any language can mint them:
//!
//! ```text
//! payload = version (1 byte, 0x01)
//!         | expires_at (8 bytes, Unix seconds)
//!         | family (1 byte: 4, 6, or 0 for a ticket bound to no address)
//!         | address (4 bytes for 4, 16 for 6, none for 0)
//!         | nonce (0 to 32 bytes: random, so that each ticket is unique)
//! tag     = HMAC-SHA256(key = secret, message = "wsguard-ticket-v1" | payload)   (32 bytes)
//! ticket  = base64url without padding (payload | tag)
//! ```

use std::net::IpAddr;

use base64::prelude::{BASE64_URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"wsguard-ticket-v1";
pub const TAG_BYTES: usize = 32;
/// Shortest secret accepted (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why a ticket was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketError {
    /// Not valid base64url, a wrong length or version, or a tag that does not
    /// match: anything not minted with the secret counts as a bad signature.
    BadSignature,
    /// Past its expiry, or expiring further ahead than the policy's max_age.
    Expired,
    /// Bound to another address than the connection's source.
    WrongIp,
}

/// A ticket's contents, once its signature checked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub expires_at: u64,
    pub address: Option<IpAddr>,
    /// The ticket's HMAC tag: what the single-use check remembers.
    pub tag: [u8; TAG_BYTES],
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(DOMAIN);
    mac
}

fn payload(expires_at: u64, address: Option<IpAddr>) -> Vec<u8> {
    let mut out = vec![VERSION];
    out.extend_from_slice(&expires_at.to_be_bytes());
    match address {
        Some(IpAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
        None => out.push(0),
    }
    out
}

/// Longest nonce a ticket may carry.
pub const MAX_NONCE_BYTES: usize = 32;
/// The nonce `mint` adds.
const NONCE_BYTES: usize = 16;

/// Mints a ticket that expires at `expires_at` (Unix seconds), bound to
/// `address` (or to none), with a random nonce: every ticket is unique, as
/// single-use tickets need.
pub fn mint(secret: &[u8], expires_at: u64, address: Option<IpAddr>) -> String {
    let mut nonce = [0u8; NONCE_BYTES];
    // SAFETY: getrandom writes at most `nonce.len()` bytes into it.
    let n = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
    assert_eq!(n, NONCE_BYTES as isize, "getrandom failed");
    mint_with_nonce(secret, expires_at, address, &nonce)
}

/// Mints a ticket with the given nonce (test vectors; `mint` picks one).
pub fn mint_with_nonce(
    secret: &[u8],
    expires_at: u64,
    address: Option<IpAddr>,
    nonce: &[u8],
) -> String {
    assert!(nonce.len() <= MAX_NONCE_BYTES);
    let mut bytes = payload(expires_at, address);
    bytes.extend_from_slice(nonce);
    let mut mac = mac(secret);
    mac.update(&bytes);
    bytes.extend_from_slice(&mac.finalize().into_bytes());
    BASE64_URL_SAFE_NO_PAD.encode(bytes)
}

/// Checks the signature (in constant time) and decodes the ticket.
pub fn open(secret: &[u8], ticket: &str) -> Result<Ticket, TicketError> {
    let bytes = BASE64_URL_SAFE_NO_PAD
        .decode(ticket.trim())
        .map_err(|_| TicketError::BadSignature)?;
    if bytes.len() < 10 + TAG_BYTES {
        return Err(TicketError::BadSignature);
    }
    let (payload, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
    let mut mac = mac(secret);
    mac.update(payload);
    mac.verify_slice(tag)
        .map_err(|_| TicketError::BadSignature)?;
    if payload[0] != VERSION {
        return Err(TicketError::BadSignature);
    }
    let expires_at = u64::from_be_bytes(payload[1..9].try_into().unwrap());
    let rest = &payload[10..];
    let (address, nonce) = match payload[9] {
        0 => (None, rest),
        4 if rest.len() >= 4 => (
            Some(IpAddr::from(<[u8; 4]>::try_from(&rest[..4]).unwrap())),
            &rest[4..],
        ),
        6 if rest.len() >= 16 => (
            Some(IpAddr::from(<[u8; 16]>::try_from(&rest[..16]).unwrap())),
            &rest[16..],
        ),
        _ => return Err(TicketError::BadSignature),
    };
    if nonce.len() > MAX_NONCE_BYTES {
        return Err(TicketError::BadSignature);
    }
    Ok(Ticket {
        expires_at,
        address,
        tag: tag.try_into().expect("split at TAG_BYTES"),
    })
}

/// Verifies a ticket for a connection from `source` at `now` (Unix seconds):
/// signed, not expired, not valid for longer than `max_age_secs`, and (with
/// `bind_to_source_ip`) bound to `source`.
pub fn verify(
    secret: &[u8],
    ticket: &str,
    source: IpAddr,
    now: u64,
    max_age_secs: u64,
    bind_to_source_ip: bool,
) -> Result<Ticket, TicketError> {
    let opened = open(secret, ticket)?;
    if opened.expires_at <= now || opened.expires_at > now.saturating_add(max_age_secs) {
        return Err(TicketError::Expired);
    }
    if bind_to_source_ip && opened.address.map(|a| a.to_canonical()) != Some(source.to_canonical())
    {
        return Err(TicketError::WrongIp);
    }
    Ok(opened)
}

/// Reads a secret file: its content with surrounding whitespace removed, at
/// least [`MIN_SECRET_BYTES`] bytes.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read the ticket secret {}: {e}", path.display()))?;
    let secret = raw.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        anyhow::bail!(
            "the ticket secret {} holds {} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. head -c 48 /dev/urandom | base64 > FILE)",
            path.display(),
            secret.len()
        );
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    #[test]
    fn a_minted_ticket_verifies_for_its_address_until_it_expires() {
        let ip: IpAddr = "198.18.0.7".parse().unwrap();
        let t = mint(SECRET, 1_000_060, Some(ip));
        let opened = verify(SECRET, &t, ip, 1_000_000, 60, true).unwrap();
        assert_eq!((opened.expires_at, opened.address), (1_000_060, Some(ip)));
        let raw = BASE64_URL_SAFE_NO_PAD.decode(&t).unwrap();
        assert_eq!(opened.tag[..], raw[raw.len() - TAG_BYTES..]);
        // The same address seen through a dual-stack socket.
        assert!(
            verify(
                SECRET,
                &t,
                "::ffff:198.18.0.7".parse().unwrap(),
                1_000_000,
                60,
                true
            )
            .is_ok()
        );
        assert_eq!(
            verify(SECRET, &t, ip, 1_000_060, 60, true),
            Err(TicketError::Expired)
        );
        assert_eq!(
            verify(SECRET, &t, ip, 1_000_000, 30, true),
            Err(TicketError::Expired),
            "lives longer than max_age"
        );
        assert_eq!(
            verify(
                SECRET,
                &t,
                "198.18.0.8".parse().unwrap(),
                1_000_000,
                60,
                true
            ),
            Err(TicketError::WrongIp)
        );
        assert!(
            verify(
                SECRET,
                &t,
                "198.18.0.8".parse().unwrap(),
                1_000_000,
                60,
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn tampering_or_another_secret_breaks_the_signature() {
        let ip: IpAddr = "2001:db8::7".parse().unwrap();
        let t = mint(SECRET, 2_000, Some(ip));
        assert_eq!(
            verify(
                b"another secret of enough length!!",
                &t,
                ip,
                1_990,
                60,
                true
            ),
            Err(TicketError::BadSignature)
        );
        let mut bytes = BASE64_URL_SAFE_NO_PAD.decode(&t).unwrap();
        bytes[5] ^= 1; // push the expiry
        let tampered = BASE64_URL_SAFE_NO_PAD.encode(&bytes);
        assert_eq!(
            verify(SECRET, &tampered, ip, 1_990, 60, true),
            Err(TicketError::BadSignature)
        );
        for junk in ["", "not base64!", "AAAA"] {
            assert_eq!(
                verify(SECRET, junk, ip, 1_990, 60, true),
                Err(TicketError::BadSignature)
            );
        }
    }

    #[test]
    fn the_format_is_exactly_as_specified() {
        // Spec check: payload bytes, then HMAC-SHA256 over the domain and payload.
        let t = mint(
            SECRET,
            0x0102030405060708,
            Some("198.18.0.1".parse().unwrap()),
        );
        let bytes = BASE64_URL_SAFE_NO_PAD.decode(&t).unwrap();
        assert_eq!(&bytes[..14], &[1, 1, 2, 3, 4, 5, 6, 7, 8, 4, 198, 18, 0, 1]);
        assert_eq!(bytes.len(), 14 + NONCE_BYTES + 32);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
        mac.update(b"wsguard-ticket-v1");
        mac.update(&bytes[..14 + NONCE_BYTES]);
        assert_eq!(
            &bytes[14 + NONCE_BYTES..],
            mac.finalize().into_bytes().as_slice()
        );
        let unbound = BASE64_URL_SAFE_NO_PAD
            .decode(mint(SECRET, 5, None))
            .unwrap();
        assert_eq!(&unbound[..10], &[1, 0, 0, 0, 0, 0, 0, 0, 5, 0]);
        // Two tickets for the same client and second differ (their nonces).
        assert_ne!(mint(SECRET, 5, None), mint(SECRET, 5, None));
        // Without a nonce (tickets minted before nonces) and with the
        // longest one, still valid; longer is refused.
        for n in [0, MAX_NONCE_BYTES] {
            let t = mint_with_nonce(SECRET, 100, None, &vec![7; n]);
            assert!(verify(SECRET, &t, "198.18.0.1".parse().unwrap(), 50, 60, false).is_ok());
        }
        let mut long = vec![1, 0, 0, 0, 0, 0, 0, 0, 100, 0];
        long.extend_from_slice(&[7; MAX_NONCE_BYTES + 1]);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
        mac.update(b"wsguard-ticket-v1");
        mac.update(&long);
        long.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            open(SECRET, &BASE64_URL_SAFE_NO_PAD.encode(long)),
            Err(TicketError::BadSignature)
        );
    }
}
