"""Every command line shown in README.md, SECURITY.md and docs/*.md is one the project accepts.

The command lines are read out of the documents' shell code blocks. Each ``python -m MODULE ...``
line is handed to that module's own ``main`` with argparse stopped right after parsing, so an
unknown or mistyped flag, a wrong choice or a missing argument fails here, naming the document
and line; each ``make TARGET`` must be a Makefile target. The commands that can run on this
machine are run for real by the tests that follow (against the conftest's tiny model).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from scripts.paths import ROOT

DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class DocLine:
    doc: str
    lineno: int
    text: str  # continuation lines joined

    def __str__(self) -> str:
        return f"{self.doc}:{self.lineno}: {self.text}"


def doc_lines(path: Path) -> list[DocLine]:
    """The shell lines of a document's code blocks (``\\`` continuations joined), with line numbers."""
    text = path.read_text()
    out = []
    for m in SHELL_BLOCK.finditer(text):
        first = text.count("\n", 0, m.start(1)) + 1
        pending, start = "", 0
        for i, line in enumerate(m.group(1).splitlines()):
            if not pending:
                start = first + i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined = (pending + line).strip()
            pending = ""
            if joined and not joined.startswith("#"):
                out.append(DocLine(str(path.relative_to(ROOT)), start, joined))
    return out


ALL_LINES = [line for doc in DOCS for line in doc_lines(doc)]


def python_commands(line: DocLine) -> list[tuple[str, list[str]]]:
    """(module, argv) of each ``python -m MODULE ...`` in a line (pipes and ``;`` split it)."""
    found = []
    for part in re.split(r"\s(?:\||;|&&)\s|\bdo\b", line.text):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words[:-2]):
            if re.fullmatch(r"(\S*/)?python3?", w) and words[i + 1] == "-m":
                args = [a.strip("[]") if a.startswith("[") or a.endswith("]") else a for a in words[i + 3 :]]
                # a shell variable stands for one of the values the document gives it
                args = ["seed" if a == "$model" else a for a in args]
                found.append((words[i + 2], args))
    return found


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_only(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``module``'s ``main(argv)`` up to and including argparse, and no further."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    # `python -m PACKAGE` runs PACKAGE/__main__.py; `python -m package.module` that module
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None) or importlib.import_module(f"{module}.__main__").main
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except Parsed as p:
            return p.namespace
    raise AssertionError(f"{module}.main returned without parsing its arguments")


PY_CASES = [(line, mod, argv) for line in ALL_LINES for mod, argv in python_commands(line)]


def test_the_docs_show_commands():
    """The extraction finds what the documents are known to show (so the tests below are not vacuous)."""
    modules = {mod for _, mod, _ in PY_CASES}
    assert {"train", "export", "scripts.archive", "scripts.client"} <= modules, modules
    assert sum(line.text.startswith("make ") for line in ALL_LINES) >= 4


@pytest.mark.parametrize("line, module, argv", PY_CASES, ids=[f"{c[0].doc}:{c[0].lineno}" for c in PY_CASES])
def test_python_command_parses(line, module, argv, monkeypatch, capsys):
    try:
        parse_only(module, argv, monkeypatch)
    except SystemExit as e:
        pytest.fail(f"{line}\n  argparse refused it (exit {e.code}): {capsys.readouterr().err.strip()}")


MAKE_CASES = [line for line in ALL_LINES if line.text.startswith("make ")]


@pytest.mark.parametrize("line", MAKE_CASES, ids=[f"{c.doc}:{c.lineno}" for c in MAKE_CASES])
def test_make_target_exists(line):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    words = shlex.split(line.text, comments=True)[1:]
    for w in words:
        if "=" not in w:
            assert w in targets, f"{line}: no Makefile target {w!r}"


def test_parse_only_refuses_what_argparse_refuses(monkeypatch):
    """The check above can fail: an unknown flag and a bad choice are refused."""
    with pytest.raises(SystemExit):
        parse_only("scripts.archive", ["runs/x/export", "--no-such-flag"], monkeypatch)
    with pytest.raises(SystemExit):
        parse_only("export", ["runs/x/best.ckpt", "--method", "onnx"], monkeypatch)
    ns = parse_only("scripts.archive", ["runs/x/export", "--device-ids", "0,1"], monkeypatch)
    assert ns.device_ids == (0, 1)


# -- the commands that can run here, run as written -----------------------------------------------
def run_as_written(module: str, argv: list[str], subs: dict[str, str], cwd: Path) -> str:
    """``python -m module argv`` with the documents' placeholders replaced; returns its stdout."""

    def sub(arg: str) -> str:
        for old, new in subs.items():
            arg = arg.replace(old, new)
        return arg

    cmd = [sys.executable, "-m", module, *map(sub, argv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    return r.stdout


def cases_of(module: str) -> list[tuple[DocLine, list[str]]]:
    return [(line, argv) for line, mod, argv in PY_CASES if mod == module]


@pytest.mark.slow
def test_archive_commands_run(exported, tmp_path):
    """Each archive line of the docs packages the conftest's export (the GPU one too: it only writes config)."""
    # An AOTInductor export takes minutes to compile: its archive line is parsed above and the
    # archiving of a compiled package is tested (through the same function) by test_export_aoti.
    cases = [
        (line, argv) for line, argv in cases_of("scripts.archive") if not argv[0].endswith("export_aoti")
    ]
    assert cases
    (tmp_path / "runs" / "NAME").mkdir(parents=True)
    shutil.copytree(exported, tmp_path / "runs" / "NAME" / "export")
    shutil.copytree(exported, tmp_path / "runs" / "effdet_demo" / "export")
    for i, (line, argv) in enumerate(cases):
        store = tmp_path / f"store{i}"
        out = run_as_written("scripts.archive", [*argv, "--model-store", str(store)], {}, tmp_path)
        [mar] = store.glob("*.mar")
        assert f"wrote {mar} (" in out, line
        with zipfile.ZipFile(mar) as z:
            cfg = yaml.safe_load(z.read("model-config.yaml"))
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))  # after the export dir: --flag value pairs
        if "--batch-size" in flags:
            assert cfg["batchSize"] == int(flags["--batch-size"]), line
        if "--device-type" in flags:
            assert cfg["deviceType"] == flags["--device-type"], line


@pytest.mark.slow
def test_export_commands_run(trained_run, tmp_path):
    """Each export line of the docs, on a copy of the conftest's trained run as runs/NAME."""
    # --format aoti compiles for minutes: test_export_aoti runs that command line on the same run.
    cases = [(line, argv) for line, argv in cases_of("export") if "aoti" not in argv]
    assert len(cases) >= 2
    run = tmp_path / "runs" / "NAME"
    run.mkdir(parents=True)
    for name in ("best.ckpt", "model.json"):
        shutil.copy(trained_run / name, run / name)
    for line, argv in cases:
        out = run_as_written("export", argv, {}, tmp_path)
        card = json.loads((run / "export" / "model.json").read_text())
        method = "trace" if "trace" in argv else "script"
        assert card["export"]["method"] == method and card["export"]["frozen"] == ("--freeze" in argv), line
        assert f"[export] {method}" in out, line
        shutil.rmtree(run / "export")


@pytest.mark.slow
def test_synthetic_data_command_runs(tmp_path):
    cases = cases_of("train.synthetic")
    assert cases
    for line, argv in cases:
        run_as_written("train.synthetic", argv, {}, tmp_path)
        flags = dict(zip(argv[::2], argv[1::2], strict=False))
        out = tmp_path / flags["--out"]
        train = json.loads((out / "train.json").read_text())
        assert len(train["images"]) == int(flags["--train"]), line


# -- the curl walk-through of docs/deploy.md, against a real TorchServe ----------------------------
DEPLOY = ROOT / "docs" / "deploy.md"
DEFINITIONS = re.compile(r"^(KEYS=|key\(\)|INF=|MGMT=)")


def curl_walkthrough() -> list[str]:
    """The shell lines of deploy.md's token and curl blocks, in order (``\\`` and ``|`` continue a line)."""
    out: list[str] = []
    for block in SHELL_BLOCK.findall(DEPLOY.read_text()):
        if "KEYS=" not in block and 'INF="Authorization' not in block:
            continue
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
            elif line.endswith("|"):
                pending += line + " "
            else:
                joined = (pending + line).strip()
                pending = ""
                if joined and not joined.startswith("#"):
                    out.append(joined)
    return out


@pytest.fixture
def deploy_server(exported, tmp_path):
    """effdet_demo 1.0 served and effdet_demo_v2.mar (version 2.0) in the store, as deploy.md assumes."""
    from scripts.archive import archive
    from scripts.settings import ModelConfig
    from tests.helpers import serving

    store = tmp_path / "model_store"
    archive(exported, "effdet_demo", "1.0", store, ModelConfig())
    archive(exported, "effdet_demo", "2.0", tmp_path / "v2", ModelConfig())
    (tmp_path / "v2" / "effdet_demo.mar").rename(store / "effdet_demo_v2.mar")
    with serving(tmp_path / "ts", store, ["effdet_demo=effdet_demo.mar"]) as srv:
        yield srv


@pytest.mark.slow
def test_deploy_curl_lines_run_as_written(deploy_server, val_images, tmp_path):
    """Every curl line of docs/deploy.md's walk-through, in order, answers below 400.

    Only the addresses and the key file's path are replaced (the server runs on free ports); the
    status of each call is read through a ``.curlrc`` (``-w``), so the lines themselves are as written.
    """
    srv = deploy_server
    lines = curl_walkthrough()
    commands = [line for line in lines if not DEFINITIONS.match(line)]
    assert len(commands) >= 15 and all("curl" in c for c in commands), commands
    home = tmp_path / "home"
    home.mkdir()
    (home / ".curlrc").write_text('-sS\n-w "\\nHTTP %{http_code}\\n"\n')
    (tmp_path / "a.jpg").write_bytes(val_images[0])
    urls = {
        "http://127.0.0.1:8080": srv.inference_url,
        "http://127.0.0.1:8081": srv.management_url,
        "http://127.0.0.1:8082": srv.props["metrics_address"],
        "runs/serve/key_file.json": str(srv.key_file),
    }

    def local(text: str) -> str:
        for old, new in urls.items():
            text = text.replace(old, new)
        return text

    prelude = "\n".join(local(line) for line in lines if DEFINITIONS.match(line))
    env = {**os.environ, "HOME": str(home)}
    for command in commands:
        r = subprocess.run(["bash", "-c", f"{prelude}\n{local(command)}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        codes = re.findall(r"^HTTP (\d{3})$", r.stdout, re.M)
        assert r.returncode == 0 and codes, f"{command}\n{r.stdout[-800:]}\n{r.stderr[-800:]}"
        assert int(codes[-1]) < 400, f"{command}\n-> HTTP {codes[-1]}: {r.stdout[-800:]}"
        if "/predictions/" in command and "describe" not in command:
            body = r.stdout[: r.stdout.rindex("HTTP ")].strip()
            assert '"detections"' in body, f"{command}\n{body[:500]}"


# -- the scripts.client lines, against a real TorchServe -------------------------------------------
def json_documents(text: str) -> list[dict]:
    """The JSON values printed one after another (``json.dumps(..., indent=2)`` each)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        value, i = decoder.raw_decode(text, i)
        out.append(value)
    return out


@pytest.mark.slow
def test_client_commands_run(exported, detector, val_images, tmp_path, monkeypatch):
    """Each ``python -m scripts.client`` line of the docs, in order, against one TorchServe serving
    the models the lines name (archives of the conftest's export).

    Only the server is pointed at: ``--inference-url``, ``--management-url`` and ``--key-file``
    go before the subcommand, ``--model-store`` after a scale line (the server runs on free ports
    in tmp_path); the rest of each line is as written.
    """
    from PIL import Image

    from scripts.archive import archive
    from scripts.client import Client
    from scripts.client.scale import default_entry
    from scripts.settings import ModelConfig
    from tests.helpers import serving

    cases = [
        (line, argv, parse_only("scripts.client", argv, monkeypatch))
        for line, argv in cases_of("scripts.client")
    ]
    commands = [ns.cmd for _, _, ns in cases]
    assert commands.count("predict") >= 1 and commands.count("scale") >= 3, cases
    models = sorted({ns.model for _, _, ns in cases})
    store = tmp_path / "model_store"
    for name in models:
        archive(exported, name, "1.0", store, ModelConfig())
    (tmp_path / "a.jpg").write_bytes(val_images[0])
    with Image.open(tmp_path / "a.jpg") as img:
        img.save(tmp_path / "b.png")
    with serving(tmp_path / "ts", store, [f"{m}={m}.mar" for m in models]) as srv:
        where = ["--inference-url", srv.inference_url, "--management-url", srv.management_url,
                 "--key-file", str(srv.key_file)]  # fmt: skip
        client = Client(srv.inference_url, srv.management_url, srv.key_file)
        for line, argv, ns in cases:
            if ns.cmd == "predict":
                out = run_as_written("scripts.client", [*where, *argv], {}, tmp_path)
                check_predict(line, json_documents(out), ns, detector, tmp_path)
            elif ns.cmd == "scale":
                before = default_entry(client, ns.model)
                out = run_as_written(
                    "scripts.client", [*where, *argv, "--model-store", str(store)], {}, tmp_path
                )
                check_scale(line, json_documents(out), ns, before, client, store)
            else:
                pytest.fail(f"{line}: no check for `scripts.client {ns.cmd}` here: add one")


def check_predict(line: DocLine, answers: list[dict], ns: argparse.Namespace, detector, cwd: Path) -> None:
    """One JSON answer per file, in order, each the in-process answer; the first drawn as a PNG."""
    from PIL import Image

    assert [a["file"] for a in answers] == [str(p) for p in ns.images], f"{line}\n{answers}"
    for answer in answers:
        assert answer["status"] == 200 and answer["model"]["name"] == ns.model, f"{line}\n{answer}"
        data = (cwd / answer["file"]).read_bytes()
        want = detector.predict([data], ns.score_threshold, ns.iou_threshold, ns.max_detections)[0]
        assert {k: answer[k] for k in ("image", "detections")} == want, line
    if ns.draw:
        with Image.open(cwd / ns.draw) as drawn, Image.open(cwd / ns.images[0]) as first:
            assert drawn.format == "PNG" and drawn.size == first.size, line


def check_scale(
    line: DocLine, printed: list[dict], ns: argparse.Namespace, before: dict, client, store: Path
) -> None:
    """Up: TorchServe's call on the default version. Down: the default switched to the twin version
    with the new count, the old version unregistered."""
    from scripts.client.scale import default_entry, twin_of

    [result] = printed
    had = len(before["workers"])
    assert (result["model"], result["workers_before"], result["workers"]) == (ns.model, had, ns.workers), line
    assert result["version_before"] == before["modelVersion"], line
    print(f"\n{line.doc}:{line.lineno}: {result['method']} {had} -> {ns.workers} in {result['seconds']} s")
    entries = client.describe(ns.model)
    default = default_entry(client, ns.model)
    assert len(default["workers"]) == ns.workers, f"{line}\n{default['workers']}"
    assert all(w["status"] == "READY" for w in default["workers"]), f"{line}\n{default['workers']}"
    if ns.workers >= had:
        assert result["method"] == "scale" and result["version"] == before["modelVersion"], line
        assert [e["modelVersion"] for e in entries] == [before["modelVersion"]], line
    else:
        twin_version, twin_file = twin_of(before["modelVersion"], before["modelUrl"])
        assert result["method"] == "switch" and result["version"] == twin_version, line
        assert [e["modelVersion"] for e in entries] == [twin_version], line  # the old version is gone
        assert default["modelVersion"] == twin_version and (store / twin_file).is_file(), line
