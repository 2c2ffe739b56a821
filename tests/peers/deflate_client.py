"""Client for tests/peers.rs: connects through wsgate (argv[1] = HOST:PORT) to deflate_backend.py with
permessage-deflate and checks that the extension is negotiated end to end and that compressed messages (text,
fragmented text, binary) come back intact. Exits 0 on success; on failure prints why and exits 1.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 10


class CountingConnection(ClientConnection):
    """Counts the bytes read from the socket (frames as sent on the wire, compressed or not)."""

    wire_bytes_in = 0

    def data_received(self, data: bytes) -> None:
        self.wire_bytes_in += len(data)
        super().data_received(data)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def run(addr: str) -> None:
    async with connect(
        f"ws://{addr}/deflate",
        compression="deflate",
        max_size=None,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        create_connection=CountingConnection,
    ) as ws:
        # What the client saw: the 101 that came through wsgate.
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        check("permessage-deflate" in extensions,
              f"response Sec-WebSocket-Extensions is {extensions!r}, not permessage-deflate")
        names = [ext.name for ext in ws.protocol.extensions]
        check(names == ["permessage-deflate"], f"client negotiated extensions {names}")
        print(f"client: Sec-WebSocket-Extensions: {extensions}")

        # What the backend saw.
        first = await asyncio.wait_for(ws.recv(), TIMEOUT)
        check(isinstance(first, str) and first.startswith("ext:"), f"first message {first!r}")
        backend_header, _, backend_names = first[len("ext:"):].partition("|")
        check("permessage-deflate" in backend_header,
              f"backend answered Sec-WebSocket-Extensions {backend_header!r}")
        check(backend_names == "permessage-deflate", f"backend negotiated extensions {backend_names!r}")
        print(f"backend: Sec-WebSocket-Extensions: {backend_header}")

        wire_before = ws.wire_bytes_in
        texts = [
            "hello " * 2000,
            json.dumps([{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"]} for i in range(500)]),
            "ünïcødé ✓ " * 3000,
            "x",  # tiny: may be sent uncompressed-sized, still inside the compressed stream
            "",
        ]
        payload_out = 0
        for text in texts:
            await ws.send(text)
            payload_out += len(text.encode())
            echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
            check(echo == text, f"text echo differs: sent {len(text)} chars, got {type(echo).__name__} "
                                f"of length {len(echo)}")

        # A fragmented compressed message: RSV1 only on the first frame.
        fragments = ["fragment-one " * 500, "fragment-two " * 500, "three"]
        await ws.send(fragments)
        whole = "".join(fragments)
        payload_out += len(whole.encode())
        echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
        check(echo == whole, "fragmented text echo differs")

        binary = bytes(range(256)) * 400 + b"\x00" * 50_000
        await ws.send(binary)
        payload_out += len(binary)
        echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
        check(isinstance(echo, bytes) and echo == binary,
              f"binary echo differs: got {type(echo).__name__} of length {len(echo)}")

        # The backend's echoes reached us compressed ...
        wire_in = ws.wire_bytes_in - wire_before
        check(wire_in * 4 < payload_out,
              f"echoes took {wire_in} bytes on the wire for {payload_out} payload bytes: not compressed?")
        # ... and our messages reached the backend compressed.
        await ws.send("stats?")
        stats = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        check(stats["payload_bytes_in"] == payload_out,
              f"backend counted {stats['payload_bytes_in']} payload bytes, client sent {payload_out}")
        check(stats["wire_bytes_in"] * 4 < payload_out,
              f"backend read {stats['wire_bytes_in']} bytes on the wire for {payload_out} payload bytes")
        print(f"payload {payload_out} bytes each way; on the wire: to backend {stats['wire_bytes_in']}, "
              f"to client {wire_in}")

        await ws.close(1000, "done")
        check(ws.close_code == 1000, f"close code {ws.close_code}")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: deflate_client.py HOST:PORT", file=sys.stderr)
        return 2
    try:
        asyncio.run(asyncio.wait_for(run(sys.argv[1]), 60))
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
