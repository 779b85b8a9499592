"""Every command line README.md, SECURITY.md and docs/*.md show, and what the tests do with it.

A command is a logical line (``\\`` and ``|`` continuations joined, comments dropped) of a
``bash``/``sh``/``shell``/``console`` code block, a line of any other untagged block that starts
with a program (``python``, ``make``, ``curl``, ``docker``, ...), a ``python`` code block as a
whole, or inline code in the text that starts with a program. Each one is, in this order:

- a ``MENTION``: inline code that names a program, option or subcommand in a sentence and is no
  command by itself (inline code holding ``...`` or only a program or ``python -m MODULE`` is one
  without being listed);
- ``NOT_RUN`` here, with the reason (Docker, Kubernetes, GPU, fixed ports, the suite itself);
- run by the test its rule in ``RULES`` names, at tiny settings where it trains or benches.

``tests/test_docs.py`` fails for a command that is none of these, and for a listed command that
no document shows any more. A new command in a document therefore fails until it runs (often
already: a new ``python -m export ...`` line is run by the export rule) or is listed here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scripts.paths import ROOT

DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
PROGRAMS = (
    "python", "python3", ".venv/bin/python", "make", "curl", "docker", "kubectl", "gsutil",
    "torchserve", "torch-model-archiver", "pytest", "ruff", "pip", "git", "bash",
)  # fmt: skip
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


@dataclass(frozen=True)
class Command:
    """One command as a document shows it."""

    doc: str  # path relative to the repository
    lineno: int
    text: str  # the logical line as written (continuations joined), or a python block's code
    kind: str  # "shell" (a shell block or an untagged one), "inline" or "python"

    def __str__(self) -> str:
        return f"{self.doc}:{self.lineno}: {self.text}"

    @property
    def key(self) -> str:
        """What identifies the command wherever it is shown: its text without the trailing
        comment, whitespace collapsed."""
        if self.kind == "python":
            return self.text.strip()
        return " ".join(strip_comment(self.text).split())

    @property
    def words(self) -> list[str]:
        return shlex.split(strip_comment(self.text))

    @property
    def program(self) -> str:
        words = [w for w in self.words if not ASSIGNMENT.fullmatch(w)]
        return words[0] if words else ""

    @property
    def module(self) -> str | None:
        """MODULE of the line's first ``python -m MODULE``."""
        found = python_modules(self)
        return found[0][0] if found else None

    @property
    def argv(self) -> list[str]:
        """The arguments after ``python -m MODULE``."""
        return python_modules(self)[0][1]


def strip_comment(text: str) -> str:
    """``text`` up to an unquoted ``#`` that starts a word (a shell comment)."""
    quote = None
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def python_modules(c: Command) -> list[tuple[str, list[str]]]:
    """(MODULE, arguments) of each ``python -m MODULE ...`` in a line (pipes, ``;`` and ``&&`` split it)."""
    if c.kind == "python":
        return []
    found = []
    for part in re.split(r"\s(?:\||;|&&)\s", strip_comment(c.text)):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        for i, w in enumerate(words[:-2]):
            if re.fullmatch(r"(\S*/)?python3?", w) and words[i + 1] == "-m":
                # `[--flag value]` marks an optional part: it is shown, so it is run
                args = [a.strip("[]") if a.startswith("[") or a.endswith("]") else a for a in words[i + 3 :]]
                found.append((words[i + 2], args))
    return found


def _logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    """(line number, text) of a shell block's lines, ``\\`` and trailing ``|`` continuations joined."""
    out, pending, start = [], "", first
    for i, raw in enumerate(body.splitlines()):
        line = raw.rstrip()
        if not pending:
            start = first + i
        if line.endswith("\\"):
            pending += line[:-1] + " "
        elif line.endswith("|") and not line.lstrip().startswith("#"):
            pending += line + " "
        else:
            joined = (pending + line).strip()
            pending = ""
            if joined and not joined.startswith("#"):
                out.append((start, joined))
    return out


def _starts_with_program(text: str) -> bool:
    words = text.split()
    while words and ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    return bool(words) and words[0] in PROGRAMS


def doc_commands(path: Path) -> list[Command]:
    text = path.read_text()
    doc = str(path.relative_to(ROOT))
    out: list[Command] = []
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start("body")) + 1
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines())
        lang = m.group("lang").lower()
        if lang == "python":
            out.append(Command(doc, first, body.strip(), "python"))
        elif lang in SHELL:
            out += [Command(doc, n, line, "shell") for n, line in _logical_lines(body, first)]
        elif not lang:
            out += [
                Command(doc, n, s, "shell") for n, s in _logical_lines(body, first) if _starts_with_program(s)
            ]
    # inline code in the text (fenced blocks blanked out, keeping line numbers)
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(prose):
        span = m.group(1).strip()
        if _starts_with_program(span):
            out.append(Command(doc, prose.count("\n", 0, m.start()) + 1, span, "inline"))
    return sorted(out, key=lambda c: c.lineno)


def all_commands() -> list[Command]:
    return [c for path in DOCS for c in doc_commands(path)]


# -- what happens to each command ----------------------------------------------------------------------
def is_mention(c: Command) -> bool:
    """Inline code that is no command by itself: listed in MENTIONS, holding ``...``, or only a
    program or ``python -m MODULE``."""
    if c.kind != "inline":
        return False
    words = c.key.split()
    return (
        c.key in MENTIONS
        or "..." in c.key
        or len(words) == 1
        or (len(words) == 3 and words[1] == "-m" and words[0] in PROGRAMS)
    )


MENTIONS = {
    "torchserve --start": "names what scripts.serve runs",
    "python -m scripts.client scale": "names the subcommand; the documented scale lines are run",
    "curl --data-binary": "the curl option the text warns about (test_hostile.py sends such requests)",
    "curl --data-binary @a.jpg": "the curl option the text warns about (test_hostile.py sends such requests)",
    "curl -T a.jpg": "the curl option the text recommends; deploy.md's walk-through runs it in full",
    "docker exec": "names docker's subcommand",
    "python -m scripts.bench --stages overload": (
        "names the stage the figures come from; docs/benchmarks.md's overload line runs it"
    ),
    "python -m scripts.client unregister NAME [VERSION]": (
        "the subcommand's synopsis; test_hostile.py unregisters through it with 16 requests in flight"
    ),
}

_FIXED_PORTS = (
    "binds the fixed ports of config.properties (8080-8082), which another server on a shared machine "
    "may hold; the same config rendered onto free ports is what every server test starts"
)
_SERVE = (
    f"{_FIXED_PORTS}; its recipe, `python -m scripts.serve start|stop`, runs on free ports in "
    "test_reliability.py (start) and test_cli.py (stop)"
)
_DOCKER = "Docker: no Docker daemon here; tests/test_deploy.py parses the Dockerfile and its config"
_GPU = "needs CUDA GPUs; the CPU paths of the same commands are run"
_DDP = "needs 4 GPUs (and 2 nodes); DDP on the CPU with gloo runs in test_train.py"
_FORMATS_BENCH = (
    "compiles an AOTInductor package from runs/effdet_demo's checkpoint (minutes); "
    "test_bench.py::test_bench_runs_the_three_formats_side_by_side runs --formats torchscript,aoti,onnx at "
    "tiny settings on the fixture files"
)
_OFFLINE = (
    "the offline wheel bundle: downloads from PyPI, then installs a second environment from it; "
    "`make setup` (what CI runs) installs the same pins from the index"
)
NOT_RUN = {
    "make test": "the whole suite: CI runs it (.ci/run)",
    "make test-fast": "the suite's unit layer, a subset of `make test`",
    "make soak": "the soak tests: long load tests, run on demand",
    "make lint": "ruff over the tree: CI runs it (.ci/run) before the tests",
    "make serve": _SERVE,
    "make serve NAME=NAME": _SERVE,
    "make stop": _SERVE,
    "torchserve --start --ts-config config.properties --model-store model_store --models effdet_demo=effdet_demo.mar": _FIXED_PORTS,
    "pytest -s tests/test_serving.py tests/test_reliability.py": "test modules of this suite: `make test` runs them",
    "docker build -f deploy/Dockerfile -t effdet-serve:cpu .": _DOCKER,
    "docker run -d --name effdet -p 8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082 effdet-serve:cpu": _DOCKER,
    "docker exec effdet cat /home/model-server/key_file.json": _DOCKER,
    'docker run --rm --entrypoint python effdet-serve:cpu -c "import torch; print(torch.__version__)"': _DOCKER,
    "kubectl apply -f deploy/kserve/inferenceservice.yaml": (
        "Kubernetes/KServe: no cluster here; test_deploy.py parses the InferenceService and "
        "test_handler.py runs v1 bodies through TorchServe's kserve envelope into the handler"
    ),
    "gsutil cp deploy/kserve/config.properties gs://BUCKET/effdet-serve/config/config.properties": "Google Cloud Storage: no bucket here",
    "gsutil cp model_store/effdet_demo.mar gs://BUCKET/effdet-serve/model-store/": "Google Cloud Storage: no bucket here",
    "(printf '{\"instances\": [{\"image\": \"'; base64 -w0 a.jpg; printf '\", \"score_threshold\": 0.3}]}') | "
    'curl -H "Host: effdet.default.example.com" -H "Content-Type: application/json" --data-binary @- '
    "http://$INGRESS/v1/models/effdet_demo:predict": (
        "needs a KServe ingress; test_handler.py sends v1 bodies through TorchServe's kserve envelope"
    ),
    "python -m export runs/NAME/best.ckpt --format aoti --device cuda --precision fp16": _GPU,
    "python -m train --data data/coco/train.json --format coco --accelerator gpu --devices 4 --strategy ddp "
    "--batch-size 8 --epochs 50 --out runs/effdet_4gpu": _DDP,
    "MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=0 python -m train --accelerator gpu --devices 4 "
    "--strategy ddp --num-nodes 2 --data ... --out runs/effdet_ddp": _DDP,
    "MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=1 python -m train --accelerator gpu --devices 4 "
    "--strategy ddp --num-nodes 2 --data ... --out runs/effdet_ddp": _DDP,
    ".venv/bin/python -m scripts.bench --formats torchscript,aoti,onnx": _FORMATS_BENCH,
    "python -m scripts.bench --formats torchscript,aoti,onnx": _FORMATS_BENCH,
    "python -m scripts.bench --quick --threads 1 --image-size 128 --formats torchscript,aoti": _FORMATS_BENCH,
    "bash scripts/gpu_check.sh seed": _GPU,
    "bash scripts/gpu_check.sh served": _GPU,
    "bash scripts/gpu_check.sh d0": _GPU,
    "bash scripts/gpu_check.sh formats": _GPU,
    "bash scripts/gpu_check.sh photos": _GPU,
    'pip download -d wheels torch==2.14.1 torchvision==0.29.1 onnxruntime-gpu ".[dev]"': _OFFLINE,
    "python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels torch==2.14.1 torchvision==0.29.1": _OFFLINE,
    '.venv/bin/pip install --no-index --find-links wheels -e ".[dev]"': _OFFLINE,
}  # fmt: skip


def _format(name: str) -> Callable[[Command], bool]:
    """Export, archive and measure lines of another network format than TorchScript."""
    return lambda c: c.module in ("export", "scripts.archive", "export.measure") and name in c.text


# The shell definitions deploy.md's curl lines use (the key file, key(), the two headers).
CURL_DEFINITION = re.compile(r"^(KEYS=|key\(\)|INF=|MGMT=)")


def _curl(c: Command) -> bool:
    return (c.program in ("curl", "(printf") and "127.0.0.1" in c.text) or bool(CURL_DEFINITION.match(c.text))


# (rule, the test that runs the commands it takes, which commands): the first rule that takes a
# command runs it. The tests read their commands from here (``commands_for``), so what a rule
# takes is what its test runs.
RULES: list[tuple[str, str, Callable[[Command], bool]]] = [
    ("aoti", "test_docs.py::test_format_commands_run[aoti]", _format("aoti")),
    ("onnx", "test_docs.py::test_format_commands_run[onnx]", _format("onnx")),
    ("synthetic", "test_docs.py::test_synthetic_data_command_runs", lambda c: c.module == "train.synthetic"),
    ("train", "test_docs.py::test_training_commands_run", lambda c: c.module == "train"),
    ("export", "test_docs.py::test_export_commands_run", lambda c: c.module == "export"),
    ("archive", "test_docs.py::test_archive_commands_run", lambda c: c.module == "scripts.archive"),
    ("client", "test_docs.py::test_client_commands_run", lambda c: c.module == "scripts.client"),
    ("bench", "test_docs.py::test_bench_commands_run", lambda c: c.module == "scripts.bench" or c.key == "make bench"),
    ("demo", "test_cli.py::test_demo_runs_end_to_end", lambda c: c.key == "make demo"),
    ("demo-cli", "test_docs.py::test_demo_options_shown", lambda c: c.module == "scripts.demo"),
    ("curl", "test_docs.py::test_curl_commands_run", _curl),
    ("python", "test_docs.py::test_python_example_runs", lambda c: c.kind == "python"),
]  # fmt: skip


def decision(c: Command) -> tuple[str, str]:
    """("mention" | "not run" | "run", why or the rule's name) for one command; ("", "") for none."""
    if is_mention(c):
        return "mention", MENTIONS.get(c.key, "inline code that is no command by itself")
    if c.key in NOT_RUN:
        return "not run", NOT_RUN[c.key]
    for name, _test, takes in RULES:
        if takes(c):
            return "run", name
    return "", ""


def commands_for(rule: str) -> list[Command]:
    """The documented commands ``rule``'s test runs (each distinct command once, first showing)."""
    seen, out = set(), []
    for c in all_commands():
        if decision(c) == ("run", rule) and c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def make_recipe(c: Command) -> list[str]:
    """The arguments after ``python -m MODULE`` in what ``make`` runs for a ``make`` line (``make -n``:
    printed, not run)."""
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", *c.words[1:]], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    line = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"\bpython3? -m (\S+)(.*)$", line)
    assert m, f"{c}: its recipe runs no python -m MODULE: {line}"
    return [m[1], *shlex.split(m[2])]
