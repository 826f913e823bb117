"""Shared pytest fixtures: start the real `mkts` binary on free ports with a fresh data directory.

The binary is `$MKTS_BIN`, else `$CARGO_TARGET_DIR/debug/mkts`, else `target/debug/mkts` (built by the
test command before pytest runs).
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mkts_bin() -> str:
    if os.environ.get("MKTS_BIN"):
        return os.environ["MKTS_BIN"]
    tgt = os.environ.get("CARGO_TARGET_DIR")
    for cand in ([Path(tgt) / "debug" / "mkts"] if tgt else []) + [REPO / "target" / "debug" / "mkts"]:
        if cand.exists():
            return str(cand)
    raise RuntimeError("mkts binary not found; run `cargo build` first or set MKTS_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running mkts server. `config_extra` is appended to the generated mkts.yml."""

    def __init__(self, workdir: Path, config_extra: str = "", root: Path | None = None, tls_ca: Path | None = None):
        self.workdir = Path(workdir)
        # With `tls:` in config_extra: the CA that signed the server's certificate (for localhost).
        self.tls_ca = Path(tls_ca) if tls_ca else None
        self.root = Path(root) if root else self.workdir / "data"
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.config_path = self.workdir / "mkts.yml"
        self.config_path.write_text(
            f"root_directory: {self.root}\n"
            f"listen_host: 127.0.0.1\n"
            f"listen_port: {self.http_port}\n"
            f"grpc_listen_port: {self.grpc_port}\n"
            f"log_level: info\n" + config_extra
        )
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def flight_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        if self.tls_ca:
            return f"https://localhost:{self.http_port}"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def rpc_url(self) -> str:
        return f"{self.http_url}/rpc"

    def start(self, timeout: float = 60.0) -> "Server":
        log = open(self.log_path, "ab")
        # Out-of-process plugins written in Python (`#!/usr/bin/env python3`) find this venv's pyarrow.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        self.proc = subprocess.Popen(
            [mkts_bin(), "start", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mkts exited with {self.proc.returncode}:\n{self.log()}")
            try:
                ctx = ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else None
                with urllib.request.urlopen(f"{self.http_url}/heartbeat", timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return self
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.05)
        raise RuntimeError(f"mkts did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    """Create servers on demand: `srv = server_factory(config_extra="...")`; stopped at teardown."""
    made: list[Server] = []

    def make(config_extra: str = "", root: Path | None = None, start: bool = True, tls_ca: Path | None = None) -> Server:
        wd = Path(tempfile.mkdtemp(dir=tmp_path))
        s = Server(wd, config_extra, root=root, tls_ca=tls_ca)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def server(server_factory) -> Server:
    """A fresh server with an empty data directory."""
    return server_factory()
