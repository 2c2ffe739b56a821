"""Client for tests/tls.rs: Python `websockets` over TLS (the standard library's ssl, OpenSSL) through wsgate.

argv: URL (wss://NAME:PORT/path) CA_FILE. Verifies wsgate's certificate against CA_FILE for NAME, echoes one
message, and prints one JSON line: the TLS version and cipher negotiated, the ALPN protocol and the echo.
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect

TIMEOUT = 10


async def run(url: str, ca_file: str) -> dict:
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    async with connect(url, ssl=context, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        tls = ws.transport.get_extra_info("ssl_object")
        await ws.send("hello over wss")
        echo = await asyncio.wait_for(ws.recv(), TIMEOUT)
        return {"version": tls.version(), "cipher": tls.cipher()[0], "alpn": tls.selected_alpn_protocol(),
                "echo": echo}


print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2]))))
