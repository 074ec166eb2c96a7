"""A tiny web server run inside a test namespace: every GET on each port is answered with
"<label> <peer address>" ("{port}" in the label becomes the port), so a test sees who
reached whom, and through which path. ADDRESS may be IPv4 or IPv6.

    python echo_http.py ADDRESS LABEL PORT [PORT ...]

Standalone on purpose (the harness's Python runs it in the namespace): standard library only.
"""

import http.server
import socket
import sys
import threading


def handler(label: str, port: int) -> type[http.server.BaseHTTPRequestHandler]:
    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            text = label.replace("{port}", str(port))
            body = f"{text} {self.client_address[0]}".strip().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Echo


class Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    addr, label, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
    cls = Server6 if ":" in addr else http.server.ThreadingHTTPServer
    servers = [cls((addr, p), handler(label, p)) for p in ports]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
