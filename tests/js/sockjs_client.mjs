// The original page's client stack: sockjs-client 1.1.4 carrying stompjs 2.3.3
// (`Stomp.over(new SockJS(url, null, {transports: [transport]}))`), driven by
// tests/e2e/test_stomp_clients.py over line-delimited JSON. Only the one transport asked for is allowed,
// so a run proves that transport (SockJS would otherwise fall back to another one silently).
//
// stdin, one command per line:
//   {"op":"connect","url":"http://.../chat-websocket?token=...","transport":"xhr-polling",
//    "headers":{CONNECT headers}, "heartbeat":[outgoing_ms, incoming_ms]?}
//   {"op":"subscribe","destination":"/user/topic/reply","ack":"client"?}
//   {"op":"send","destination":"...","body":"...","headers":{...}}
//   {"op":"ack","messageId":"..."}
//   {"op":"disconnect"}
//   {"op":"exit"}
// stdout, one event per line:
//   ready | open {transport} (SockJS open, with the transport it chose) | connected {headers} |
//   message {headers, body} | receipt {headers} | error {headers, body} (a STOMP ERROR frame) |
//   lost {message} (stompjs's error callback with no frame) | close {code, reason} (SockJS close) |
//   failed {op, message}

import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(import.meta.url);
const SockJS = require("sockjs-client");
const Stomp = require("stompjs");

let client = null;
const messages = new Map(); // message-id -> message, so that `ack` goes through the library's ack()

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function connect(cmd) {
  messages.clear();
  const sock = new SockJS(cmd.url, null, { transports: [cmd.transport] });
  sock.addEventListener("open", () => emit("open", { transport: sock.transport }));
  sock.addEventListener("close", (evt) => emit("close", { code: evt.code, reason: evt.reason ?? "" }));
  const stomp = Stomp.over(sock);
  if (cmd.heartbeat) [stomp.heartbeat.outgoing, stomp.heartbeat.incoming] = cmd.heartbeat; // else 10000,10000
  stomp.debug = null;
  stomp.onreceipt = (frame) => emit("receipt", { headers: frame.headers });
  client = stomp;
  stomp.connect(
    cmd.headers ?? {},
    (frame) => emit("connected", { headers: frame.headers }),
    (failure) => {
      if (failure && typeof failure === "object" && failure.command === "ERROR") {
        emit("error", { headers: failure.headers, body: failure.body });
      } else {
        emit("lost", { message: String(failure) });
      }
    },
  );
}

function handle(cmd) {
  switch (cmd.op) {
    case "connect":
      connect(cmd);
      break;
    case "subscribe": {
      const headers = {};
      if (cmd.id) headers.id = cmd.id;
      if (cmd.ack) headers.ack = cmd.ack;
      if (cmd.receipt) headers.receipt = cmd.receipt;
      client.subscribe(
        cmd.destination,
        (message) => {
          messages.set(message.headers["message-id"], message);
          emit("message", { headers: message.headers, body: message.body });
        },
        headers,
      );
      break;
    }
    case "send":
      client.send(cmd.destination, cmd.headers ?? {}, cmd.body ?? "");
      break;
    case "ack": {
      const message = messages.get(cmd.messageId);
      if (!message) throw new Error(`no MESSAGE with message-id ${cmd.messageId}`);
      message.ack();
      break;
    }
    case "disconnect":
      client.disconnect(() => emit("disconnected"));
      break;
    case "exit":
      process.exit(0);
      break;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit("failed", { op: null, message: `bad command: ${e}` });
    return;
  }
  try {
    handle(cmd);
  } catch (e) {
    emit("failed", { op: cmd.op, message: String(e?.stack ?? e) });
  }
});
lines.on("close", () => process.exit(0)); // the test went away: never outlive it
emit("ready");
