"""`appliance up` with certificates: its children serve HTTPS, point at each other over HTTPS, and are probed so."""

from __future__ import annotations

import http.server
import ssl
import threading

from fedllm.core.processes import http_ok
from fedllm.appliance.launcher import appliance_children
from fedllm.testing.factories import make_settings
from tests.pki import make_pki


def test_children_use_https_where_a_certificate_is_set(tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls = {"tls_cert": str(pki.cert), "tls_key": str(pki.key)}
    settings = make_settings(tmp_path, serve=tls, ui=tls, federation=tls)
    by_name = {c.name: c for c in appliance_children(settings, "m", "/py")}
    for name in ("router", "coordinator", "console"):
        assert by_name[name].health_url.startswith("https://127.0.0.1:"), name
    assert by_name["router"].url.startswith("https://") and by_name["console"].url.startswith("https://")
    argv = by_name["console"].argv
    assert argv[argv.index("--router-url") + 1].startswith("https://")
    assert argv[argv.index("--coordinator-url") + 1].startswith("https://")
    assert by_name["worker-0"].health_url.startswith("http://")  # local vLLM workers stay on loopback HTTP
    plain = {c.name: c for c in appliance_children(make_settings(tmp_path / "plain"), "m", "/py")}
    assert plain["router"].health_url.startswith("http://")


def test_http_ok_probes_an_https_child(tmp_path):
    pki = make_pki(tmp_path / "pki")

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert http_ok(f"https://127.0.0.1:{port}/health")
        assert not http_ok(f"http://127.0.0.1:{port}/health")  # plain HTTP to an HTTPS child is not ready
    finally:
        server.shutdown()
        server.server_close()
