// The Socket.IO peer that `beeline bench --mode socketio` measures Beeline against on the same box:
// Node socket.io 4.8 with @socket.io/redis-adapter (Redis pub/sub: every message to every node), the
// second row of issue #4's reference table. Set up as Socket.IO's documentation recommends (WebSocket
// transport, ws's native add-ons bufferutil and utf-8-validate), run by the bench with a 64 MB young
// generation (NODE_OPTIONS=--max-semi-space-size=64, Node's throughput tuning), and with nothing per
// message that Beeline does not also do.
//
//   ROLE=gateway PORT=.. REDIS_URL=..  a socket.io server; each client joins the room of its user
//                                      (the `user` query parameter; there is no token to check)
//   ROLE=sender  PORT=.. REDIS_URL=.. API_KEY=..
//                                      the sender entry point: POST /v1/messages {to, channel, payload}
//                                      with `Authorization: Bearer API_KEY` emits
//                                      {type, seq, channel, payload} to the room of `to` through
//                                      @socket.io/redis-emitter (one PUBLISH, no subscription), 202
//
// Both answer GET /readyz once Redis is connected, and exit 0 on SIGTERM.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

const MAX_BODY_BYTES = 1024 * 1024;

function reply(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

function readyz(req, res, ready) {
  if (req.method === "GET" && req.url === "/readyz") return reply(res, ready() ? 200 : 503, { ready: ready() });
  return reply(res, 404, { error: { code: "not_found" } });
}

async function gateway(server, redisUrl) {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  // Before the Server attaches: engine.io then passes on only the requests outside /socket.io/.
  server.on("request", (req, res) => readyz(req, res, () => server.listening));
  const io = new Server(server, { serveClient: false, transports: ["websocket"], adapter: createAdapter(pub, sub) });
  io.on("connection", (socket) => {
    const user = socket.handshake.query.user;
    if (typeof user === "string" && user) socket.join(user);
    else socket.disconnect(true);
  });
  return async () => {
    io.close(); // every client, then the HTTP server
    await Promise.allSettled([pub.quit(), sub.quit()]);
  };
}

async function sender(server, redisUrl, apiKey) {
  const pub = createClient({ url: redisUrl });
  await pub.connect();
  const emitter = new Emitter(pub);
  let seq = 0;
  server.on("request", (req, res) => {
    if (req.method !== "POST" || req.url !== "/v1/messages") return readyz(req, res, () => server.listening);
    if (req.headers.authorization !== `Bearer ${apiKey}`) return reply(res, 401, { error: { code: "unauthorized" } });
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on("end", () => {
      let message;
      try {
        message = size <= MAX_BODY_BYTES ? JSON.parse(Buffer.concat(chunks).toString("utf8")) : null;
      } catch {
        return reply(res, 400, { error: { code: "invalid_json" } });
      }
      if (typeof message?.to !== "string" || !message.to) return reply(res, 400, { error: { code: "invalid_field" } });
      seq += 1;
      emitter.to(message.to).emit("message", { type: "message", seq, channel: message.channel, payload: message.payload });
      reply(res, 202, { results: [{ to: message.to, seq, status: "routed" }] });
    });
  });
  return async () => {
    server.close();
    await pub.quit();
  };
}

async function main() {
  const { ROLE: role, PORT: port, REDIS_URL: redisUrl, API_KEY: apiKey = "" } = process.env;
  const server = http.createServer();
  let stop;
  if (role === "gateway") stop = await gateway(server, redisUrl);
  else if (role === "sender") stop = await sender(server, redisUrl, apiKey);
  else throw new Error(`ROLE must be gateway or sender, not ${role}`);
  await new Promise((resolve) => server.listen(Number(port), "127.0.0.1", resolve));
  process.on("SIGTERM", () => stop().then(() => process.exit(0)));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
