"""Waiting for a server one started: it answers, it crashed, it never came up."""

from __future__ import annotations

import http.server
import threading

import pytest

from pisa.core.service_wait import ServiceDown, wait_for_http
from pisa.training.ray_runtime import free_port


def test_a_server_that_answers_any_status_is_up():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to a GET
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for_http(f"http://127.0.0.1:{server.server_port}/health", lambda: None, "test server", 10, 0.05)
    finally:
        server.shutdown()


def test_a_server_that_exited_is_said_at_once_and_one_that_never_answers_times_out():
    url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    with pytest.raises(ServiceDown, match=r"^mlflow server exited \(1\)$"):
        wait_for_http(url, lambda: 1, "mlflow server", 60, 0.05)
    with pytest.raises(ServiceDown, match=r"^moto server not up after 0 s$"):
        wait_for_http(url, lambda: None, "moto server", 0.2, 0.05)
