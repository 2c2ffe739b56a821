// Echo backend for the Autobahn TestSuite run (tests/autobahn/run.py): a Node `ws` 8 server with
// permessage-deflate that sends every message back as it came (text as text, binary as binary).
//
//   node echo_server.js PORT        # prints "listening PORT" once it accepts connections
'use strict';

const { WebSocketServer } = require('ws');

const port = Number.parseInt(process.argv[2] ?? '', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('usage: node echo_server.js PORT');
  process.exit(2);
}

const wss = new WebSocketServer({
  port,
  host: '127.0.0.1',
  perMessageDeflate: true,
  // The suite's largest messages are 16 MiB (9.1.6, 9.2.6); ws's default limit is 100 MiB, keep it explicit.
  maxPayload: 100 * 1024 * 1024,
});

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
  // A protocol error closes the connection from ws itself; the error needs a listener so it is not thrown.
  ws.on('error', () => {});
});

wss.on('listening', () => {
  console.log(`listening ${wss.address().port}`);
});

wss.on('error', (err) => {
  console.error(`echo server: ${err.message}`);
  process.exit(1);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
