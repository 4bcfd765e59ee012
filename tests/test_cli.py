"""The command line as a user meets it: the package layout (no command-line module imported by
``import cimext``, no import cycles, the library never importing cimext.cli), one-run output
folders, and the table of bad command lines: every one exits non-zero with exactly one line on
stderr and no traceback (in-process calls of main; a handful of real subprocesses)."""

from __future__ import annotations

import ast
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cimext"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
LIBRARY = ("worstcase", "train", "writeverify", "bitflip", "nn", "ops")


# ------------------------------------------------------------------------------ layout
def test_import_cimext_imports_no_command_line():
    code = (
        "import sys, cimext; print([m for m in sys.modules if m.startswith('cimext.cli') "
        "or m == 'bench' or m.startswith('bench.')])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The cimext modules ``path`` imports anywhere in it (function level too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cimext")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("cimext"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                is_mod = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py"
                ).is_file()
                out.add(sub if is_mod else mod)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "triton_kernels" not in p.parts]
    return {_module_name(p): _imports(p) for p in files}


def test_library_never_imports_the_command_line():
    bad = [
        (m, d)
        for m, deps in _graph().items()
        if not m.startswith("cimext.cli")
        for d in deps
        if d.startswith("cimext.cli")
    ]
    assert bad == []


def test_no_import_cycles():
    """No cycle among cimext's modules, counting every import (function-level ones too), except
    a submodule importing its own package's ``__init__`` (which Python resolves fine)."""
    graph = _graph()

    def edges(m):
        # `from . import x` from inside a package reaches the package __init__ only by name.
        return {d for d in graph.get(m, ()) if d in graph and not m.startswith(d + ".")}

    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    cli_or_app = [c for c in cycles if any(x.startswith(("cimext.cli", "cimext.zoo")) for x in c)]
    assert cli_or_app == [], cli_or_app
    lib = [c for c in cycles if any(x.split(".")[1:2] and x.split(".")[1] in LIBRARY for x in c)]
    assert lib == [], lib


def test_console_script_points_at_the_cli_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'cimext = "cimext.cli:main"' in text


def test_python_dash_m_cimext_cli_help():
    r = subprocess.run(
        [sys.executable, "-m", "cimext.cli", "--help"], capture_output=True, text=True, env=ENV
    )
    assert r.returncode == 0
    for name in ("train", "worst-case", "montecarlo", "compare", "write-verify", "bitflip"):
        assert name in r.stdout
    for name in ("demo", "reproduce", "bench"):
        assert name in r.stdout


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A LeNet on digits trained for one epoch by `cimext train` (a few seconds)."""
    from cimext.cli import main

    out = tmp_path_factory.mktemp("run") / "lenet"
    assert main(["train", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_run):
    """Damaged inputs: MNIST folders (truncated gzip, not gzip, label 12), a run with NaN
    weights, a run with a truncated checkpoint, a plain file."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    base = tmp_path_factory.mktemp("bad")

    def idx(arr: np.ndarray) -> bytes:
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        return head + arr.astype(np.uint8).tobytes()

    imgs = np.zeros((20, 28, 28), np.uint8)
    labels = np.arange(20) % 10
    for name, img, lab in (
        ("truncated", gzip.compress(idx(imgs))[:50], gzip.compress(idx(labels))),
        ("notgzip", b"this is not gzip at all", gzip.compress(idx(labels))),
        ("label12", gzip.compress(idx(imgs)), gzip.compress(idx(np.full(20, 12)))),
    ):
        d = base / name
        d.mkdir()
        for i_stem, l_stem in (
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ):
            (d / f"{i_stem}.gz").write_bytes(img)
            (d / f"{l_stem}.gz").write_bytes(lab)
    nan = base / "nan_run"
    nan.mkdir()
    (nan / "train.json").write_text((trained_run / "train.json").read_text())
    state = load_file(str(trained_run / "model.safetensors"))
    first = next(k for k in state if k.endswith("weight"))
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    save_file(state, str(nan / "model.safetensors"))
    (base / "plain.txt").write_text("x")
    return base


def _damaged_checkpoint(trained_run: Path, tmp: Path) -> Path:
    import shutil

    out = tmp / "resume"
    shutil.copytree(trained_run, out)
    ck = out / "checkpoints" / "last.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    return out


# ------------------------------------------------------------------------------ the table
INT_BAD = ["0", "-1", "x", "1.5"]
FLOAT_BAD = ["nan", "inf", "-1", "x"]
SEED_BAD = ["-1", str(2**64), str(2**64 + 5), "x", "1.5"]

# subcommand -> (int options that must be >= 1, positive float options, has --seed)
OPTIONS = {
    "train": (["--epochs", "--batch-size", "--adv-steps"], ["--lr", "--train-th-g"], True),
    "worst-case": (["--batch-size", "--mc-n", "--lwc-steps", "--search-steps"], ["--eta"], True),
    "montecarlo": (["--n", "--batch-size", "--bins"], ["--th-g"], True),
    "compare": (
        ["--epochs", "--batch-size", "--lwc-steps", "--search-steps"],
        ["--lr", "--train-th-g"],
        False,
    ),
    "write-verify": (
        ["--epochs", "--batch-size", "--instances", "--max-pulses", "--calib"],
        ["--lr", "--width"],
        True,
    ),
    "bitflip": (
        ["--epochs", "--batch-size", "--seeds", "--eval-batch", "--test-samples"],
        ["--lr", "--tol", "--width"],
        True,
    ),
    "demo": (["--mc-n"], [], True),
    "reproduce": (["--eval-images", "--mc-n", "--epochs"], [], False),
    "bench": ([], [], False),
}


def _generated() -> list[tuple[str, list[str]]]:
    cases = []
    for cmd, (ints, floats, has_seed) in OPTIONS.items():
        out_opt = [] if cmd == "bench" else ["--out", "{tmp}/out"]
        for opt in ints:
            cases += [(f"{cmd} {opt} {v}", [cmd, opt, v, *out_opt]) for v in INT_BAD]
        for opt in floats:
            cases += [(f"{cmd} {opt} {v}", [cmd, opt, v, *out_opt]) for v in FLOAT_BAD]
        if has_seed:
            cases += [(f"{cmd} --seed {v}", [cmd, "--seed", v, *out_opt]) for v in SEED_BAD]
        cases.append((f"{cmd} --bogus", [cmd, "--bogus", *out_opt]))
        cases.append((f"{cmd} positional", [cmd, "extra", *out_opt]))
        if cmd != "bench":
            cases.append((f"{cmd} --out ''", [cmd, "--out", ""]))
            cases.append((f"{cmd} --out file", [cmd, "--out", "{bad}/plain.txt"]))
            cases.append((f"{cmd} --out file/sub", [cmd, "--out", "{bad}/plain.txt/sub"]))
            cases.append((f"{cmd} --out .", [cmd, "--out", "."]))
            cases.append((f"{cmd} --quiet=yes", [cmd, "--quiet=yes", *out_opt]))
            cases.append((f"{cmd} --dataset imagenet", [cmd, "--dataset", "imagenet", *out_opt]))
            cases.append((f"{cmd} --out (no value)", [cmd, "--out"]))
        if cmd in ("train", "worst-case", "montecarlo", "compare", "write-verify", "bitflip"):
            cases.append((f"{cmd} --model alexnet", [cmd, "--model", "alexnet", *out_opt]))
    return cases


LISTED: list[tuple[str, list[str]]] = [
    ("no subcommand", []),
    ("unknown subcommand", ["frobnicate"]),
    ("bench --device tpu", ["bench", "--device", "tpu"]),
    ("bench --device cuda without a GPU", ["bench", "--device", "cuda:0"]),
    ("bench --json DIR", ["bench", "--json", "{tmp}"]),
    ("bench --json ''", ["bench", "--json", ""]),
    ("bench --json no/such/dir", ["bench", "--json", "{tmp}/no/such/bench.json"]),
    ("bench --backend cuda", ["bench", "--backend", "cuda"]),
    ("bench --case nothing", ["bench", "--case", "no such case", "--list"]),
    ("train digits vgg11 (8x8 too small)", ["train", "--model", "vgg11", "--out", "{tmp}/o"]),
    ("train mnist truncated gz", ["train", "--dataset", "mnist", "--root", "{bad}/truncated"]),
    ("train mnist not gzip", ["train", "--dataset", "mnist", "--root", "{bad}/notgzip"]),
    ("train mnist labels above 9", ["train", "--dataset", "mnist", "--root", "{bad}/label12"]),
    ("train mnist missing", ["train", "--dataset", "mnist", "--root", "{tmp}"]),
    ("train cifar10 missing", ["train", "--dataset", "cifar10", "--root", "{tmp}/none"]),
    ("train --method magic", ["train", "--method", "magic"]),
    ("train --metric best", ["train", "--metric", "best"]),
    ("train --alpha 2", ["train", "--alpha", "2"]),
    ("train --alpha nan", ["train", "--alpha", "nan"]),
    ("train --quant x", ["train", "--quant", "x"]),
    ("train --quant 0,4", ["train", "--quant", "0,4"]),
    ("train --quant 4,4,4", ["train", "--quant", "4,4,4"]),
    ("train --weight-bits 0 --method va", ["train", "--weight-bits", "0", "--method", "va"]),
    ("train --weight-bits 7 (K=2)", ["train", "--weight-bits", "7"]),
    ("train --bits-per-device 0", ["train", "--bits-per-device", "0"]),
    ("train --sigma -1", ["train", "--sigma", "-1", "--method", "va"]),
    ("train --sigma nan", ["train", "--sigma", "nan"]),
    ("train --sigma-t 0", ["train", "--sigma-t", "0"]),
    ("train --optimizer lbfgs", ["train", "--optimizer", "lbfgs"]),
    ("train --init missing", ["train", "--init", "{tmp}/none.safetensors"]),
    ("train --init not safetensors", ["train", "--init", "{bad}/plain.txt"]),
    ("train --width 0", ["train", "--model", "convnet", "--width", "0"]),
    ("train --init NaN weights", ["train", "--init", "{bad}/nan_run/model.safetensors"]),
    (
        "write-verify --init NaN weights",
        ["write-verify", "--init", "{bad}/nan_run/model.safetensors"],
    ),
    ("bitflip --init NaN weights", ["bitflip", "--init", "{bad}/nan_run/model.safetensors"]),
    ("train resume truncated checkpoint", ["train", "--epochs", "1", "--out", "{resume}"]),
    ("train resume with another --model", ["train", "--model", "convnet", "--out", "{run}"]),
    ("worst-case --run missing", ["worst-case", "--run", "{tmp}/none"]),
    ("worst-case --run a file", ["worst-case", "--run", "{bad}/plain.txt"]),
    ("worst-case NaN weights", ["worst-case", "--run", "{bad}/nan_run", "--method", "flwc"]),
    ("worst-case --method magic", ["worst-case", "--method", "magic"]),
    ("worst-case --th-g 0", ["worst-case", "--th-g", "0"]),
    ("worst-case --th-g decreasing", ["worst-case", "--th-g", "0.03,0.01"]),
    ("worst-case --th-g x", ["worst-case", "--th-g", "x"]),
    ("worst-case --th-g inf", ["worst-case", "--th-g", "inf"]),
    ("worst-case --budget huge", ["worst-case", "--budget", "huge"]),
    ("worst-case --eta above th_g", ["worst-case", "--eta", "0.5"]),
    ("worst-case --split all", ["worst-case", "--split", "all"]),
    ("worst-case convnet default", ["worst-case", "--model", "convnet"]),
    ("worst-case --quant 4,x", ["worst-case", "--quant", "4,x"]),
    ("montecarlo --run missing", ["montecarlo", "--run", "{tmp}/none"]),
    ("montecarlo NaN weights", ["montecarlo", "--run", "{bad}/nan_run", "--n", "2"]),
    ("montecarlo --sigma without --unverified", ["montecarlo", "--sigma", "0.1"]),
    ("montecarlo --unverified --sigma -1", ["montecarlo", "--unverified", "--sigma", "-1"]),
    ("montecarlo --th-g 0", ["montecarlo", "--run", "{run}", "--th-g", "0"]),
    ("montecarlo --tail 1.5", ["montecarlo", "--run", "{run}", "--tail", "1.5"]),
    ("montecarlo --tail -0.1", ["montecarlo", "--run", "{run}", "--tail", "-0.1"]),
    ("montecarlo --tail x", ["montecarlo", "--run", "{run}", "--tail", "x"]),
    ("montecarlo --tail empty", ["montecarlo", "--run", "{run}", "--tail", ","]),
    ("montecarlo --tail nan", ["montecarlo", "--run", "{run}", "--tail", "nan"]),
    ("montecarlo --tail-n 0", ["montecarlo", "--run", "{run}", "--tail", "0.9", "--tail-n", "0"]),
    ("montecarlo --tail-method", ["montecarlo", "--tail", "0.9", "--tail-method", "magic"]),
    ("compare --methods", ["compare", "--methods", "vanilla,magic"]),
    ("compare --methods twice", ["compare", "--methods", "vanilla,vanilla"]),
    ("compare --methods empty", ["compare", "--methods", ","]),
    ("compare --th-g zero", ["compare", "--th-g", "0.01,zero"]),
    ("compare --th-g -0.01", ["compare", "--th-g", "-0.01"]),
    ("compare --main-th-g", ["compare", "--main-th-g", "0.05"]),
    ("compare --eval-samples -1", ["compare", "--eval-samples", "-1"]),
    ("compare --seeds a", ["compare", "--seeds", "a"]),
    ("compare --seeds -1", ["compare", "--seeds", "-1"]),
    ("compare --seeds 2**64", ["compare", "--seeds", str(2**64)]),
    ("compare --seeds twice", ["compare", "--seeds", "1,1"]),
    ("compare --quant x", ["compare", "--quant", "x"]),
    ("write-verify --methods", ["write-verify", "--methods", "magic"]),
    ("write-verify --fractions 2", ["write-verify", "--fractions", "0.1,2"]),
    ("write-verify --fractions x", ["write-verify", "--fractions", "x"]),
    ("write-verify --level-sigma x", ["write-verify", "--level-sigma", "1,x"]),
    ("write-verify --level-sigma 3 values", ["write-verify", "--level-sigma", "1,1,1"]),
    ("write-verify --tolerance 100", ["write-verify", "--tolerance", "100"]),
    ("write-verify --tolerance nan", ["write-verify", "--tolerance", "nan"]),
    ("write-verify --hessian exact", ["write-verify", "--hessian", "exact"]),
    ("write-verify --granularity bit", ["write-verify", "--granularity", "bit"]),
    ("write-verify --weight-bits 7", ["write-verify", "--weight-bits", "7"]),
    ("write-verify --sigma -1", ["write-verify", "--sigma", "-1"]),
    ("write-verify --init missing", ["write-verify", "--init", "{tmp}/none"]),
    (
        "write-verify --init other model",
        ["write-verify", "--model", "convnet", "--init", "{run}/model.safetensors"],
    ),
    ("write-verify vgg11 on digits", ["write-verify", "--model", "vgg11"]),
    ("bitflip --dtypes", ["bitflip", "--dtypes", "float64"]),
    ("bitflip --bits", ["bitflip", "--bits", "nonsense"]),
    ("bitflip --ps 2", ["bitflip", "--ps", "0.1,2"]),
    ("bitflip --ps x", ["bitflip", "--ps", "x"]),
    ("bitflip --ps nan", ["bitflip", "--ps", "nan"]),
    ("bitflip --targets all", ["bitflip", "--targets", "all"]),
    ("bitflip --resize 0", ["bitflip", "--resize", "0"]),
    ("bitflip --dtypes empty", ["bitflip", "--dtypes", ","]),
    ("bitflip --init missing", ["bitflip", "--init", "{tmp}/none"]),
    ("reproduce --parts", ["reproduce", "--parts", "everything"]),
    ("reproduce --parts empty", ["reproduce", "--parts", ","]),
    ("reproduce --dataset imagenet", ["reproduce", "--dataset", "imagenet"]),
    ("reproduce --seeds x", ["reproduce", "--seeds", "0,x"]),
    ("reproduce --seeds repeated", ["reproduce", "--seeds", "1,1"]),
    ("reproduce --seeds negative", ["reproduce", "--seeds=-1"]),
    ("reproduce --seeds empty", ["reproduce", "--seeds", ","]),
    ("reproduce --root", ["reproduce", "--root", "{tmp}"]),
    ("demo --th-g 0", ["demo", "--th-g", "0"]),
    ("demo --th-g x", ["demo", "--th-g", "x"]),
]

CASES = _generated() + LISTED


def test_table_has_200_cases():
    assert len(CASES) >= 200, len(CASES)


def _fill(args, tmp_path, files, trained_run):
    resume = None
    if any("{resume}" in a for a in args):
        resume = _damaged_checkpoint(trained_run, tmp_path)
    subs = dict(tmp=str(tmp_path), bad=str(files), run=str(trained_run), resume=str(resume))
    out = []
    for a in args:
        for k, v in subs.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    if out and out[0] in OPTIONS and out[0] != "bench" and "--out" not in out:
        out += ["--out", str(tmp_path / "out")]
    return out


@pytest.mark.parametrize("label,args", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(label, args, tmp_path, files, trained_run, capsys, monkeypatch):
    from cimext.cli import main

    monkeypatch.chdir(tmp_path)  # `--out .` must not touch the checkout
    monkeypatch.setenv("CIMEXT_CACHE", str(tmp_path / "cache"))  # never train a default model
    argv = _fill(args, tmp_path, files, trained_run)
    before = (trained_run / "train.json").read_text()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, f"{label}: exit 0"
    assert len(lines) == 1 and "Traceback" not in err, f"{label}: stderr was {err!r}"
    assert lines[0].startswith("cimext: error: "), lines[0]  # a clear error, not an internal one
    assert (trained_run / "train.json").read_text() == before  # a failed run changes no run
    assert not (tmp_path / "out").exists(), f"{label}: left an --out folder"


def test_bench_backend_triton_without_triton(monkeypatch, capsys):
    """`cimext bench --backend triton` where triton is not installed: one line, exit 2."""
    import importlib.util

    from cimext.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a)
    )
    assert main(["bench", "--backend", "triton", "--case", "noise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "triton is not installed" in err[0]


SUBPROCESS_CASES = [
    ["bench", "--device", "tpu"],
    ["train", "--model", "vgg11", "--out", "{tmp}/o"],
    ["montecarlo", "--seed", str(2**64 + 5)],
]


@pytest.mark.parametrize("args", SUBPROCESS_CASES, ids=[" ".join(a) for a in SUBPROCESS_CASES])
def test_bad_command_line_subprocess(args, tmp_path):
    """The console entry as a user runs it: exit 2, one line on stderr, nothing on stdout."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run(
        [sys.executable, "-m", "cimext.cli", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ one-run folders
def test_second_worst_case_run_keeps_nothing_of_the_first(tmp_path, trained_run):
    from cimext.cli import main

    out = tmp_path / "wc"
    base = ["worst-case", "--run", str(trained_run), "--mc-n", "10", "--no-eta-sweep"]
    base += ["--split", "val"]
    assert main([*base, "--method", "flwc", "--quiet", "--out", str(out)]) == 0
    assert (out / "flwc").is_dir()
    assert main([*base, "--method", "pgd", "--quiet", "--out", str(out)]) == 0
    assert not (out / "flwc").exists() and (out / "pgd").is_dir()
    assert list(json.loads((out / "report.json").read_text())["results"]) == ["pgd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wc"]  # no temporary folder left


def test_montecarlo_tail(tmp_path, trained_run, capsys):
    """--tail adds P(accuracy <= a) rows, a "tail" list in the JSON (one entry per accuracy, in
    [0, 1] with an interval around it) and tail.png."""
    from cimext.cli import main

    out = tmp_path / "mc"
    argv = ["montecarlo", "--run", str(trained_run), "--n", "4", "--quiet", "--out", str(out)]
    argv += ["--tail", "0.5,0.99", "--tail-method", "mc", "--tail-n", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "P(acc <= 50.00%)" in printed and "P(acc <= 99.00%)" in printed
    tail = json.loads((out / "montecarlo.json").read_text())["tail"]
    assert [t["threshold"] for t in tail] == [0.5, 0.99]
    for t in tail:
        assert 0 <= t["ci"][0] <= t["p"] <= t["ci"][1] <= 1 and t["method"] == "mc"
    assert (out / "tail.png").stat().st_size > 0


def test_failed_run_leaves_the_previous_folder(tmp_path, trained_run, files, monkeypatch):
    from cimext.cli import main
    from cimext.cli import montecarlo as mc_cli

    out = tmp_path / "mc"
    assert (
        main(["montecarlo", "--run", str(trained_run), "--n", "4", "--quiet", "--out", str(out)])
        == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mc_cli, "histogram", boom)  # Ctrl-C while the figure is drawn
    assert (
        main(["montecarlo", "--run", str(trained_run), "--n", "8", "--quiet", "--out", str(out)])
        == 130
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc"]


def test_ctrl_c_messages(tmp_path, trained_run, monkeypatch, capsys):
    """ "training resumes" only where the command trains; reproduce reports Ctrl-C as 130."""
    from cimext.cli import main
    from cimext.cli import montecarlo as mc_cli
    from cimext.cli import reproduce as rep_cli

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mc_cli, "monte_carlo", boom)
    argv = ["montecarlo", "--run", str(trained_run), "--quiet", "--out", str(tmp_path / "m")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "training resumes" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(rep_cli.R, "reproduce", boom)
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "resumes" in err


def test_train_resume_after_ctrl_c(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 leaves no --out folder but a resumable one beside it; the same command
    then finishes with the weights of an uninterrupted run."""
    import importlib

    from cimext.cli import main

    fit_mod = importlib.import_module("cimext.train.fit")

    argv = ["train", "--epochs", "2", "--batch-size", "256", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    real = fit_mod.ckpt.save_json
    calls = []

    def interrupt_second(path, obj):
        real(path, obj)
        calls.append(path)
        if len(calls) == 2 and Path(path).name == "last.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_mod.ckpt, "save_json", interrupt_second)
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    assert "training resumes" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / ".run.partial" / "checkpoints").is_dir()
    monkeypatch.setattr(fit_mod.ckpt, "save_json", real)
    assert main([*argv, "--out", str(out)]) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".run.partial").exists()


def test_bitflip_ctrl_c_after_training_keeps_the_model_and_its_json(tmp_path, monkeypatch, capsys):
    from cimext.cli import bitflip as bf_cli
    from cimext.cli import main

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bf_cli, "_study", boom)
    out = tmp_path / "bf"
    assert main(["bitflip", "--epochs", "1", "--quiet", "--out", str(out)]) == 130
    assert "--init" in capsys.readouterr().err
    rec = json.loads((out / "model.json").read_text())
    assert rec["model"] == "lenet" and (out / "model.safetensors").is_file()


def test_zoo_build_honours_root(tmp_path):
    """zoo.build reads the data under root: a missing dataset names that folder."""
    from cimext import zoo

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        zoo.build("imagefolder", "resnet18", root=tmp_path)


@pytest.mark.slow
def test_default_lr_trains_digits_at_batch_256():
    """fit()'s default learning rate for digits (chosen on the validation split): LeNet at
    batch 256 for 15 epochs reaches the model's usual accuracy (it reached 74% with 1e-3)."""
    from cimext import data, zoo
    from cimext.train import accuracy, fit

    torch.manual_seed(0)
    train = data.loader("digits", "train", 256)
    val = data.loader("digits", "val", 1024)
    net = zoo.build("digits", "lenet")
    fit(net, train, val, epochs=15, progress=False)
    assert accuracy(net, data.loader("digits", "test", 1024)) > 0.9


def test_analyses_refuse_bad_seeds_and_nan_weights():
    from cimext import DeviceModel, zoo
    from cimext.worstcase import monte_carlo, worst_case

    net = zoo.build("digits", "lenet")
    batch = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    for bad in (2**64 + 5, -1):
        with pytest.raises(ValueError, match="seed"):
            monte_carlo(net, batch, DeviceModel(), 2, seed=bad, progress=False)
    with pytest.raises(TypeError, match="seed"):
        monte_carlo(net, batch, DeviceModel(), 2, seed=True, progress=False)
    with torch.no_grad():
        net.conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="conv1"):
        worst_case(net, batch, budget="fast", progress=False)
    with pytest.raises(ValueError, match="conv1"):
        monte_carlo(net, batch, DeviceModel(), 2, progress=False)


def test_bench_list_and_one_case(tmp_path, capsys):
    """`cimext bench` is a thin entry point to bench/suite.py: --list, one quick case, JSON."""
    from cimext.cli import main

    assert main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert "hessian obd lenet b=256" in names and any(
        n.startswith("sign_step_ lenet") for n in names
    )
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--case", "sign_step_ lenet", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"naive", "cimext"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_demo_parses_its_worst_case_run_with_the_worst_case_parser():
    import argparse

    from cimext.cli import demo, worst_case

    a = argparse.Namespace(th_g="0.01,0.03", mc_n=50, seed=3, out="o", quiet=True)
    wc = demo.worst_case_args(a)
    assert wc.run is worst_case.run and wc.method == "all" and wc.html and wc.mc_n == 50
    assert (wc.th_g, wc.seed, wc.out, wc.quiet, wc.run_dir) == ("0.01,0.03", 3, "o", True, None)


def test_an_internal_error_is_one_line_unless_debugging(monkeypatch, capsys, tmp_path):
    from cimext.cli import main
    from cimext.cli import montecarlo as mc_cli

    def bug(*a, **k):
        raise AttributeError("'Namespace' object has no attribute 'x'")

    monkeypatch.setattr(mc_cli, "check", bug)
    assert main(["montecarlo", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: AttributeError" in err[0]
    monkeypatch.setenv("CIMEXT_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["montecarlo", "--out", str(tmp_path / "m")])
