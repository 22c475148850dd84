"""A small threaded forward proxy for tests: CONNECT tunnels (https) and absolute-URI requests (plain http),
with optional Basic authentication, resolving host names from its own table only (so a name like `hub.test`
exists for the proxy and nowhere else, as the Hub's does on a login node that reaches it only by proxy)."""
from __future__ import annotations

import base64
import select
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class ProxyRecord:
    method: str
    target: str  # host:port for CONNECT, the absolute URL otherwise
    status: int  # what the proxy answered (200 for a tunnel it opened)
    authorized: bool


class ForwardProxy:
    def __init__(self, hosts: dict[str, str], user: str | None = None, password: str | None = None):
        self.hosts = hosts
        self.expected = (f"Basic {base64.b64encode(f'{user}:{password}'.encode()).decode()}"
                         if user is not None else None)
        self.log: list[ProxyRecord] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def url(self, user: str | None = None, password: str | None = None) -> str:
        creds = f"{user}:{password}@" if user is not None else ""
        return f"http://{creds}127.0.0.1:{self.port}"

    def __enter__(self) -> "ForwardProxy":
        thread = threading.Thread(target=self._serve, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _resolve(self, host: str) -> str | None:
        return self.hosts.get(host, host if host == "127.0.0.1" else None)

    def _handle(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            authorized = self.expected is None or headers.get("proxy-authorization") == self.expected
            if not authorized:
                self.log.append(ProxyRecord(method, target, 407, False))
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
            else:
                parts = urlsplit(target)
                host, port = parts.hostname or "", str(parts.port or 80)
            address = self._resolve(host)
            if address is None:
                self.log.append(ProxyRecord(method, target, 502, True))
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection((address, int(port)), timeout=10)
            self.log.append(ProxyRecord(method, target, 200, True))
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # plain http: forward the request as it came (the server reads the absolute URI's path)
                kept = [line for line in lines if not line.lower().startswith("proxy-authorization:")]
                upstream.sendall("\r\n".join(kept).encode("latin-1") + b"\r\n\r\n" + rest)
            self._pipe(client, upstream)
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        """Bytes both ways until either side closes (for plain http, later requests on the same connection
        pass through unchanged, as they would through a tunnel)."""
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        finally:
            b.close()
