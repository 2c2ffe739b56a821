// Client for tests/frames_close.rs: connects to process.argv[2] (a ws:// URL through wsgate) with Node's `ws`, sends
// one text message, prints `ready <echo>` once the echo is back, then waits for the server to close the connection
// and prints `closed <code> <reason>`. Exits 0 once closed, 1 on an error, 2 when nothing happened for 30 s.
'use strict';

const WebSocket = require('ws');

const ws = new WebSocket(process.argv[2]);
let ready = false;
const timer = setTimeout(() => {
  console.log('timeout');
  process.exit(2);
}, 30000);

ws.on('open', () => ws.send('hello from node'));
ws.on('message', (data) => {
  if (!ready) {
    ready = true;
    console.log(`ready ${data}`);
  } else {
    console.log(`unexpected message ${data}`);
  }
});
ws.on('close', (code, reason) => {
  clearTimeout(timer);
  console.log(`closed ${code} ${reason.toString()}`);
  process.exit(0);
});
ws.on('error', (err) => {
  console.log(`error ${err.message}`);
  process.exit(1);
});
