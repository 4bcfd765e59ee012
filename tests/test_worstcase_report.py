"""The worst-case report (cimext.worstcase.report), `cimext worst-case` and the model cache
(cimext.zoo): the Table-I rows, the figures and JSON, atomic writing, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cimext
from cimext import zoo
from cimext.worstcase import report

FIGURES = {
    "fig1_mc_histogram.png",
    "fig3_c_search.png",
    "fig4_confidence.png",
    "fig5_delta_histogram.png",
    "fig6_at_bound.png",
    "table3_confusion.png",
    "fig7_eta_tradeoff.png",
}


def _quick_model(epochs: int = 4):
    """A digits LeNet (4-bit), trained for a few epochs (a couple of seconds)."""
    net = zoo.build("digits", "lenet", (4, 4))
    x, y = cimext.data.load("digits", "train").tensors
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def model():
    return _quick_model()


@pytest.fixture(scope="module")
def data():
    return list(cimext.data.loader("digits", "test", 512))


@pytest.fixture(scope="module")
def rep(model, data):
    return report.analyze(
        model,
        data,
        th_g=0.03,
        mc_n=64,
        eta_sweep=(1.0, 0.5),
        lwc_kwargs=dict(steps=4, search_steps=2),
        progress=False,
    )


def test_table_has_every_method_in_order(rep):
    rows = rep.table()
    methods = [r["method"] for r in rows]
    assert methods[:6] == ["clean", "mc", "pgd", "flwc", "lwc", "auto"]
    # the ensemble's stages follow its row
    stages = rep.results["auto"].settings["stages"]
    assert methods[6:] == [f"auto:{s['stage']}" for s in stages]
    assert rows[0]["accuracy"] == rep.clean_accuracy > 0.5
    mc = rep.monte_carlo
    assert mc.n == 64 and rows[1]["accuracy"] == mc.min
    # the worst-case methods find far worse cases than the minimum over the MC population
    for r in rows[2:]:
        assert r["accuracy"] < mc.min
        assert r["seconds"] > 0
    # the ensemble is the lowest of them all
    assert rows[5]["accuracy"] == min(r["accuracy"] for r in rows[2:])
    text = rep.format_table()
    for label in (
        "clean",
        "Monte Carlo min of 64",
        "weight PGD",
        "F-LWC",
        "LWC",
        "auto (ensemble)",
    ):
        assert label in text
    assert "  stage lwc-refine" in text


def test_mc_population_is_write_verified_to_th_g(rep, model):
    dev = rep.monte_carlo.device
    assert dev["verify"] is True
    # the same bound as the worst-case methods: DeviceModel.verified(th_g)
    base = cimext.cim_layers(model)[0][1].device
    assert base.weight_bits == 4  # zoo.build gives a 4-bit model 4-bit devices
    expected = cimext.DeviceModel.verified(
        0.03, weight_bits=4, bits_per_device=base.bits_per_device, sigma=base.sigma
    )
    assert dev["weight_bits"] == 4 and dev["th"] == pytest.approx(expected.th)
    assert expected.th_g() == pytest.approx(0.03)


def test_model_statistics_are_consistent(rep, data):
    worst = rep.results[rep.worst]
    assert worst.accuracy == min(r.accuracy for r in rep.results.values())
    cm = torch.tensor(rep.confusion)
    n = sum(int(y.numel()) for _, y in data)
    assert int(cm.sum()) == n
    assert int(cm.diagonal().sum()) == round(worst.accuracy * n)
    assert len(rep.confidence_correct) + len(rep.confidence_wrong) == n
    assert all(0.0 < c <= 1.0 for c in rep.confidence_correct + rep.confidence_wrong)
    for name, st in rep.layer_stats.items():
        assert sum(st["histogram"]) == st["weights"] == worst.deltas[name].numel()
        assert 0.0 <= st["at_bound"] <= 1.0
    assert len(rep.eta_sweep) == 2
    assert [e["eta"] for e in rep.eta_sweep] == pytest.approx([0.03, 0.015])


def test_write_json_figures_html(rep, tmp_path):
    files = report.write(rep, tmp_path / "out", html=True, extra=dict(note="x"))
    names = {p.name for p in files}
    assert FIGURES <= names
    assert {"report.json", "report.html", "lwc", "flwc", "pgd", "auto"} <= names
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["kind"] == "worst_case_report" and d["note"] == "x"
    assert [r["method"] for r in d["table"]][:6] == ["clean", "mc", "pgd", "flwc", "lwc", "auto"]
    assert len(d["monte_carlo"]["accuracies"]) == 64
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    # every worst-case δ can be loaded back and checked in plain torch
    res = cimext.worstcase.WorstCaseResult.load(tmp_path / "out" / "lwc")
    assert res.accuracy == rep.results["lwc"].accuracy
    # no temporary folder is left behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".report-")]


def test_interrupted_write_leaves_nothing(rep, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "figures", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        report.write(rep, out)
    assert list(out.iterdir()) == []


def test_subset_of_methods(model, data):
    r = report.analyze(model, data, methods="pgd", progress=False)
    assert [row["method"] for row in r.table()] == ["clean", "pgd"]
    assert r.monte_carlo is None and r.eta_sweep == [] and r.worst == "pgd"
    assert r.sweep == {} and r.th_gs == [0.03]
    assert report.check_methods("lwc, pgd,lwc") == ("lwc", "pgd")
    assert report.check_methods("all") == report.METHODS


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(methods="lwcc"), ValueError, "method must be one of"),
        (dict(methods=[]), ValueError, "methods is empty"),
        (dict(th_g=0.0), ValueError, "th_g"),
        (dict(th_g=-1.0), ValueError, "th_g"),
        (dict(th_g=[0.02, 0.01]), ValueError, "increasing"),
        (dict(th_g=[]), ValueError, "empty"),
        (dict(th_g={"conv1": 0.03}), TypeError, "per-layer"),
        (dict(methods="auto", budget="huge"), ValueError, "budget"),
        (dict(th_g=[0.01, 0.03], eta=0.02), ValueError, "eta"),
        (dict(mc_n=0), ValueError, "mc_n"),
        (dict(eta=0.5), ValueError, "eta"),
        (dict(mc_device="x"), TypeError, "mc_device"),
    ],
)
def test_bad_arguments(model, data, kw, exc, match):
    with pytest.raises(exc, match=match):
        report.analyze(model, data, progress=False, **kw)


def test_sweep_report_table_json_and_figure(model, data, tmp_path):
    ths = [0.01, 0.02, 0.04]
    r = report.analyze(
        model, data, th_g=ths, methods="auto,flwc", budget="fast", eta_sweep=None, progress=False
    )
    assert r.th_gs == ths and r.th_g == 0.04 and set(r.sweep) == {"auto", "flwc"}
    for m, rs in r.sweep.items():
        accs = [x.accuracy for x in rs]
        assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), (m, accs)
        assert [x.th_g for x in rs] == ths and r.results[m] is rs[-1]
    rows = r.sweep_table()
    assert [row["th_g"] for row in rows] == ths
    assert rows[-1]["auto"] == r.results["auto"].accuracy
    assert "th_g sweep" in r.format_table()
    files = {p.name for p in report.write(r, tmp_path / "out")}
    assert "fig8_th_g_sweep.png" in files
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["th_gs"] == ths and len(d["sweep"]["auto"]) == 3
    back = cimext.worstcase.WorstCaseResult.load(tmp_path / "out" / "auto" / "th_g-0.02")
    assert back.th_g == 0.02 and back.verify(model, data) == back.accuracy


def test_unconverted_model_and_empty_data(data):
    plain = cimext.models.lenet(input_size=8)
    with pytest.raises((TypeError, ValueError), match="cimext.convert"):
        report.analyze(plain, data, progress=False)
    with pytest.raises(ValueError, match="empty"):
        report.analyze(zoo.build("digits", "lenet", (4, 4)), [], methods="pgd", progress=False)


# ------------------------------------------------------------------------------------- zoo
def _save_run(net, folder: Path, **record):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors")
    )
    rec = dict(dataset="digits", model="lenet", quant=[4, 4], test_accuracy=0.5)
    rec.update(record)
    (folder / "train.json").write_text(json.dumps(rec))
    return folder


def test_load_run_round_trip(model, tmp_path):
    folder = _save_run(model, tmp_path / "run")
    net, rec = zoo.load_run(folder)
    for (n, a), (_, b) in zip(net.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert rec["dataset"] == "digits"
    assert zoo.load_run(folder / "model.safetensors")[1] == rec


def test_load_run_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="cimext train --out"):
        zoo.load_run(tmp_path / "nothing")
    bad = _save_run(model, tmp_path / "bad", model="convnet")
    with pytest.raises(ValueError, match="not weights of a convnet"):
        zoo.load_run(bad)


def test_trained_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.RECIPES, "digits", dict(epochs=1, lr=3e-3, batch_size=256))
    a, rec_a = zoo.trained("digits", cache=tmp_path / "m", progress=False)
    b, rec_b = zoo.trained("digits", cache=tmp_path / "m", progress=False)
    assert rec_a["cached"] is False and rec_b["cached"] is True
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n


# ------------------------------------------------------------------------------------- CLI
def _cli(*args, **kw):
    # One thread: the models are tiny (threads only add overhead), and on a loaded machine
    # OpenMP's spinning workers slow a run down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cimext.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        **kw,
    )


def test_cli_worst_case(model, tmp_path):
    run = _save_run(model, tmp_path / "run")
    out = tmp_path / "wc"
    r = _cli(
        "worst-case",
        "--run",
        str(run),
        "--mc-n",
        "32",
        "--method",
        "mc,auto",
        "--budget",
        "fast",
        "--no-eta-sweep",
        "--out",
        str(out),
        "--quiet",
        "--html",
    )
    assert r.returncode == 0, r.stderr
    for label in ("Monte Carlo min of 32", "auto (ensemble)", "clean"):
        assert label in r.stdout
    d = json.loads((out / "report.json").read_text())
    assert d["model_record"]["dataset"] == "digits"
    assert {"fig1_mc_histogram.png", "fig4_confidence.png"} <= {p.name for p in out.iterdir()}
    assert (out / "report.html").is_file()
    assert d["settings"]["methods"] == ["mc", "auto"]  # --method auto is the default


def test_cli_worst_case_sweep(model, tmp_path):
    run = _save_run(model, tmp_path / "run")
    out = tmp_path / "sweep"
    r = _cli(
        "worst-case",
        "--run",
        str(run),
        "--th-g",
        "0.01,0.02,0.03",
        "--budget",
        "fast",
        "--method",
        "auto,flwc",
        "--no-eta-sweep",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "th_g sweep" in r.stdout
    assert (out / "fig8_th_g_sweep.png").is_file()
    d = json.loads((out / "report.json").read_text())
    assert d["th_gs"] == [0.01, 0.02, 0.03] and len(d["sweep_table"]) == 3


def test_cli_untrained_model_warns_not_crashes(tmp_path):
    run = _save_run(zoo.build("digits", "lenet", (4, 4), seed=3), tmp_path / "run")
    r = _cli(
        "worst-case", "--run", str(run), "--method", "pgd", "--out", str(tmp_path / "o"), "--quiet"
    )
    assert r.returncode == 0, r.stderr
    assert "chance level" in r.stdout


@pytest.mark.parametrize(
    "args, code, match",
    [
        (["--method", "nope"], 2, "--method"),
        (["--th-g", "0"], 2, "--th-g must be > 0"),
        (["--th-g", "nan"], 2, "--th-g must be > 0"),
        (["--th-g", "0.02,0.01"], 2, "--th-g must be strictly increasing"),
        (["--th-g", "0.01,x"], 2, "--th-g must be a number"),
        (["--budget", "huge"], 2, "--budget"),
        (["--eta", "0.5"], 2, "--eta must be in"),
        (["--mc-n", "0"], 2, "--mc-n must be >= 1"),
        (["--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (["--run", "/nonexistent/run"], 1, "no train.json"),
        (["--out", "/proc/forbidden"], 2, "--out /proc/forbidden: not writable"),
        (["--dataset", "cifar10", "--root", "/nonexistent"], 2, "no default training recipe"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, args, code, match):
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "o")]
    r = _cli("worst-case", *args, "--quiet")
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert match in lines[0]
