"""Client for tests/tls.rs: TLS handshakes that wsgate must refuse, made with the standard library's ssl
(OpenSSL). argv: HOST PORT CASE, CASE one of:
  tls11      - offers TLS 1.0 and 1.1 only
  no-shared  - offers TLS 1.2 with only CBC cipher suites (ECDHE-*-AES128-SHA), which rustls does not have
Prints one JSON line: whether the handshake succeeded, and the error OpenSSL reported when it did not.
"""

import json
import socket
import ssl
import sys

host, port, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
if case == "tls11":
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
elif case == "no-shared":
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:@SECLEVEL=0")
else:
    sys.exit(f"unknown case {case}")
with socket.create_connection((host, port), timeout=10) as raw:
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            print(json.dumps({"handshake": "ok", "version": tls.version()}))
    except (ssl.SSLError, OSError) as e:
        print(json.dumps({"handshake": "failed", "error": str(e)}))
