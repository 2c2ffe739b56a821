"""Echo backend for tests/peers.rs: Python `websockets` (asyncio API) with permessage-deflate enabled.

Listens on 127.0.0.1 on a free port and prints the port on stdout (one line). For each connection it first
sends `ext:` followed by the Sec-WebSocket-Extensions it answered with (empty when none was negotiated), then
echoes every message with its type. The text message `stats?` is answered instead with JSON counting the bytes
it received on the wire and the payload bytes of the messages they carried, so the client can tell that its
messages really arrived compressed.
"""

import asyncio
import json
import sys

from websockets.asyncio.server import ServerConnection, serve


class CountingConnection(ServerConnection):
    """Counts the bytes read from the socket (frames as sent on the wire, compressed or not)."""

    wire_bytes_in = 0

    def data_received(self, data: bytes) -> None:
        self.wire_bytes_in += len(data)
        super().data_received(data)


async def handler(ws: CountingConnection) -> None:
    negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    names = [ext.name for ext in ws.protocol.extensions]
    await ws.send(f"ext:{negotiated}|{','.join(names)}")
    payload_in = 0
    async for message in ws:
        if message == "stats?":
            await ws.send(json.dumps({"wire_bytes_in": ws.wire_bytes_in, "payload_bytes_in": payload_in}))
            continue
        payload_in += len(message.encode() if isinstance(message, str) else message)
        await ws.send(message)


async def main() -> None:
    async with serve(
        handler,
        "127.0.0.1",
        0,
        compression="deflate",
        max_size=None,
        create_connection=CountingConnection,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
