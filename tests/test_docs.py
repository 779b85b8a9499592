"""Every command line README.md, SECURITY.md and docs/*.md show is run here, or listed with the reason
it cannot run on this machine (``tests/doc_commands.py``: one list, one place).

First the bookkeeping: every command is a mention, listed as not run, or taken by a rule whose
test runs it; every ``python -m`` line parses; every ``make`` target exists. Then the runs, as
written, at tiny settings where a line trains or benches, each checked for what it is for:
training on datasets of each documented format, export, archive, the AOTInductor lines, the
bench, the client and every curl line against the run's shared TorchServe, the Python example.
Only what places a command on this machine is changed: server addresses and keys, where a model
store is, and the data's paths (the documents' own file names, made here).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from handler.network import NETWORK_FORMATS
from scripts.paths import ROOT
from tests import helpers
from tests.doc_commands import (
    CURL_DEFINITION,
    MENTIONS,
    NOT_RUN,
    RULES,
    Command,
    all_commands,
    commands_for,
    decision,
    make_recipe,
    python_modules,
)
from tests.helpers import Reference

COMMANDS = all_commands()


# -- the bookkeeping ----------------------------------------------------------------------------------
def test_every_documented_command_is_run_or_listed():
    """A command no rule runs and no list names fails here, with where it is shown; so does a list
    entry that no document shows any more, and a rule whose test is gone."""
    lost = [str(c) for c in COMMANDS if decision(c) == ("", "")]
    assert not lost, (
        "documented commands that no test runs and tests/doc_commands.py does not list (run them "
        "through a rule in RULES, or add them to NOT_RUN with the reason):\n  " + "\n  ".join(lost)
    )
    keys = {c.key for c in COMMANDS}
    stale = sorted(set(NOT_RUN) - keys) + sorted(set(MENTIONS) - keys)
    assert not stale, f"listed in tests/doc_commands.py but shown in no document: {stale}"
    for _name, test, _takes in RULES:
        module, _, function = test.partition("::")
        function = function.partition("[")[0]  # a parametrized test's id
        path = Path(__file__).with_name(module)
        assert re.search(rf"^def {function}\(", path.read_text(), re.M), f"rule names {test}, which is gone"
    unused = [name for name, _, _ in RULES if not commands_for(name)]
    assert not unused, f"rules that take no documented command: {unused}"


def test_the_docs_show_commands():
    """The extraction finds what the documents are known to show, so the checks are not vacuous."""
    modules = {c.module for c in COMMANDS if c.module}
    assert {
        "train",
        "export",
        "scripts.archive",
        "scripts.client",
        "scripts.bench",
        "export.measure",
    } <= modules
    assert sum(c.program == "make" for c in COMMANDS) >= 8
    assert len(commands_for("curl")) >= 18
    assert any(c.doc == "SECURITY.md" and decision(c)[0] == "run" for c in COMMANDS)
    assert any(c.kind == "python" for c in COMMANDS)
    # indented blocks (deploy.md's KServe steps) are read too
    assert any("gs://BUCKET" in c.text for c in COMMANDS)


PY_CASES = [
    (c, mod, argv) for c in COMMANDS for mod, argv in python_modules(c) if decision(c)[0] != "mention"
]


@pytest.mark.parametrize("c, module, argv", PY_CASES, ids=[f"{c.doc}:{c.lineno}" for c, _, _ in PY_CASES])
def test_python_command_parses(c, module, argv, monkeypatch, capsys):
    """Every ``python -m`` line, the ones that cannot run here too, is accepted by its module's argparse."""
    try:
        parse_only(module, argv, monkeypatch)
    except SystemExit as e:  # --help ends with 0
        if e.code == 0:
            return
        pytest.fail(f"{c}\n  argparse refused it (exit {e.code}): {capsys.readouterr().err.strip()}")


MAKE_CASES = [c for c in COMMANDS if c.program == "make"]


@pytest.mark.parametrize("c", MAKE_CASES, ids=[f"{c.doc}:{c.lineno}" for c in MAKE_CASES])
def test_make_target_exists(c):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for w in c.words[1:]:
        if "=" not in w:
            assert w in targets, f"{c}: no Makefile target {w!r}"


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_only(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``module``'s ``main(argv)`` up to and including argparse, and no further."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    main = entry_point(module)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except Parsed as p:
            return p.namespace
    raise AssertionError(f"{module}.main returned without parsing its arguments")


def entry_point(module: str):
    """``main`` of what ``python -m module`` runs (a package's own ``main``, else its __main__.py's)."""
    mod = importlib.import_module(module)
    return getattr(mod, "main", None) or importlib.import_module(f"{module}.__main__").main


def test_parse_only_refuses_what_argparse_refuses(monkeypatch):
    """The check above can fail: an unknown flag and a bad choice are refused."""
    with pytest.raises(SystemExit):
        parse_only("scripts.archive", ["runs/x/export", "--no-such-flag"], monkeypatch)
    with pytest.raises(SystemExit):
        parse_only("export", ["runs/x/best.ckpt", "--method", "onnx"], monkeypatch)
    ns = parse_only("scripts.archive", ["runs/x/export", "--device-ids", "0,1"], monkeypatch)
    assert ns.device_ids == (0, 1)


def test_extraction_reads_what_a_document_may_hold(tmp_path, monkeypatch):
    """Continuations, comments, indented and untagged blocks, inline code: each found where it is."""
    from tests import doc_commands

    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `make demo` or `python -m train` (a mention).\n\n"
        "```bash\n# a comment\npython -m export runs/X/best.ckpt \\\n    --freeze   # why\n"
        "(printf a) |\n  curl http://127.0.0.1:8080/ping\n```\n\n"
        "   ```\n   docker build .\n   not a command\n   ```\n"
    )
    monkeypatch.setattr(doc_commands, "ROOT", tmp_path)
    found = [(c.lineno, c.kind, c.key) for c in doc_commands.doc_commands(doc)]
    assert found == [
        (1, "inline", "make demo"),
        (1, "inline", "python -m train"),
        (5, "shell", "python -m export runs/X/best.ckpt --freeze"),
        (7, "shell", "(printf a) | curl http://127.0.0.1:8080/ping"),
        (12, "shell", "docker build ."),
    ]
    mention = Command("x.md", 1, "python -m train", "inline")
    assert doc_commands.is_mention(mention) and decision(mention)[0] == "mention"
    assert decision(Command("x.md", 1, "docker compose up", "shell")) == ("", "")


# -- running them ---------------------------------------------------------------------------------------
def run_main(module: str, argv: list[str], capsys) -> str:
    """``python -m module argv`` in this process (the current directory is the caller's); its stdout."""
    code = entry_point(module)(argv)  # an int is an exit status; some mains return their result
    out = capsys.readouterr()
    failed = isinstance(code, int) and code != 0
    assert not failed, (
        f"python -m {module} {shlex.join(argv)} -> {code}\n{out.out[-2000:]}\n{out.err[-2000:]}"
    )
    return out.out


def as_run(c: Command, tiny: list[str] = ()) -> list[str]:
    """The line's arguments, then ``tiny`` settings (argparse takes the last value of an option)."""
    return [*c.argv, *tiny]


def test_synthetic_data_command_runs(tmp_path, monkeypatch, capsys):
    """``python -m train.synthetic ...`` as written: the sizes it was given, with negatives."""
    [c] = commands_for("synthetic")
    monkeypatch.chdir(tmp_path)
    run_main("train.synthetic", c.argv, capsys)
    flags = dict(zip(c.argv[::2], c.argv[1::2], strict=False))
    out = tmp_path / flags["--out"]
    for split, key in (("train", "--train"), ("val", "--val")):
        coco = json.loads((out / f"{split}.json").read_text())
        assert len(coco["images"]) == int(flags[key]), c
        assert {a["image_id"] for a in coco["annotations"]} < {i["id"] for i in coco["images"]}, (
            "no negatives"
        )


# Datasets in each documented layout, made from the shared synthetic data (a few images each).
def write_datasets(synthetic: Path, where: Path) -> dict[str, int]:
    """data/synthetic, boxes.csv + val.csv + DIR/, train.json + val.json + imgs/, VOCdevkit/VOC2012:
    the files the training lines name. Returns the number of difficult VOC objects written."""
    shutil.copytree(synthetic, where / "data" / "synthetic")
    splits = {s: json.loads((synthetic / f"{s}.json").read_text()) for s in ("train", "val")}
    keep = {"train": 6, "val": 3}
    for s, coco in splits.items():
        coco["images"] = coco["images"][: keep[s]]
        ids = {i["id"] for i in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    names = {c["id"]: c["name"] for c in splits["train"]["categories"]}
    (where / "DIR").mkdir()
    (where / "imgs").mkdir()
    voc = where / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    difficult = 0
    for s, coco in splits.items():
        rows = ["image,xmin,ymin,xmax,ymax,label"]
        ids = []
        for img in coco["images"]:
            src = synthetic / img["file_name"]
            name = Path(img["file_name"]).name
            for d in ("DIR", "imgs"):
                shutil.copy(src, where / d / name)
            shutil.copy(src, voc / "JPEGImages" / name)
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            if not anns:  # a negative: listed with empty box columns
                rows.append(f"{name},,,,,")
            objects = ""
            for k, a in enumerate(anns):
                x, y, w, h = a["bbox"]
                rows.append(f"{name},{x},{y},{x + w},{y + h},{names[a['category_id']]}")
                hard = int(s == "train" and k == 1)  # some objects marked difficult: skipped by the line
                difficult += hard
                objects += (
                    f"<object><name>{names[a['category_id']]}</name><difficult>{hard}</difficult><bndbox>"
                    f"<xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin><xmax>{int(x + w)}</xmax>"
                    f"<ymax>{int(y + h)}</ymax></bndbox></object>"
                )
            (voc / "Annotations" / f"{Path(name).stem}.xml").write_text(
                f"<annotation><filename>{name}</filename>{objects}</annotation>"
            )
            ids.append(Path(name).stem)
        (where / f"{'boxes' if s == 'train' else 'val'}.csv").write_text("\n".join(rows) + "\n")
        (voc / "ImageSets" / "Main" / f"{s}.txt").write_text("\n".join(ids) + "\n")
        flat = {**coco, "images": [{**i, "file_name": Path(i["file_name"]).name} for i in coco["images"]]}
        (where / f"{s}.json").write_text(json.dumps(flat))
    return {"difficult": difficult}


TRAIN_TINY = ["--epochs", "1", "--max-steps", "1", "--batch-size", "2", "--image-size", "128"]
BACKBONES = {"small": "mobilenetv3_large_100", "efficientdet_d0": "efficientnet_b0",
             "tf_efficientnetv2_l_512": "tf_efficientnetv2_l"}  # fmt: skip


@pytest.mark.train
@pytest.mark.timeout(600)
def test_training_commands_run(synthetic_dir, tmp_path, monkeypatch, capsys):
    """Each ``python -m train`` line that runs on a CPU, on a small dataset of its format in the files
    it names, for one step at 128x128: it writes the run, the model it names, the classes of its data,
    and (VOC) skips the difficult objects as its flag says."""
    cases = commands_for("train")
    assert {a for c in cases for a in c.argv if a in ("synthetic", "csv", "coco", "voc")} == {
        "synthetic", "csv", "coco", "voc"
    }  # fmt: skip
    made = write_datasets(synthetic_dir, tmp_path)
    assert made["difficult"] > 0
    monkeypatch.chdir(tmp_path)
    for c in cases:
        out = run_main("train", as_run(c, TRAIN_TINY), capsys)
        flags = dict(zip(c.argv, c.argv[1:], strict=False))
        run = tmp_path / flags["--out"]
        assert {"best.ckpt", "last.ckpt", "model.json"} <= {p.name for p in run.iterdir()}, c
        card = json.loads((run / "model.json").read_text())
        model = flags.get("--model", "small")
        assert card["effdet_config"]["backbone_name"] == BACKBONES[model], c
        assert card["classes"] and card["provenance"]["steps"] == 1, c
        if flags["--format"] == "voc":
            assert f"difficult boxes skipped={made['difficult']}" in out, (c, out[-1500:])


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A copy of the shared trained run as runs/NAME, in the test's own directory."""
    run = tmp_path / "runs" / "NAME"
    run.mkdir(parents=True)
    for name in ("best.ckpt", "model.json"):
        shutil.copy(trained_run / name, run / name)
    return run


@pytest.mark.compile
def test_export_commands_run(run_dir, tmp_path, monkeypatch, capsys):
    """Each TorchScript export line on the shared trained run as runs/NAME: the files it says it
    writes, the method and freeze it names, the parity gate passed."""
    cases = commands_for("export")
    assert len(cases) >= 3
    monkeypatch.chdir(tmp_path)
    for c in cases:
        out = run_main("export", c.argv, capsys)
        export = run_dir / "export"
        assert sorted(p.name for p in export.iterdir()) == ["index_to_name.json", "model.json", "model.pt"], c
        card = json.loads((export / "model.json").read_text())["export"]
        method = "trace" if "trace" in c.argv else "script"
        assert card["method"] == method and card["frozen"] == ("--freeze" in c.argv), c
        assert card["parity"]["max_abs_diff"] <= card["parity"]["tolerance"], c
        assert f"[export] TorchScript, {method}" in out, c
        shutil.rmtree(export)


def test_archive_commands_run(exported, tmp_path, monkeypatch, capsys):
    """Each archive line on the shared export (the GPU one too: archiving only writes its settings):
    the .mar it names, with the settings it gives."""
    cases = commands_for("archive")
    assert cases
    for name in ("NAME", "effdet_demo"):
        shutil.copytree(exported, tmp_path / "runs" / name / "export")
    monkeypatch.chdir(tmp_path)
    for i, c in enumerate(cases):
        store = tmp_path / f"store{i}"
        out = run_main("scripts.archive", [*c.argv, "--model-store", str(store)], capsys)
        check_archive(c, store, out)


def check_archive(c: Command, store: Path, out: str) -> None:
    flags = dict(zip(c.argv[1::2], c.argv[2::2], strict=False))  # after the export dir: --flag value
    [mar] = store.glob("*.mar")
    assert mar.name == f"{flags.get('--name', 'effdet_demo')}.mar" and f"wrote {mar} (" in out, c
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
    model_file = {p.name for p in (Path(c.argv[0])).iterdir()} & {f.file for f in NETWORK_FORMATS.values()}
    assert manifest["serializedFile"] in model_file, c
    expect = {"--version": (manifest["modelVersion"], str), "--batch-size": (cfg["batchSize"], int),
              "--max-batch-delay": (cfg["maxBatchDelay"], int), "--min-workers": (cfg["minWorkers"], int),
              "--max-workers": (cfg["maxWorkers"], int), "--device-type": (cfg["deviceType"], str),
              "--precision": (cfg["handler"]["precision"], str)}  # fmt: skip
    for flag, (got, kind) in expect.items():
        if flag in flags:
            assert got == kind(flags[flag]), (c, flag, got)


@pytest.mark.compile  # its fixture is fetched in the body, so conftest cannot give it the marker
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["aoti", "onnx"])
def test_format_commands_run(fmt, exported, tmp_path, monkeypatch, capsys, request):
    """The AOTInductor and ONNX lines: the export line is the one conftest's ``aoti_run`` /
    ``onnx_run`` ran (the real CLI in a fresh interpreter, on the shared run's checkpoint); the
    archive lines package its file; ``export.measure`` compares the files it names (one batch, one
    short round)."""
    from handler.network import NETWORK_FORMATS
    from tests.conftest import AOTI_ARGV, ONNX_ARGV

    fmt_dir, stdout = request.getfixturevalue(f"{fmt}_run")
    argv = {"aoti": AOTI_ARGV, "onnx": ONNX_ARGV}[fmt]
    network = NETWORK_FORMATS[fmt]
    cases = commands_for(fmt)
    by_module = {
        m: [c for c in cases if c.module == m] for m in ("export", "scripts.archive", "export.measure")
    }
    assert by_module["export"], cases
    for c in by_module["export"]:
        assert c.argv == argv, f"{c}: conftest's {fmt}_run runs another line"
    assert (fmt_dir / network.file).is_file() and network.title in stdout
    run = tmp_path / "runs" / "NAME"
    run.mkdir(parents=True)
    (run / "export").symlink_to(exported)
    (run / fmt_dir.name).symlink_to(fmt_dir)
    monkeypatch.chdir(tmp_path)
    for i, c in enumerate(by_module["scripts.archive"]):
        store = tmp_path / f"store{i}"
        check_archive(c, store, run_main("scripts.archive", [*c.argv, "--model-store", str(store)], capsys))
    tiny = ["--batches", "1", "--rounds", "1", "--seconds", "0.05", "--loads", "1"]
    for c in by_module["export.measure"]:
        out = run_main("export.measure", as_run(c, tiny), capsys)
        for f in c.argv[:2]:
            assert f in out, (c, out)


def test_demo_options_shown(capsys):
    """``python -m scripts.demo --help`` (README) lists what the README says it does: the data's size,
    the epochs, and where the outputs go."""
    for c in commands_for("demo-cli"):
        with pytest.raises(SystemExit) as done:
            entry_point("scripts.demo")(c.argv)
        assert done.value.code == 0, c
        out = capsys.readouterr().out
        for flag in ("--train-images", "--val-images", "--epochs", "--image-size", "--runs", "--model-store",
                     "--data"):  # fmt: skip
            assert flag in out, (c, flag)


def test_python_example_runs(exported, val_images, detector, tmp_path, monkeypatch, capsys):
    """The README's Python example, as written, on the shared export as runs/NAME/export and a.jpg:
    it prints what Detector.predict gives."""
    [c] = commands_for("python")
    shutil.copytree(exported, tmp_path / "runs" / "NAME" / "export")
    (tmp_path / "a.jpg").write_bytes(val_images[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(c.text, str(c), "exec"), {"__name__": "__example__"})
    printed = capsys.readouterr().out.strip()
    want = detector.predict([val_images[0]], score_threshold=0.3)
    assert want[0]["detections"] and printed == str(want)


# -- the bench ------------------------------------------------------------------------------------------
# Tiny settings: what a line names it keeps; sizes of work (repeats, images, requests) shrink, and a
# line that names no export benches the shared one (instead of runs/effdet_demo's, or a model the
# bench would train for minutes: a model trained for a step scores nothing the post-processing
# check could compare). The served stages (TorchServe, the model's settings and the null handler's)
# run for the line that names served settings, and only they; the other lines run the in-process stages.
BENCH_TINY = ["--repeats", "1", "--warmup", "0", "--images", "2", "--image-side", "96", "--requests", "4",
              "--served-repeats", "1", "--no-progress", "--no-photo-memory", "--overload", "2:6:1:1:1"]  # fmt: skip
# The overload point (capacity clients : clients : deadline s : window s : warm-up s) always shrinks, and so does
# every named served setting to one worker; the photo sizes, the photos' and the null handler's served
# settings unless named. The served worker's memory for 40 MP images
# is test_photos.py's.
BENCH_SMALLER = {"--batches": "1,2", "--configs": "2:5:1", "--concurrency": "2", "--image-sizes": "160x120,320x240",
                 "--photo-config": "2:5:1", "--null-configs": "2:5:1"}  # fmt: skip
SERVED_FLAGS = ("--configs", "--concurrency", "--requests", "--served-repeats", "--null-configs")


def bench_argv(c: Command, out: Path, export: Path, held_out: Path) -> list[str]:
    """The line's arguments at tiny settings (accuracy on ``held_out``'s few scenes)."""
    if c.program == "make":
        module, *argv = make_recipe(c)
        assert module == "scripts.bench", c
    else:
        argv = c.argv
    named = {a for a in argv if a.startswith("--")}
    if "--configs" in named:  # the settings a line names, each with one worker (a worker start is seconds)
        at = argv.index("--configs") + 1
        one = ",".join(f"{cfg.rsplit(':', 1)[0]}:1" for cfg in argv[at].split(","))
        argv = [*argv[:at], one, *argv[at + 1 :]]
    tiny = [*BENCH_TINY, "--out", str(out), "--photo-data", str(held_out)]
    tiny += [] if "--export" in named else ["--export", str(export)]
    for flag, value in BENCH_SMALLER.items():
        if flag not in named:
            tiny += [flag, value]
    if "--stages" not in named:  # the line's default stages: the in-process ones, or the served ones
        served = bool(named & set(SERVED_FLAGS))  # its flags are about; the other lines run the rest
        tiny += ["--stages", "served,null" if served else "model,effdet,post,handler,fp16"]
    return [*argv, *tiny]


@pytest.mark.server
@pytest.mark.timeout(900)
def test_bench_commands_run(exported, tmp_path, monkeypatch, capsys):
    """Each bench line at tiny settings: it finishes without a failed stage, writes its JSON, table and
    plot, and the figures are there for the stages it ran: the served points (the null handler's
    included) with every request answered 200. The accuracy stage scores two held-out scenes (each
    is upscaled to 4032 px and decoded twice: ~2 s a scene)."""
    from scripts import bench
    from train.synthetic import write_split

    held_out = tmp_path / "held_out"
    write_split(held_out, "val", 2, random.Random(1))
    cases = commands_for("bench")
    assert any(c.program == "make" for c in cases)
    served = [
        c for c in cases if "served" in bench.parse_args(bench_argv(c, tmp_path, exported, held_out)).stages
    ]
    assert served, "no bench line runs the served stages"
    (tmp_path / "runs" / "myrun").mkdir(parents=True)
    shutil.copytree(exported, tmp_path / "runs" / "myrun" / "export")
    monkeypatch.chdir(tmp_path)
    for i, c in enumerate(cases):
        out = tmp_path / f"bench{i}"
        argv = bench_argv(c, out, exported, held_out)
        running = list(helpers.LIVE_SERVERS)
        t0 = time.monotonic()
        results = bench.main(argv)
        capsys.readouterr()
        with capsys.disabled():
            print(f"\n{c}: {time.monotonic() - t0:.0f} s")
        assert helpers.LIVE_SERVERS == running, f"{c}: the bench left its TorchServe running"
        written = json.loads((out / "latest.json").read_text())
        assert not written.get("failures"), (c, written.get("failures"))
        assert (out / "latest.png").is_file(), c
        stages = bench.parse_args(argv).stages
        for stage in ("model", "post", "handler", "accuracy", "overload"):
            assert (stage in written) == (stage in stages), (c, stage)
        assert ("photos" in written) == bool({"photos", "photos_served"} & set(stages)), c
        if "served" in stages:
            served = results["served"] + results.get("null_handler", [])
            assert {e["kind"] for e in results["served"]} == {"model"}, c
            assert bool(results.get("null_handler")) == ("null" in stages), c
            for e in served:
                assert all(p["failed"] == 0 and set(p["statuses"]) == {"200"} for p in e["points"]), (c, e)


# -- against the shared TorchServe ----------------------------------------------------------------------
DOC_MODELS = ("effdet_demo", "NAME")  # the model names the documents' client and curl lines use


@pytest.fixture(scope="module")
def doc_server(shared_server, exported, tmp_path_factory):
    """The shared server with the documents' model names leased, and their archives made: NAME.mar and
    effdet_demo.mar (1.0), effdet_demo_v2.mar (2.0), from the shared export, default threshold 0."""
    from scripts.archive import archive
    from scripts.settings import ModelConfig

    made = tmp_path_factory.mktemp("doc_mars")
    cfg = ModelConfig(batch_size=2, max_batch_delay=5).with_handler(score_threshold=0.0)
    with shared_server.lease(*DOC_MODELS) as srv:
        for name in DOC_MODELS:
            srv.add(archive(exported, name, "1.0", made / name, cfg))
        srv.add(archive(exported, "effdet_demo", "2.0", made / "v2", cfg), "effdet_demo_v2.mar")
        yield srv


@pytest.fixture(scope="module")
def doc_detector(exported):
    """The in-process reference with the documents' archives' defaults (score threshold 0)."""
    from handler.detector import Detector

    return Detector(exported / "model.pt", score_threshold=0.0)


def fresh(srv, *names: str) -> None:
    """``names`` registered anew, version 1.0 with one worker, nothing else of theirs registered."""
    client = srv.client()
    for name in names:
        for e in sorted(client.describe(name) if client.manage("GET", f"/models/{name}").ok else [],
                        key=lambda e: bool(e.get("isDefault"))):  # fmt: skip
            client.unregister(name, e["modelVersion"])
        for twin in srv.store.glob(f"{name}.twin.mar"):
            twin.unlink()
        r = client.register(f"{name}.mar", initial_workers=1)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def images_here(val_images, tmp_path_factory) -> Path:
    """a.jpg and b.png, the files the documents send, in a directory of their own."""
    d = tmp_path_factory.mktemp("doc_images")
    (d / "a.jpg").write_bytes(val_images[0])
    Image.open(d / "a.jpg").save(d / "b.png")
    return d


@pytest.mark.timeout(600)
def test_client_commands_run(doc_server, doc_detector, images_here, monkeypatch, capsys):
    """Each ``python -m scripts.client`` line, in order, against the shared server serving the models
    the lines name. Only the server is pointed at (``--inference-url``, ``--management-url``,
    ``--key-file`` before the subcommand, ``--model-store`` after a scale line)."""
    from scripts.client.scale import default_entry, twin_of

    lines = [(c, fewer_workers(c.argv)) for c in commands_for("client")]
    cases = [(c, argv, parse_only("scripts.client", argv, monkeypatch)) for c, argv in lines]
    assert [ns.cmd for *_, ns in cases].count("scale") >= 3 and any(ns.cmd == "predict" for *_, ns in cases)
    fresh(doc_server, *{ns.model for *_, ns in cases})
    s = doc_server.server
    where = [
        "--inference-url",
        s.inference_url,
        "--management-url",
        s.management_url,
        "--key-file",
        str(s.key_file),
    ]
    reference = Reference(doc_detector, batch_size=2)
    monkeypatch.chdir(images_here)
    for c, argv, ns in cases:
        client = doc_server.client()
        if ns.cmd == "predict":
            answers = json_documents(run_main("scripts.client", [*where, *argv], capsys))
            assert [a["file"] for a in answers] == [str(p) for p in ns.images], c
            for a in answers:
                assert a["status"] == 200 and a["model"]["name"] == ns.model, (c, a)
                params = {"score_threshold": ns.score_threshold, "iou_threshold": ns.iou_threshold,
                          "max_detections": ns.max_detections}  # fmt: skip
                reference.check(a, (images_here / a["file"]).read_bytes(), **params)
            if ns.draw:
                with Image.open(ns.draw) as drawn, Image.open(ns.images[0]) as first:
                    assert drawn.format == "PNG" and drawn.size == first.size, c
        elif ns.cmd == "scale":
            before = default_entry(client, ns.model)
            printed = run_main(
                "scripts.client", [*where, *argv, "--model-store", str(doc_server.store)], capsys
            )
            [result] = json_documents(printed)
            had = len(before["workers"])
            assert (result["model"], result["workers_before"], result["workers"]) == (
                ns.model,
                had,
                ns.workers,
            ), c
            default = default_entry(client, ns.model)
            versions = [e["modelVersion"] for e in client.describe(ns.model)]
            assert len(default["workers"]) == ns.workers, (c, default["workers"])
            assert all(w["status"] == "READY" for w in default["workers"]), (c, default["workers"])
            if ns.workers >= had:
                assert result["method"] == "scale" and versions == [before["modelVersion"]], (c, result)
            else:  # switched to the twin version, the old one unregistered
                twin, twin_file = twin_of(before["modelVersion"], before["modelUrl"])
                assert result["method"] == "switch" and versions == [twin] == [default["modelVersion"]], c
                assert (doc_server.store / twin_file).is_file(), c
        else:
            pytest.fail(f"{c}: no check for `scripts.client {ns.cmd}` here: add one")


def fewer_workers(argv: list[str], most: int = 2) -> list[str]:
    """A client line with its ``--workers`` count capped at ``most``: up stays up and down stays down
    (the lines go 1 -> 2 -> 4 -> 1), for a worker start less per step (seconds each)."""
    if "--workers" not in argv:
        return argv
    at = argv.index("--workers") + 1
    return [*argv[:at], str(min(int(argv[at]), most)), *argv[at + 1 :]]


def json_documents(text: str) -> list[dict]:
    """The JSON values printed one after another (``json.dumps(..., indent=2)`` each)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        value, i = decoder.raw_decode(text, i)
        out.append(value)
    return out


CARD_KEYS = {"model", "classes", "image_size", "defaults", "limits", "device"}


class CurlRun:
    """The documents' curl lines against the shared server, each checked for what it is for."""

    def __init__(self, srv, reference: Reference, image: bytes, home: Path):
        self.srv, self.reference, self.image, self.home = srv, reference, image, home
        s = srv.server
        self.places = {
            "http://127.0.0.1:8080": s.inference_url,
            "http://127.0.0.1:8081": s.management_url,
            "http://127.0.0.1:8082": s.props["metrics_address"],
            "runs/serve/key_file.json": str(s.key_file),
        }

    def keys(self) -> dict:
        return {k: v["key"] for k, v in json.loads(self.srv.server.key_file.read_text()).items()}

    def run(self, prelude: str, command: str) -> tuple[str, str, int]:
        """(headers + body, body, HTTP status) of one line, as written but for the addresses and keys."""
        text = command
        for old, new in self.places.items():
            prelude, text = prelude.replace(old, new), text.replace(old, new)
        keys = self.keys()
        text = text.replace("<API key>", keys["API"]).replace("<inference key>", keys["inference"])
        env = {**os.environ, "HOME": str(self.home)}  # its .curlrc: -sS and the status after the body
        r = subprocess.run(["bash", "-c", f"{prelude}\n{text}"], cwd=self.home, env=env, capture_output=True,
                           text=True, timeout=300, check=False)  # fmt: skip
        codes = re.findall(r"^HTTP (\d{3})$", r.stdout, re.M)
        assert r.returncode == 0 and codes, f"{command}\n{r.stdout[-800:]}\n{r.stderr[-800:]}"
        full = r.stdout[: r.stdout.rindex("\nHTTP ")]
        body = re.split(r"\r?\n\r?\n", full, maxsplit=1)[1] if full.startswith("HTTP/") else full
        return full, body.strip(), int(codes[-1])

    def check(self, command: str, full: str, body: str, status: int, old_keys: dict) -> None:
        """What each documented call is for, asserted on its answer and on the server's state after it."""
        client = self.srv.client()
        assert status < 400, f"{command}\n-> HTTP {status}: {body[:500]}"
        if "/token?type=inference" in command:
            new = self.keys()["inference"]
            assert new != old_keys["inference"], "the inference key was not renewed"
            stale = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                    f"Authorization: Bearer {old_keys['inference']}",
                                    f"{self.srv.server.inference_url}/ping"], capture_output=True, text=True)  # fmt: skip
            assert stale.stdout == "400", "the old inference key still works"
        elif command.endswith("/ping"):
            assert json.loads(body) == {"status": "Healthy"}
        elif "/models?url=effdet_demo_v2.mar" in command:
            assert {e["modelVersion"] for e in client.describe("effdet_demo")} == {"1.0", "2.0"}
        elif "/invocations?" in command:
            self.reference.check(json.loads(body), self.image, score_threshold=0.3)
        elif "describe: True" in command:
            assert set(json.loads(body)) == CARD_KEYS
        elif "X-Request-Id:" in command:
            sent = re.search(r"X-Request-Id: ([\w-]+)", command)[1]
            assert re.search(rf"^x-client-request-id: {sent}\r?$", full, re.M | re.I), full[:600]
            assert json.loads(body)["request_id"] == sent
            self.reference.check(json.loads(body), self.image, score_threshold=0.0)
        elif "score_threshold=0.3 -F max_detections=20" in command:
            self.reference.check(json.loads(body), self.image, score_threshold=0.3, max_detections=20)
        elif '"score_threshold": 0.3' in command:
            self.reference.check(json.loads(body), self.image, score_threshold=0.3)
        elif "/predictions/effdet_demo/2.0" in command:
            answer = json.loads(body)
            assert answer["model"] == {"name": "effdet_demo", "version": "2.0"}
            self.reference.check(answer, self.image, score_threshold=0.0)
        elif "/predictions/effdet_demo" in command:  # raw bytes, PUT (-T) or the Docker section's
            self.reference.check(json.loads(body), self.image, score_threshold=0.0)
        elif "min_worker=2&max_worker=2" in command:
            [entry] = client.describe("effdet_demo", "1.0")
            assert len(entry["workers"]) == 2 and all(w["status"] == "READY" for w in entry["workers"])
        elif command.endswith("/models/effdet_demo/all"):
            assert {e["modelVersion"] for e in json.loads(body)} == {"1.0", "2.0"}
        elif "customized=true" in command:
            [entry] = json.loads(body)
            card = entry["customizedMetadata"]
            assert set(json.loads(card) if isinstance(card, str) else card) == CARD_KEYS
        elif command.endswith("/models/effdet_demo"):
            [entry] = json.loads(body)
            assert entry["modelVersion"] == self.default()
        elif "/2.0/set-default" in command:
            assert self.default() == "2.0"
        elif "-X DELETE" in command and command.endswith("/effdet_demo/1.0"):
            assert [e["modelVersion"] for e in client.describe("effdet_demo")] == ["2.0"]
        elif command.endswith("/metrics"):
            assert (
                re.search(r"^# TYPE \w+ (counter|gauge)", body, re.M)
                and "ts_inference_requests_total" in body
            )
        else:
            pytest.fail(f"no check for this documented curl line: add one to CurlRun.check\n{command}")

    def default(self) -> str:
        from scripts.client.scale import default_entry

        return default_entry(self.srv.client(), "effdet_demo")["modelVersion"]


@pytest.mark.timeout(600)
def test_curl_commands_run(doc_server, doc_detector, images_here, val_images):
    """Every curl line of the documents, in their order (deploy.md's walk-through first, its
    definitions of KEYS, key(), INF and MGMT before each), against the shared server serving
    effdet_demo 1.0 with effdet_demo_v2.mar in its store, as deploy.md assumes. Each is checked for
    what it is for: the key renewed and the old one refused, the version registered, the answer
    equal to the in-process one with the parameters it sends, the card, the echoed request id, the
    workers, the default version, the metrics."""
    cases = commands_for("curl")
    fresh(doc_server, "effdet_demo")
    home = images_here
    (home / ".curlrc").write_text('-sS\n-w "\\nHTTP %{http_code}\\n"\n')
    runner = CurlRun(doc_server, Reference(doc_detector, batch_size=2), val_images[0], home)
    prelude = "\n".join(c.text for c in cases if CURL_DEFINITION.match(c.text))
    commands = [c for c in cases if not CURL_DEFINITION.match(c.text)]
    assert len(commands) >= 17
    for c in commands:
        old = runner.keys()
        full, body, status = runner.run(prelude, c.text)
        runner.check(c.key, full, body, status, old)


def test_reference_checks_can_fail(doc_detector, val_images):
    """The checks above have teeth: the right answer passes; one row fewer or more (a cut by another
    max_detections), a parameter lost, or another image's answer fails."""
    ref = Reference(doc_detector, batch_size=2)
    data = val_images[0]
    want = ref.answer(data, score_threshold=0.3, max_detections=20)
    assert len(want["detections"]) == 20
    ref.check(want, data, score_threshold=0.3, max_detections=20)
    for wrong in (
        {**want, "detections": want["detections"][:19]},
        ref.answer(data, score_threshold=0.3, max_detections=21),
        ref.answer(data, score_threshold=0.0),
        ref.answer(val_images[1], score_threshold=0.3, max_detections=20),
    ):
        with pytest.raises(AssertionError):
            ref.check(wrong, data, score_threshold=0.3, max_detections=20)
