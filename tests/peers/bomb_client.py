"""Client for tests/peers.rs: connects through wsgate (argv[1] = ws:// URL) to deflate_backend.py offering
permessage-deflate, sends one 70 000-byte text message of a single repeated byte (a few hundred bytes once
compressed), and prints one JSON line: the extensions the client and the backend negotiated, and whether the
message came back or the connection was closed (with its close code).
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


async def run(url: str) -> dict:
    async with connect(url, compression="deflate", max_size=None, open_timeout=TIMEOUT,
                       close_timeout=TIMEOUT) as ws:
        report = {"client_ext": ws.response.headers.get("Sec-WebSocket-Extensions", "")}
        first = await asyncio.wait_for(ws.recv(), TIMEOUT)
        report["backend_ext"] = first[len("ext:"):].partition("|")[0]
        try:
            await ws.send("a" * 70_000)
            echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
            report.update(outcome="echo", length=len(echo))
        except ConnectionClosed as e:
            report.update(outcome="closed", code=e.rcvd.code if e.rcvd else None)
        return report


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: bomb_client.py URL", file=sys.stderr)
        return 2
    try:
        print(json.dumps(asyncio.run(asyncio.wait_for(run(sys.argv[1]), 60))))
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
