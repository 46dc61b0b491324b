// The Socket.IO peer that `beeline bench --mode socketio` measures Beeline against on the same box:
// Node socket.io 4.8 with @socket.io/redis-adapter (Redis pub/sub, every message to every node), the
// second row of issue #4's reference table. Written the way its documentation shows, with nothing
// Beeline does not also do per message.
//
//   ROLE=gateway PORT=.. REDIS_URL=..  a socket.io server; each client joins the room of its user
//                                      (the `user` query parameter; the bench's tokens are not checked)
//   ROLE=sender  PORT=.. REDIS_URL=.. API_KEY=..
//                                      the sender entry point: POST /v1/messages {to, channel, payload}
//                                      emits {type, seq, channel, payload} to the room of `to`, 202
//
// Both answer GET /readyz once Redis is connected, and exit 0 on SIGTERM.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const role = process.env.ROLE;
const port = Number(process.env.PORT);
const apiKey = process.env.API_KEY || "";
const MAX_BODY_BYTES = 1024 * 1024;

function reply(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

async function main() {
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  let ready = false;
  let seq = 0;
  const server = http.createServer();
  const io = new Server({ serveClient: false, transports: ["websocket"], adapter: createAdapter(pub, sub) });

  server.on("request", (req, res) => {
    if (req.url.startsWith("/socket.io/")) return; // engine.io answers these
    if (req.method === "GET" && req.url === "/readyz") return reply(res, ready ? 200 : 503, { ready });
    if (role !== "sender" || req.method !== "POST" || req.url !== "/v1/messages") {
      return reply(res, 404, { error: { code: "not_found" } });
    }
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
        message = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch {
        return reply(res, 400, { error: { code: "invalid_json" } });
      }
      if (size > MAX_BODY_BYTES || typeof message?.to !== "string" || !message.to) {
        return reply(res, 400, { error: { code: "invalid_field" } });
      }
      seq += 1;
      io.to(message.to).emit("message", { type: "message", seq, channel: message.channel, payload: message.payload });
      reply(res, 202, { results: [{ to: message.to, seq, status: "routed" }] });
    });
  });

  if (role === "gateway") {
    io.attach(server);
    io.on("connection", (socket) => {
      const user = socket.handshake.query.user;
      if (typeof user === "string" && user) socket.join(user);
      else socket.disconnect(true);
    });
  } else if (role !== "sender") {
    throw new Error(`ROLE must be gateway or sender, not ${role}`);
  }

  await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
  ready = true;

  process.on("SIGTERM", () => {
    if (role === "gateway") io.close(); // closes every client and the HTTP server
    else server.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
