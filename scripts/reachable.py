"""Exit 0 if every URL's host:port accepts a TCP connection within 2 s."""

import socket
import sys
from urllib.parse import urlsplit

DEFAULT_PORTS = {"postgresql": 5432, "nats": 4222}

for url in sys.argv[1:]:
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.split("+")[0], 0)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=2).close()
    except OSError:
        sys.exit(1)
