// Mints a wsguard handshake ticket (README, "Tickets"): version 1, or
// version 2 when a user is named. Node.js standard library only.
//
// As a module: mint(secret, expiresAt, {ip, user, userClass, nonce}).
// As a program: node mint_ticket.js SECRET_FILE TTL_SECONDS [--ip ADDR] [--user ID [--class NAME]]
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const net = require("node:net");

function addressBytes(ip) {
  if (net.isIPv4(ip)) return Buffer.from([4, ...ip.split(".").map(Number)]);
  if (!net.isIPv6(ip)) throw new Error(`not an IP address: ${ip}`);
  // Expand "::" and any embedded IPv4 into eight 16-bit groups.
  let text = ip;
  const v4 = text.match(/(\d+\.\d+\.\d+\.\d+)$/);
  if (v4) {
    const b = v4[1].split(".").map(Number);
    text = text.slice(0, -v4[1].length) + `${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}`;
  }
  const [head, tail] = text.split("::");
  const left = head ? head.split(":") : [];
  const right = tail !== undefined && tail ? tail.split(":") : [];
  const groups = tail === undefined ? left : [...left, ...Array(8 - left.length - right.length).fill("0"), ...right];
  const out = Buffer.alloc(17);
  out[0] = 6;
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), 1 + 2 * i));
  return out;
}

function mint(secret, expiresAt, { ip = null, user = null, userClass = null, nonce = null } = {}) {
  const version = user !== null ? 2 : 1;
  const expires = Buffer.alloc(8);
  expires.writeBigUInt64BE(BigInt(expiresAt));
  const parts = [Buffer.from([version]), expires, ip === null ? Buffer.from([0]) : addressBytes(ip)];
  if (user !== null) {
    const id = Buffer.from(user, "utf8");
    const cls = Buffer.from(userClass || "", "ascii");
    if (id.length < 1 || id.length > 64 || cls.length > 32) throw new Error("user id 1 to 64 bytes, class at most 32");
    parts.push(Buffer.from([id.length]), id, Buffer.from([cls.length]), cls);
  } else if (userClass !== null) {
    throw new Error("a class needs a user");
  }
  parts.push(nonce === null ? crypto.randomBytes(16) : nonce);
  const payload = Buffer.concat(parts);
  const tag = crypto.createHmac("sha256", secret).update(`wsguard-ticket-v${version}`).update(payload).digest();
  return Buffer.concat([payload, tag]).toString("base64url");
}

module.exports = { mint };

if (require.main === module) {
  const argv = process.argv.slice(2);
  if (argv.length < 2) {
    console.error("usage: node mint_ticket.js SECRET_FILE TTL_SECONDS [--ip ADDR] [--user ID [--class NAME]]");
    process.exit(2);
  }
  const secret = Buffer.from(fs.readFileSync(argv[0], "utf8").trim());
  const options = {};
  for (let i = 2; i + 1 < argv.length; i += 2) options[argv[i]] = argv[i + 1];
  const expiresAt = Math.floor(Date.now() / 1000) + Number(argv[1]);
  console.log(mint(secret, expiresAt, { ip: options["--ip"] ?? null, user: options["--user"] ?? null, userClass: options["--class"] ?? null }));
}
