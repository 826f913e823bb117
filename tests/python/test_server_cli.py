"""`mkts init` / `mkts start`: config handling and clear start-up errors."""
from __future__ import annotations

import socket
import subprocess

from conftest import Server, free_port, mkts_bin


def run(args, cwd, timeout=60):
    return subprocess.run([mkts_bin(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_init_writes_default_config_that_starts(tmp_path):
    r = run(["init", "--dir", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "mkts.yml").read_text()
    assert "root_directory: data" in text and "listen_port: 5993" in text and "grpc_listen_port: 5995" in text
    again = run(["init", "--dir", str(tmp_path)], tmp_path)
    assert again.returncode != 0 and "already exists" in again.stderr
    # The generated file runs (on free ports) with data under ./data beside it.
    s = Server(tmp_path)
    cfg = text.replace("listen_port: 5993", f"listen_port: {s.http_port}").replace("grpc_listen_port: 5995", f"grpc_listen_port: {s.grpc_port}")
    s.config_path.write_text(cfg)
    s.root = tmp_path / "data"
    s.start()
    try:
        assert (tmp_path / "data").is_dir()
    finally:
        assert s.stop() == 0


def test_port_in_use_is_one_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "mkts.yml").write_text(f"root_directory: data\nlisten_host: 127.0.0.1\nlisten_port: {port}\ngrpc_listen_port: {free_port()}\n")
        r = run(["start", "--config", "mkts.yml"], tmp_path)
    assert r.returncode == 1
    err = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port} (listen_port)" in err[0], r.stderr


def test_malformed_config_is_one_clear_error(tmp_path):
    (tmp_path / "mkts.yml").write_text("root_directory: data\nlisten_port: [1, 2\n")
    r = run(["start", "--config", "mkts.yml"], tmp_path)
    assert r.returncode == 1 and "malformed config file mkts.yml" in r.stderr, r.stderr
    (tmp_path / "mkts.yml").write_text("root_directory: data\nlisten_port: 1\nqueryable: perhaps\n")
    r = run(["start", "--config", "mkts.yml"], tmp_path)
    assert r.returncode == 1 and "invalid value for queryable" in r.stderr, r.stderr
    (tmp_path / "mkts.yml").write_text("root_directory: data\nlisten_port: 1\ntimezone: Mars/Olympus\n")
    r = run(["start", "--config", "mkts.yml"], tmp_path)
    assert r.returncode == 1 and "timezone" in r.stderr, r.stderr


def test_bad_root_directory_is_one_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mkts.yml").write_text(f"root_directory: {tmp_path / 'afile' / 'data'}\nlisten_port: {free_port()}\ngrpc_listen_port: {free_port()}\n")
    r = run(["start", "--config", "mkts.yml"], tmp_path)
    assert r.returncode == 1 and "cannot open data directory" in r.stderr, r.stderr


def test_unknown_keys_are_warned_by_name_and_second_server_on_same_root_refused(server_factory, tmp_path):
    srv = server_factory(config_extra="stale_threshold: 5\nmystery_option: 1\n")
    assert "mystery_option" in srv.log()
    other = Server(tmp_path, root=srv.root)
    r = run(["start", "--config", str(other.config_path)], tmp_path)
    assert r.returncode == 1 and "in use by another mkts process" in r.stderr, r.stderr


def test_sigterm_stops_cleanly(server):
    assert server.stop() == 0
    assert "stopped cleanly" in server.log()
