"""Side-by-side figures for exported networks: file size, load time, model-only throughput.

    python -m export.measure runs/NAME/export/model.pt runs/NAME/export_onnx/model.onnx runs/NAME/export_aoti/model.pt2
    python -m export.measure runs/NAME/export/model.pt runs/NAME/export_onnx/model.onnx --plain-torchscript

Model-only means the network alone (``handler.network.load_network``), no decode, geometry or
post-processing: the ceiling a served endpoint cannot pass. The formats are timed in alternating
rounds so that a busy machine slows both alike; each figure is the median of the rounds. Load time
is measured in a fresh interpreter per try (torch and torchvision already imported, as in a
TorchServe worker), median of ``--loads``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from handler.card import ModelCard
from handler.network import Network, load_network, network_format, torchscript_on_purpose

LOAD = """
import sys, time, json, torch, torchvision.ops
from handler.network import load_network
t = time.perf_counter()
if sys.argv[2] == "plain":
    torch.jit.load(sys.argv[1], map_location="cpu")
else:
    load_network(sys.argv[1], "cpu")
print(json.dumps(time.perf_counter() - t))
"""
PLAIN = " (plain)"  # a TorchScript file as torch.jit.load gives it: not frozen, not optimised for inference


def load_seconds(path: Path, tries: int, plain: bool = False) -> float:
    """Median seconds for ``load_network`` (or a plain ``torch.jit.load``) in a fresh interpreter."""
    root = Path(__file__).resolve().parent.parent
    times = []
    for _ in range(tries):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, str(Path(path).resolve()), "plain" if plain else "served"],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
        )
        times.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def candidates(paths: list[Path], plain_torchscript: bool) -> dict[str, Network]:
    """The networks to time, by label: each file as the handler loads it, and optionally each
    TorchScript file as loaded plainly (what the CPU optimisation is measured against)."""
    nets = {}
    for p in paths:
        nets[str(p)] = load_network(p, "cpu")
        if plain_torchscript and network_format(p).name == "torchscript":
            with torchscript_on_purpose():
                nets[str(p) + PLAIN] = torch.jit.load(str(p), map_location="cpu").eval()
    return nets


def throughput(
    nets: dict[str, Network], size: tuple[int, int], batches: list[int], rounds: int, seconds: float
) -> dict[str, dict[int, float]]:
    """Images per second per network and batch size, the networks alternating within each round."""
    out: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in nets}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, *size)
            for net in nets.values():
                for _ in range(2):
                    net(x)  # warm-up (TorchScript's profiling runs)
            for _ in range(rounds):
                for p, net in nets.items():
                    n, start = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - start) < seconds:
                        net(x)
                        n += b
                    out[p][b].append(n / elapsed)
    return {p: {b: statistics.median(v) for b, v in per.items()} for p, per in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m export.measure", description=__doc__)
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="model.pt / model.pt2 / model.onnx files (their model.json beside them)",
    )
    p.add_argument(
        "--plain-torchscript",
        action="store_true",
        help="also time each model.pt as torch.jit.load gives it (not frozen or optimised for the CPU)",
    )
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per file, batch and round")
    p.add_argument("--loads", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    nets = candidates(a.files, a.plain_torchscript)
    speed = throughput(
        nets, ModelCard.load(a.files[0].parent).preprocessing.size, batches, a.rounds, a.seconds
    )
    rows = []
    for label in nets:
        plain = label.endswith(PLAIN)
        f = Path(label.removesuffix(PLAIN))
        rows.append(
            {
                "file": str(f),
                "format": network_format(f).name + (PLAIN if plain else ""),
                "mb": round(f.stat().st_size / 1e6, 1),
                "compile_s": ModelCard.load(f.parent).export.get("compile_seconds"),
                "load_s": round(load_seconds(f, a.loads, plain), 3),
                "img_per_s": {b: round(v, 1) for b, v in speed[label].items()},
            }
        )
    print(
        f"torch {torch.__version__}, {a.threads} threads, batches {batches}, {a.rounds} rounds x {a.seconds} s"
    )
    print("| format | file | MB | compile s | load s | " + " | ".join(f"img/s b{b}" for b in batches) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in batches) + " |")
    for r in rows:
        speeds = " | ".join(f"{r['img_per_s'][b]:.1f}" for b in batches)
        print(
            f"| {r['format']} | {Path(r['file']).name} | {r['mb']} | {r['compile_s'] or '-'} | {r['load_s']} | {speeds} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
