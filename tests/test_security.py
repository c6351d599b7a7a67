"""Access control: the server listens on 127.0.0.1 by default, serves gRPC over TLS and checks a
bearer token on every RPC when told to; model names, symlinks, default_model_filename and
config overrides cannot make it import or load anything outside the repository."""

from __future__ import annotations

import ipaddress
import json
import queue
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from launcher.errors import CommandError
from serving.cli import add_llm_model
from serving.security import auth_token
from tests.backend_helpers import write_model
from tests.reliability_support import ECHO, ECHO_CONFIG, ECHO_MODEL, add_echo, echo_inputs, start
from tests.reliability_support import expect_error as _expect_error
from tests.serving_helpers import Server

TOKEN = "s3cret-token-for-tests"
X = np.arange(4, dtype=np.float32)
# an outside model.py that leaves a mark when it is imported: the mark must never appear
MARKING_MODEL = ECHO_MODEL + '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("imported")
'''


def expect_error(call, status: str, *fragments: str) -> str:
    return _expect_error(call, status, *fragments)


# --- default address ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    """Explicit model control, no TLS, no token; the repository has traps around it."""
    tmp = tmp_path_factory.mktemp("security-plain")
    repo = tmp / "repo"
    add_echo(repo)
    outside = tmp / "outside"
    write_model(outside, "evil", ECHO_CONFIG.format(name="evil", instances=1, extra=""),
                {"model.py": MARKING_MODEL})
    srv = start(repo, tmp / "server.log", "--model-control-mode", "explicit",
                "--load-model", ECHO)
    srv.repo, srv.outside = repo, outside / "evil"
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # grpc may bind ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _other_address() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_listens_on_loopback_only_by_default(plain: Server) -> None:
    port = int(plain.url.rsplit(":", 1)[1])
    listening = [c.laddr for c in psutil.Process(plain.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert any(a.port == port for a in listening), listening
    assert all(_loopback(a.ip) for a in listening), listening  # gRPC and metrics
    other = _other_address()
    if other is not None:  # reachable on loopback, refused on the machine's own address
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((other, port)) != 0
    with grpcclient.InferenceServerClient(plain.url) as c:
        assert c.is_server_live()


# --- names and files that would leave the repository -------------------------------------------
def _load(client, name: str, config: dict | None = None) -> None:
    client.load_model(name, config=json.dumps(config) if config is not None else None)


def test_names_cannot_escape(plain: Server, checkpoint_dir) -> None:
    with grpcclient.InferenceServerClient(plain.url) as c:
        for name in ["../outside/evil", "..", ".", "/etc", "a/b", f"{plain.outside}", "..\\x",
                     ".hidden", ""]:
            expect_error(lambda name=name: _load(c, name), "INVALID_ARGUMENT", "model name")
            expect_error(lambda name=name: c.unload_model(name), "INVALID_ARGUMENT",
                         "model name")
            assert not c.is_model_ready(name)
        expect_error(lambda: c.get_model_config("../outside/evil"), "INVALID_ARGUMENT")
        expect_error(lambda: c.get_model_metadata("../outside/evil"), "INVALID_ARGUMENT")
        expect_error(lambda: c.infer("../outside/evil", echo_inputs(X)), "INVALID_ARGUMENT")
        with pytest.raises(CommandError, match="model name"):
            add_llm_model(plain.repo, "../evil", checkpoint_dir("llama"))
    assert not (plain.outside / "1" / "IMPORTED").exists()


@pytest.mark.parametrize("layout", ["model folder", "version folder", "model file",
                                    "helper module"])
def test_symlinks_out_of_the_repository_are_refused(plain: Server, layout: str) -> None:
    name = f"link_{layout.replace(' ', '_')}"
    entry = plain.repo / name
    if layout == "model folder":
        entry.symlink_to(plain.outside, target_is_directory=True)
    else:
        entry.mkdir()
        (entry / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name, instances=1,
                                                               extra=""))
        if layout == "version folder":
            (entry / "1").symlink_to(plain.outside / "1", target_is_directory=True)
        else:
            (entry / "1").mkdir()
            (entry / "1" / "model.py").write_text(ECHO_MODEL)
            target = "model.py" if layout == "model file" else "helper.py"
            (entry / "1" / target).unlink(missing_ok=True)
            (entry / "1" / target).symlink_to(plain.outside / "1" / "model.py")
    with grpcclient.InferenceServerClient(plain.url) as c:
        message = expect_error(lambda: _load(c, name), "INVALID_ARGUMENT", "outside")
        assert "repository" in message
        assert not c.is_model_ready(name)
        assert c.infer(ECHO, echo_inputs(X)).as_numpy("OUT").tolist() == (2 * X + 1).tolist()
    assert not (plain.outside / "1" / "IMPORTED").exists()


def test_config_overrides_cannot_point_outside(plain: Server, checkpoint_dir) -> None:
    base = {"backend": "python", "input": [{"name": "IN", "data_type": "TYPE_FP32",
                                            "dims": [-1]}],
            "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [-1]}]}
    evil_file = str(plain.outside / "1" / "model.py")
    with grpcclient.InferenceServerClient(plain.url) as c:
        for filename in [evil_file, "../../../outside/evil/1/model.py", "sub/model.py", ".."]:
            expect_error(lambda f=filename: _load(c, ECHO, {**base,
                                                           "default_model_filename": f}),
                         "INVALID_ARGUMENT", "default_model_filename", "not a path")
        llm = {**base, "backend": "shardserve_llm",
               "parameters": {"model_path": {"string_value": str(checkpoint_dir("llama"))}}}
        expect_error(lambda: _load(c, ECHO, llm), "INVALID_ARGUMENT", "'model_path'",
                     "outside the model folder")
        llm["parameters"]["model_path"]["string_value"] = "../../.."
        expect_error(lambda: _load(c, ECHO, llm), "INVALID_ARGUMENT", "'model_path'")
        expect_error(lambda: _load(c, ECHO, {**base, "name": "../evil"}), "INVALID_ARGUMENT",
                     "differs from the model folder")
        expect_error(lambda: c.load_model(ECHO, files={"file:1/model.py": b"import os"}),
                     "UNIMPLEMENTED", "'file:'")
        # an override that stays inside is fine, and the model keeps serving through all this
        _load(c, ECHO, {**base, "default_model_filename": "model.py"})
        assert c.infer(ECHO, echo_inputs(X)).as_numpy("OUT").tolist() == (2 * X + 1).tolist()
    assert not (plain.outside / "1" / "IMPORTED").exists()


def test_config_pbtxt_may_reference_a_checkpoint_but_overrides_may_not_change_it(
        plain: Server, checkpoint_dir) -> None:
    """`repo add` without --copy writes an absolute model_path: the operator's config.pbtxt is
    trusted, so an override repeating it loads; one naming another folder does not."""
    add_llm_model(plain.repo, "ref_llm", checkpoint_dir("llama"), tp=1, force=True,
                  extra={"num_blocks": "8"})
    other = plain.outside.parent / "ck-copy"
    shutil.copytree(checkpoint_dir("llama"), other, dirs_exist_ok=True)
    override = {"backend": "shardserve_llm", "max_batch_size": 0,
                "model_transaction_policy": {"decoupled": True},
                "input": [{"name": "input_ids", "data_type": "TYPE_INT32", "dims": [-1]}],
                "output": [{"name": "output_ids", "data_type": "TYPE_INT32", "dims": [-1]}],
                "parameters": {"model_path": {"string_value": str(other)},
                               "num_blocks": {"string_value": "8"}}}
    with grpcclient.InferenceServerClient(plain.url) as c:
        expect_error(lambda: _load(c, "ref_llm", override), "INVALID_ARGUMENT",
                     "outside the model folder")
        assert not c.is_model_ready("ref_llm")
        override["parameters"]["model_path"]["string_value"] = str(checkpoint_dir("llama"))
        _load(c, "ref_llm", override)
        assert c.is_model_ready("ref_llm")
        c.unload_model("ref_llm")


# --- TLS and the bearer token -------------------------------------------------------------------
def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    """TLS with a self-signed certificate; the token comes from $SHARDSERVE_AUTH_TOKEN."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    tmp = tmp_path_factory.mktemp("security-tls")
    add_echo(tmp / "repo")
    cert, key = _self_signed(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDSERVE_AUTH_TOKEN", TOKEN)
        srv = start(tmp / "repo", tmp / "server.log", "--grpc-tls-cert", str(cert),
                    "--grpc-tls-key", str(key))
    srv.cert = cert
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def _tls_client(srv: Server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(srv.url, ssl=True,
                                            root_certificates=str(srv.cert))


def test_tls_with_token_serves(secure: Server) -> None:
    assert "(TLS)" in secure.text()
    headers = {"authorization": f"Bearer {TOKEN}"}
    with _tls_client(secure) as c:
        assert c.is_server_ready(headers=headers)
        result = c.infer(ECHO, echo_inputs(X, text=b"tls"), headers=headers)
    assert result.as_numpy("OUT").tolist() == (2 * X + 1).tolist()
    assert result.as_numpy("TEXT_OUT")[0] == b"TLS"
    results: queue.Queue = queue.Queue()
    with _tls_client(secure) as c:  # streaming checks the token too
        c.start_stream(lambda result, error: results.put((result, error)), headers=headers)
        c.async_stream_infer(ECHO, echo_inputs(X))
        r, e = results.get(timeout=20)
        c.stop_stream()
    assert e is None and r.as_numpy("OUT").tolist() == (2 * X + 1).tolist()


def test_plaintext_client_cannot_talk_to_tls(secure: Server) -> None:
    with grpcclient.InferenceServerClient(secure.url) as c:
        expect_error(lambda: c.is_server_live(headers={"authorization": f"Bearer {TOKEN}"},
                                              client_timeout=5), "UNAVAILABLE")


@pytest.mark.parametrize("headers, fragment", [
    (None, "missing 'authorization: Bearer <token>'"),
    ({"authorization": "Bearer wrong"}, "invalid bearer token"),
    ({"authorization": TOKEN}, "invalid bearer token"),  # no "Bearer " prefix
])
def test_every_rpc_needs_the_token(secure: Server, headers, fragment: str) -> None:
    with _tls_client(secure) as c:
        for rpc in (lambda: c.is_server_live(headers=headers),
                    lambda: c.is_server_ready(headers=headers),
                    lambda: c.get_server_metadata(headers=headers),
                    lambda: c.get_model_repository_index(headers=headers),
                    lambda: c.get_model_config(ECHO, headers=headers),
                    lambda: c.get_inference_statistics(ECHO, headers=headers),
                    lambda: c.unload_model(ECHO, headers=headers),
                    lambda: c.infer(ECHO, echo_inputs(X), headers=headers)):
            expect_error(rpc, "UNAUTHENTICATED", fragment)
        results: queue.Queue = queue.Queue()
        c.start_stream(lambda result, error: results.put((result, error)), headers=headers)
        try:  # the refusal may already have ended the stream
            c.async_stream_infer(ECHO, echo_inputs(X))
        except InferenceServerException:
            pass
        r, e = results.get(timeout=20)
        c.stop_stream()
    assert r is None and "UNAUTHENTICATED" in str(e.status()) and fragment in e.message()


def test_raw_grpc_without_token(secure: Server) -> None:
    creds = grpc.ssl_channel_credentials(secure.cert.read_bytes())
    with grpc.secure_channel(secure.url, creds) as ch:
        live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as info:
            live(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert live(b"", timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")]) == b"\x08\x01"


def test_token_flag_beats_environment() -> None:
    assert auth_token("flag", {"SHARDSERVE_AUTH_TOKEN": "env"}) == "flag"
    assert auth_token(None, {"SHARDSERVE_AUTH_TOKEN": "env"}) == "env"
    assert auth_token(None, {}) is None
    with pytest.raises(Exception, match="empty"):
        auth_token("  ", {})


def test_bad_tls_files_fail_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from launcher.cli import main

    add_echo(tmp_path / "repo")
    (tmp_path / "not.pem").write_text("nope")
    cmd = ["serve", "--model-repository", str(tmp_path / "repo"), "--grpc-port", "0",
           "--http-port", "0",
           "--no-metrics", "--grpc-tls-cert", str(tmp_path / "not.pem"), "--grpc-tls-key",
           str(tmp_path / "missing.pem")]
    assert main(cmd) != 0
    assert "not.pem is not PEM" in capsys.readouterr().err
    assert main(cmd[:-2]) != 0
    assert "go together" in capsys.readouterr().err
    (tmp_path / "not.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert main(cmd) != 0
    assert "missing.pem" in capsys.readouterr().err
