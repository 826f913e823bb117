"""Start a throwaway mkts server from a notebook: a temp data directory, free loopback ports, `mkts start`.

    from mkts_server import start_server
    srv = start_server()                 # or start_server(config_extra="triggers: ...")
    srv = start_server(config=text)      # a whole mkts.yml; {root}, {http_port}, {grpc_port} are filled in
    srv.flight_url, srv.rpc_url          # grpc://127.0.0.1:<port>, http://127.0.0.1:<port>/rpc
    srv.stop()                           # SIGTERM: a clean shutdown (final checkpoint), returns the exit code

The binary is `$MKTS_BIN`, else `mkts` on PATH, else `target/debug/mkts` of this repository
(`cargo build --bin mkts`). The server's log is `srv.log()`; everything lives under `srv.dir`, removed at stop.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mkts_bin() -> str:
    if os.environ.get("MKTS_BIN"):
        return os.environ["MKTS_BIN"]
    on_path = shutil.which("mkts")
    if on_path:
        return on_path
    for cand in [Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "mkts"]:
        if cand.exists():
            return str(cand)
    raise RuntimeError("no mkts binary: set MKTS_BIN, put mkts on PATH, or run `cargo build --bin mkts`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config_extra: str = "", keep: bool = False, config: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="mkts-nb-"))
        self.keep = keep
        self.http_port, self.grpc_port = free_port(), free_port()
        self.config = (config.replace("{root}", str(self.dir / "data")).replace("{http_port}", str(self.http_port))
                       .replace("{grpc_port}", str(self.grpc_port)) + config_extra) if config is not None else (
            f"root_directory: {self.dir / 'data'}\n"
            f"listen_host: 127.0.0.1\n"
            f"listen_port: {self.http_port}\n"
            f"grpc_listen_port: {self.grpc_port}\n"
            f"log_level: info\n" + config_extra
        )
        self.config_path = self.dir / "mkts.yml"
        self.config_path.write_text(self.config)
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None

    flight_url = property(lambda self: f"grpc://127.0.0.1:{self.grpc_port}")
    http_url = property(lambda self: f"http://127.0.0.1:{self.http_port}")
    rpc_url = property(lambda self: f"{self.http_url}/rpc")

    def start(self, timeout: float = 60.0) -> "Server":
        # Plugins written in Python (`#!/usr/bin/env python3`) find this kernel's packages (pyarrow).
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([mkts_bin(), "start", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mkts exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/heartbeat", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mkts did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return code


def start_server(config_extra: str = "", keep: bool = False, config: str | None = None) -> Server:
    """A running server; stopped when the kernel exits if the notebook does not stop it."""
    srv = Server(config_extra, keep=keep, config=config).start()
    atexit.register(srv.stop)
    return srv
