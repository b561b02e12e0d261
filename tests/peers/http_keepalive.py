"""A keep-alive HTTP/1.1 server (Python's http.server) that answers 200 to
every GET and logs each request it reads, so that a test can tell which
requests reached the application.

Usage: http_keepalive.py PORT. Prints "ready" once listening, then
"request PATH ORIGIN" for each request.
"""
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        print("request", self.path, self.headers.get("Origin"), flush=True)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


server = Server(("::", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
