"""A real S3 endpoint for the tests: moto's S3 server on a free localhost port, in a thread.

The tests drive it exactly as users drive AWS or MinIO: through ``s3://`` URLs, fsspec and
s3fs, with the endpoint and credentials in the standard AWS environment variables. Nothing
of ours is mocked; the faults are real HTTP responses on the wire.

Fixtures (registered in ``conftest.py``):

* ``s3_server`` (session): starts the server (moto's WSGI app under werkzeug's threaded
  server, as ``moto.server.ThreadedMotoServer`` does, with a fault-injecting WSGI layer in
  front of it), creates :data:`BUCKET`, stops it at the end of the session.
* ``s3`` (function): the same server with the AWS environment set for this test
  (``monkeypatch``), faults cleared, request log emptied. ``s3.url("run1/out")`` ->
  ``s3://mvkit-test/<unique>/run1/out`` (a fresh prefix per test); ``s3.env()`` -> a full
  environment dict for subprocesses (``subprocess.run(..., env=s3.env())``).

Faults (:class:`S3Server`):

* ``s3.fail(count, method="PUT", pattern=r"\\.tar$", status=503, code="ServiceUnavailable")``:
  the next ``count`` requests whose method matches and whose path (with ``?query`` when it
  has one) matches the regex get that HTTP error (an S3 XML error body) instead of reaching
  moto; returns a :class:`Fault` whose ``.served`` counts them. ``count=None``: every
  matching request (a permanent fault, e.g. ``status=403, code="AccessDenied"``) until
  ``fault.release()``.
* ``s3.hang(method="PUT", pattern=r"000001\\.tar$")``: matching requests block until
  ``fault.release()``, then get a 503 without reaching moto (later ones reach moto);
  ``fault.seen`` (an Event) is set when the first one arrives. A test kills a build
  mid-upload with it.
* ``s3.requests``: ``(method, path)`` of every request seen, in order.

``AWS_MAX_ATTEMPTS=1`` is set in the test environment: botocore's own retries (4 more, with
seconds of backoff) would otherwise absorb the injected faults, so the tests exercise
:mod:`mvshards.storage`'s retry and error mapping directly, and stay fast.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

BUCKET = "mvkit-test"
REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
HANG_SECONDS = 120.0
"""A hung request is answered (503) after this long even if nobody releases it."""


@dataclass
class Fault:
    """Requests matching ``method`` and ``pattern`` get ``status`` (``count`` times, None:
    always), or block until :meth:`release` when ``hang``."""

    method: str | None
    pattern: re.Pattern[str]
    status: int = 503
    code: str = "ServiceUnavailable"
    count: int | None = 1
    hang: bool = False
    served: int = 0
    seen: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.released.is_set():  # released: requests reach moto again
            return False
        return bool(self.pattern.search(path)) and (self.count is None or self.served < self.count)

    def release(self) -> None:
        """End the fault: hung requests get their 503, later ones reach moto."""
        self.released.set()


class _FaultLayer:
    """WSGI middleware: answer matching requests with an error, pass the rest to moto."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        from werkzeug.wsgi import get_input_stream

        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        target = path + (f"?{query}" if query else "")
        with self.lock:
            self.requests.append((method, target))
            fault = next((f for f in self.faults if f.matches(method, target)), None)
            if fault is not None:
                fault.served += 1
        if fault is None:
            return self.app(environ, start_response)
        get_input_stream(environ).read()  # drain the body: the connection stays usable
        if fault.hang:
            fault.seen.set()
            fault.released.wait(HANG_SECONDS)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>injected by the test</Message>"
            f"<Resource>{path}</Resource><RequestId>test</RequestId></Error>"
        ).encode()
        start_response(
            f"{fault.status} Injected",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>`` behind :class:`_FaultLayer`."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.layer = _FaultLayer(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, self.layer, threaded=True, request_handler=QuietHandler
        )
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.bucket = BUCKET

    def aws_env(self) -> dict[str, str]:
        """The AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_MAX_ATTEMPTS": "1",
            **CREDENTIALS,
        }

    def env(self, **extra: str) -> dict[str, str]:
        """A whole environment for a subprocess: this one plus :meth:`aws_env` and ``extra``."""
        return {**os.environ, **self.aws_env(), **extra}

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(self.layer.requests)

    def fail(
        self,
        count: int | None = 1,
        method: str | None = None,
        pattern: str = "",
        status: int = 503,
        code: str = "ServiceUnavailable",
    ) -> Fault:
        fault = Fault(method, re.compile(pattern), status=status, code=code, count=count)
        with self.layer.lock:
            self.layer.faults.append(fault)
        return fault

    def hang(self, method: str | None = None, pattern: str = "") -> Fault:
        fault = Fault(method, re.compile(pattern), count=None, hang=True)
        with self.layer.lock:
            self.layer.faults.append(fault)
        return fault

    def reset(self) -> None:
        """No faults, an empty request log (hung requests are released)."""
        with self.layer.lock:
            for fault in self.layer.faults:
                fault.release()
            self.layer.faults.clear()
            self.layer.requests.clear()

    def stop(self) -> None:
        self.reset()
        self._server.shutdown()
        self._thread.join(timeout=10)


class S3Test:
    """The per-test view of the server: a fresh prefix, the environment set."""

    def __init__(self, server: S3Server, prefix: str) -> None:
        self.server, self.prefix = server, prefix
        self.fail, self.hang, self.env = server.fail, server.hang, server.env

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.server.requests

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.server.bucket}/{self.prefix}", *parts])


def _create_bucket(server: S3Server) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=server.bucket)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server for the whole session (see the module docstring)."""
    pytest.importorskip("moto.moto_server.werkzeug_app", reason="pip install 'moto[server]'")
    pytest.importorskip("s3fs", reason="pip install 'mvkit[s3]'")
    server = S3Server()
    try:
        _create_bucket(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Test]:
    """The session's server with the AWS environment set for this test and a fresh prefix."""
    s3_server.reset()
    for key, value in s3_server.aws_env().items():
        monkeypatch.setenv(key, value)
    yield S3Test(s3_server, uuid.uuid4().hex[:12])
    s3_server.reset()
