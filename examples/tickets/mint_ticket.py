#!/usr/bin/env python3
"""Mints a wsguard handshake ticket (README, "Tickets"): version 1, or
version 2 when a user is named. Standard library only.

As a library: mint(secret, expires_at, ip=None, user=None, user_class=None).
As a program: mint_ticket.py SECRET_FILE TTL_SECONDS [--ip ADDR] [--user ID [--class NAME]]
"""
import base64
import hashlib
import hmac
import ipaddress
import os
import sys
import time


def mint(secret, expires_at, ip=None, user=None, user_class=None, nonce=None):
    """The ticket string; `nonce` defaults to 16 random bytes."""
    version = 2 if user is not None else 1
    payload = bytes([version]) + expires_at.to_bytes(8, "big")
    if ip is None:
        payload += b"\x00"
    else:
        address = ipaddress.ip_address(ip)
        payload += bytes([address.version]) + address.packed
    if user is not None:
        user_id = user.encode("utf-8")
        class_name = (user_class or "").encode("ascii")
        if not 1 <= len(user_id) <= 64 or len(class_name) > 32:
            raise ValueError("user id 1 to 64 bytes, class at most 32")
        payload += bytes([len(user_id)]) + user_id + bytes([len(class_name)]) + class_name
    elif user_class is not None:
        raise ValueError("a class needs a user")
    payload += os.urandom(16) if nonce is None else nonce
    domain = b"wsguard-ticket-v%d" % version
    tag = hmac.new(secret, domain + payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(payload + tag).rstrip(b"=").decode("ascii")


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    with open(argv[1], "rb") as f:
        secret = f.read().strip()
    options = dict(zip(argv[3::2], argv[4::2]))
    print(mint(secret, int(time.time()) + int(argv[2]), options.get("--ip"),
               options.get("--user"), options.get("--class")))


if __name__ == "__main__":
    main(sys.argv)
