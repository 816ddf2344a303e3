// A WebSocket client that loses nothing when its connection is closed.
//
// When sluice drains or rebalances a backend it closes WebSockets with 1012
// ("service restart") at a message boundary, and the client reconnects to
// a healthy backend. A message the client sends while that Close is on its
// way, and an answer the backend sends after it, cannot be delivered on
// that connection: true of any server-initiated close. An app loses
// nothing if it does what this client does:
//
//   1. number every message and keep it until the server acknowledges it
//      (here the acknowledgement is the echo; in a chat app, the server's
//      "stored" reply);
//   2. when the connection closes, for any reason, reconnect after a short
//      random delay (so that clients closed together do not come back in
//      the same millisecond) and send again, in order, every message not
//      yet acknowledged;
//   3. on the server, treat the number as an idempotency key, since a
//      message whose acknowledgement was lost arrives twice.
//
// The same code works in a browser with the built-in WebSocket in place of
// the `ws` package. Run it against `sluice demo` (whose backends echo):
//
//   npm install
//   node client.mjs --url ws://127.0.0.1:8080/ws --clients 20 --messages 100
//
// and drain a backend meanwhile (`sluice ctl drain demo/demo-1 --admin ...
// --token ...`, as `sluice demo` prints them). It prints one
// line of totals and exits 0 when every message was acknowledged.

import WebSocket from "ws";

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const url = option("url", "ws://127.0.0.1:8080/ws");
const clients = Number(option("clients", "10"));
const messages = Number(option("messages", "100"));
const every = Number(option("every", "100")); // ms between sends
const deadline = Date.now() + Number(option("timeout", "120")) * 1000;

const totals = { sent: 0, acknowledged: 0, resent: 0, duplicates: 0, reconnects: 0, closes: {} };

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// One client: `messages` numbered messages, each kept in `pending` until
// its echo comes back.
async function client(name) {
  const pending = new Map(); // id -> text, in sending order
  const acked = new Set();
  let next = 0;
  while (acked.size < messages && Date.now() < deadline) {
    const ws = new WebSocket(url);
    const closed = new Promise((resolve) => {
      ws.on("close", (code) => resolve(code));
      ws.on("error", () => {}); // a close follows
    });
    ws.on("message", (data) => {
      let msg;
      try {
        msg = JSON.parse(data.toString());
      } catch {
        return; // the demo backend's greeting
      }
      if (msg.client !== name) return;
      if (acked.has(msg.id)) {
        totals.duplicates++; // the server saw it twice: the key makes that harmless
        return;
      }
      if (pending.delete(msg.id)) {
        acked.add(msg.id);
        totals.acknowledged++;
      }
    });
    const opened = await new Promise((resolve) => {
      ws.once("open", () => resolve(true));
      ws.once("close", () => resolve(false));
    });
    if (opened) {
      // Everything not acknowledged goes again, in order.
      for (const [id, text] of pending) {
        ws.send(JSON.stringify({ client: name, id, text }));
        totals.resent++;
      }
      while (ws.readyState === WebSocket.OPEN && next < messages) {
        const id = next++;
        const text = `message ${id} from ${name}`;
        pending.set(id, text);
        ws.send(JSON.stringify({ client: name, id, text }));
        totals.sent++;
        await Promise.race([sleep(every), closed]);
      }
      // All sent: wait for the last acknowledgements (or a close).
      while (ws.readyState === WebSocket.OPEN && pending.size > 0 && Date.now() < deadline) {
        await Promise.race([sleep(20), closed]);
      }
      if (ws.readyState === WebSocket.OPEN) {
        ws.close(1000);
        await closed;
        break;
      }
    }
    const code = await closed;
    totals.closes[code] = (totals.closes[code] || 0) + 1;
    if (acked.size < messages) {
      totals.reconnects++;
      // Back soon, but not all in the same millisecond.
      await sleep(50 + Math.random() * 250);
    }
  }
  return messages - acked.size;
}

const lost = (await Promise.all(Array.from({ length: clients }, (_, i) => client(`c${i}`)))).reduce(
  (a, b) => a + b,
  0,
);
console.log(
  `sent ${totals.sent}, acknowledged ${totals.acknowledged}, resent ${totals.resent}, ` +
    `duplicates ${totals.duplicates}, reconnects ${totals.reconnects}, ` +
    `closes ${JSON.stringify(totals.closes)}, lost ${lost}`,
);
process.exit(lost === 0 ? 0 : 1);
