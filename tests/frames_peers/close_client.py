"""Client for tests/frames_close.rs: connects to argv[1] (a ws:// URL through wsgate), sends one text message,
prints `ready <echo>` once the echo is back, then waits for the server to close the connection and prints
`closed <code> <reason>` for the close frame it received (`closed none` when none came). Exits 0 once closed, 1 on
anything else (every wait is bounded).
"""

import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 30


async def run(url: str) -> None:
    async with connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        await ws.send("hello from python")
        echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
        print(f"ready {echo}", flush=True)
        try:
            message = await asyncio.wait_for(ws.recv(), TIMEOUT)
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            if rcvd is None:
                print("closed none", flush=True)
            else:
                print(f"closed {rcvd.code} {rcvd.reason}", flush=True)
            return
        print(f"unexpected message {message!r}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1]))
