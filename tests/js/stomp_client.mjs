// A STOMP client made of the real @stomp/stompjs 7 library (WebSocket: the `ws` package, since Node 20
// has no global WebSocket), driven by tests/e2e/test_stomp_clients.py over line-delimited JSON.
//
// stdin, one command per line:
//   {"op":"connect","url":"ws://...","headers":{CONNECT headers},"wsHeaders":{upgrade headers},
//    "protocols":[...]?, "versions":["1.2",...]?, "heartbeat":[outgoing_ms, incoming_ms]?}
//   {"op":"subscribe","destination":"/user/topic/reply","id":"s1"?,"ack":"client"?,"receipt":"r1"?}
//   {"op":"unsubscribe","id":"s1","receipt":"r2"?}
//   {"op":"send","destination":"...","body":"...","headers":{...}}   (a `receipt` header is watched)
//   {"op":"ack","messageId":"..."}                                    (message.ack() of that MESSAGE)
//   {"op":"disconnect","receipt":"r3"?}                               (client.deactivate())
//   {"op":"exit"}
// stdout, one event per line:
//   ready | connected {headers} | message {headers, body} | receipt {headers} | error {headers, body}
//   (a STOMP ERROR frame) | ws-error {message} | close {code, reason} | disconnected {headers} (the
//   DISCONNECT's RECEIPT) | failed {op, message} (a command the library threw on)
//
// One connection at a time; a `connect` after a close starts a new one. Reconnects are off: the test
// decides when to connect again.

import { createInterface } from "node:readline";

import { Client, Versions } from "@stomp/stompjs";
import WebSocket from "ws";

let client = null;
const messages = new Map(); // message-id -> IMessage, so that `ack` goes through the library's own ack()
const subscriptions = new Map(); // id -> StompSubscription

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function connect(cmd) {
  messages.clear();
  subscriptions.clear();
  const versions = new Versions(cmd.versions ?? ["1.2", "1.1", "1.0"]);
  const protocols = cmd.protocols ?? versions.protocolVersions();
  // The library's own heart-beat defaults (10000,10000) unless the test names others.
  const beats = cmd.heartbeat ? { heartbeatOutgoing: cmd.heartbeat[0], heartbeatIncoming: cmd.heartbeat[1] } : {};
  const current = new Client({
    webSocketFactory: () => new WebSocket(cmd.url, protocols, { headers: cmd.wsHeaders ?? {} }),
    connectHeaders: cmd.headers ?? {},
    stompVersions: versions,
    ...beats,
    reconnectDelay: 0,
    connectionTimeout: 0,
    debug: () => {},
    onConnect: (frame) => emit("connected", { headers: frame.headers }),
    onStompError: (frame) => emit("error", { headers: frame.headers, body: frame.body }),
    onWebSocketError: (evt) => emit("ws-error", { message: String(evt?.message ?? evt?.error ?? evt) }),
    onWebSocketClose: (evt) => {
      if (client === current) client = null;
      emit("close", { code: evt?.code ?? null, reason: evt?.reason ?? "" });
    },
    onDisconnect: (frame) => emit("disconnected", { headers: frame.headers }),
    onUnhandledReceipt: (frame) => emit("receipt", { headers: frame.headers }),
    onUnhandledMessage: onMessage, // a MESSAGE for a subscription the library no longer knows
  });
  client = current;
  current.activate();
}

function onMessage(message) {
  messages.set(message.headers["message-id"], message);
  emit("message", { headers: message.headers, body: message.body });
}

function watch(receipt) {
  if (receipt) client.watchForReceipt(receipt, (frame) => emit("receipt", { headers: frame.headers }));
}

async function handle(cmd) {
  switch (cmd.op) {
    case "connect":
      connect(cmd);
      break;
    case "subscribe": {
      const headers = {};
      if (cmd.id) headers.id = cmd.id;
      if (cmd.ack) headers.ack = cmd.ack;
      if (cmd.receipt) headers.receipt = cmd.receipt;
      watch(cmd.receipt);
      const sub = client.subscribe(cmd.destination, onMessage, headers);
      subscriptions.set(sub.id, sub);
      break;
    }
    case "unsubscribe": {
      watch(cmd.receipt);
      subscriptions.get(cmd.id).unsubscribe(cmd.receipt ? { receipt: cmd.receipt } : {});
      subscriptions.delete(cmd.id);
      break;
    }
    case "send": {
      const headers = cmd.headers ?? {};
      watch(headers.receipt);
      client.publish({ destination: cmd.destination, body: cmd.body ?? "", headers });
      break;
    }
    case "ack": {
      const message = messages.get(cmd.messageId);
      if (!message) throw new Error(`no MESSAGE with message-id ${cmd.messageId}`);
      message.ack();
      break;
    }
    case "disconnect":
      if (cmd.receipt) client.disconnectHeaders = { receipt: cmd.receipt };
      await client.deactivate();
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
  Promise.resolve()
    .then(() => handle(cmd))
    .catch((e) => emit("failed", { op: cmd.op, message: String(e?.stack ?? e) }));
});
lines.on("close", () => process.exit(0)); // the test went away: never outlive it
emit("ready");
