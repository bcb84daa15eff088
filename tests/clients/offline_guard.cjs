// Preloaded into the Continue CLI (NODE_OPTIONS=--require=...): refuse every TCP connection that is not to
// loopback, before any DNS lookup, and note the refused host in $CUBE_OFFLINE_GUARD_LOG.
//
// `cn` 1.5 asks api.continue.dev for its latest version on every start, headless runs included, and no
// setting turns that off; the tests must not talk to the internet, and must not hang when it is absent.
// Every Node socket (net, tls, http(s), fetch/undici) goes through net.Socket.prototype.connect.
"use strict";

const fs = require("node:fs");
const net = require("node:net");

const LOOPBACK = new Set(["127.0.0.1", "::1", "localhost", "::ffff:127.0.0.1"]);
const logFile = process.env.CUBE_OFFLINE_GUARD_LOG;

function targetHost(args) {
  const first = Array.isArray(args[0]) ? args[0][0] : args[0];
  if (first && typeof first === "object") {
    if (first.path) return null; // a Unix socket: local by construction
    return first.host ?? "localhost";
  }
  if (typeof first === "string" && Number.isNaN(Number(first))) return null; // connect(path)
  return typeof args[1] === "string" ? args[1] : "localhost";
}

const originalConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function guardedConnect(...args) {
  const host = targetHost(args);
  if (host !== null && !LOOPBACK.has(host)) {
    if (logFile) fs.appendFileSync(logFile, `${host}\n`);
    const error = Object.assign(new Error(`offline guard: refused a connection to ${host}`), {
      code: "ECONNREFUSED",
    });
    process.nextTick(() => this.destroy(error));
    return this;
  }
  return originalConnect.apply(this, args);
};
