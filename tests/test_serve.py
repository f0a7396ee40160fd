"""`longswap serve`: one request to a loopback server returns a swapped model's completion."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from longswap.cli import main
from longswap.demo import EMBEDDED_MODEL
from longswap.serve import serve_problems

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def test_a_swapped_model_answers_a_completion_request(tmp_path, swapped):
    model = swapped
    port = free_port()
    command = [sys.executable, "-m", "longswap.cli", "serve", "--model", str(model)]
    log = (tmp_path / "server.log").open("w")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                ask(f"{url}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 180 s"
                time.sleep(1)
        listed = ask(f"{url}/v1/models")
        assert [m["id"] for m in listed["data"]] == [str(model)]
        body = {"model": str(model), "prompt": "def main():\n    ", "max_tokens": 8}
        body["temperature"] = 0
        answer = ask(f"{url}/v1/completions", body, timeout=120)
        assert answer["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_bad_arguments_are_refused_before_the_model_loads(tmp_path, capsys):
    assert any("--port must lie" in p for p in serve_problems(EMBEDDED_MODEL, 0))
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
