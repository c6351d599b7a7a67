"""TLS, the bearer token and the body-size limit on the HTTP fronts: liveness answers without a
token, every other route needs it (401 as JSON), tritonclient.http and the openai client work
over TLS with it, plain HTTP to the TLS port fails, --allow-http false serves no HTTP."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.error
import urllib.request

import httpx2 as httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.backend_helpers import write_model
from tests.reliability_support import add_echo, start
from tests.test_http_openai import ECHO_CONFIG as TEXT_CONFIG
from tests.test_http_openai import ECHO_PY as TEXT_PY
from tests.test_security import TOKEN, _self_signed


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    tmp = tmp_path_factory.mktemp("http-tls")
    add_echo(tmp / "repo")
    write_model(tmp / "repo", "text", TEXT_CONFIG.replace('"echo"', '"text"'),
                {"model.py": TEXT_PY})
    cert, key = _self_signed(tmp)
    srv = start(tmp / "repo", tmp / "server.log", "--auth-token", TOKEN, "--http-tls-cert",
                str(cert), "--http-tls-key", str(key), "--max-message-bytes", "100000")
    srv.cert = cert
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def _get(srv, path: str, token: str | None = None, data: bytes | None = None
         ) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(srv.cert))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"https://localhost:{srv.http_port}{path}", data=data,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_liveness_needs_no_token(secure) -> None:
    assert _get(secure, "/v2/health/live")[0] == 200
    code, body = _get(secure, "/v2/health/ready")
    assert code == 401 and "bearer token" in json.loads(body)["error"]
    assert _get(secure, "/v2/health/ready", TOKEN)[0] == 200
    assert _get(secure, "/v2/health/ready", "wrong")[0] == 401
    code, body = _get(secure, "/v1/models")
    assert code == 401 and json.loads(body)["error"]["code"] == 401  # OpenAI-shaped


def test_tritonclient_over_tls_with_token(secure) -> None:
    c = httpclient.InferenceServerClient(
        f"localhost:{secure.http_port}", ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(secure.cert)))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    x = np.array([1.0, 2.0], dtype=np.float32)
    t = httpclient.InferInput("IN", [2], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("echo", [t], headers=auth).as_numpy("OUT"), 2 * x + 1)
    with pytest.raises(InferenceServerException, match="401"):
        c.infer("echo", [t])
    c.close()


def test_openai_client_over_tls_with_token(secure) -> None:
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(secure.cert)))
    c = openai.OpenAI(base_url=f"https://localhost:{secure.http_port}/v1", api_key=TOKEN,
                      http_client=http, max_retries=0)
    assert c.completions.create(model="text", prompt="hi").choices[0].text == "echo: hi"
    bad = openai.OpenAI(base_url=f"https://localhost:{secure.http_port}/v1", api_key="no",
                        http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_plain_http_to_tls_port_fails(secure) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://localhost:{secure.http_port}/v2/health/live",
                               timeout=10)


def test_body_limit_is_a_413(secure) -> None:
    body = json.dumps({"inputs": [{"name": "IN", "shape": [50000], "datatype": "FP32",
                                   "data": [1.0] * 50000}]}).encode()
    code, raw = _get(secure, "/v2/models/echo/infer", TOKEN, body)
    assert code == 413 and "--max-message-bytes" in json.loads(raw)["error"]
    assert _get(secure, "/v2/health/ready", TOKEN)[0] == 200


def test_allow_http_false(tmp_path) -> None:
    add_echo(tmp_path / "repo")
    srv = start(tmp_path / "repo", tmp_path / "server.log", "--allow-http", "false")
    try:
        assert srv.http_port is None and "HTTP on" not in srv.text()
    finally:
        assert srv.stop() == 0
