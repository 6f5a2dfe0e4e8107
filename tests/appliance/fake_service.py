"""A tiny HTTP service run as a child process by the supervisor and launcher tests (standard library only).

    python tests/appliance/fake_service.py --port P [--model M] [--start-delay-s S] [--exit-code C --exit-after-s T]

`GET /health` answers 200 `ok`, `GET /v1/models` lists `--model`; anything else is 404. With `--exit-after-s` it exits
by itself with `--exit-code` (a crash). It writes its pid to `--pid-file` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--exit-after-s", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--pid-file", default=None)
    args = parser.parse_args()
    print(f"fake service starting on port {args.port}", flush=True)
    time.sleep(args.start_delay_s)
    models = json.dumps({"object": "list", "data": [{"id": args.model, "object": "model"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = {"/health": b"ok", "/v1/models": models}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.pid_file:
        with open(args.pid_file, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    if args.exit_after_s is not None:
        threading.Timer(args.exit_after_s, lambda: os._exit(args.exit_code)).start()
    print("fake service ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
