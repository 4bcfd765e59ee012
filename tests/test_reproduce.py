"""cimext.reproduce: the schema of results.json, resuming from units, failures kept local."""

from __future__ import annotations

import json

import pytest
import torch

from cimext import reproduce as R

PLAN = R.plan  # the real one (a test below replaces R.plan)


def tiny(**kw):
    """A plan that runs every study on digits in seconds."""
    p = PLAN("digits", quick=True, eval_images=120, mc_n=20, mc_block=10)
    p["write_verify"].update(sigmas=[0.3], instances=2, calib=64)
    p["bitflip"].update(cases=["float32", "mantissa_only", "int8"], noise_seeds=1, tol=0.5)
    p["th_gs"] = [0.02, 0.03]
    p["methods"]["atrice"] = dict(p["methods"]["atrice"], init="vanilla", epochs=1, lr=1e-3)
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    logs = []
    res = R.reproduce(root, tiny(), progress=False, log=logs.append)
    return root, res, logs


def test_schema(finished):
    root, r, _ = finished
    assert r["failed"] == {}
    seeds = r["seeds"]
    assert seeds == [0]
    w = r["worst_case"]
    for k in ("clean", "mc_min", "mc_n", "pgd", "flwc", "lwc", "auto"):
        assert len(w[k]) == len(seeds), k
    assert w["mc_n"] == [20] and w["th_g"] == 0.03
    for k in ("mc", "pgd", "flwc", "lwc", "auto"):
        assert all(s is not None and s >= 0 for s in w["seconds"][k])
    # the ensemble is the lowest of the worst-case searches (it runs them all and keeps the min)
    assert w["auto"][0] <= min(w["pgd"][0], w["flwc"][0]) + 1e-12
    assert w["mc_min"][0] >= w["auto"][0]  # a random instance is never worse than the worst case
    t = r["training"]
    assert t["th_g"] == [0.02, 0.03]
    for m in R.METHODS:
        assert len(t[m]["clean"]) == 1 and 0 < t[m]["clean"][0] <= 1
        worst = t[m]["worst"][0]
        assert len(worst) == 2 and worst[1] <= worst[0]  # a warm-started sweep never rises
    assert t["hyper_parameters"]["atrice"]["alpha"] == R.ATRICE_SETTINGS["alpha"]
    # A-TRICE fine-tunes the vanilla model of its seed (init), with its own lr
    rec = json.loads((root / "cache" / "units" / "train-atrice-seed0.json").read_text())
    assert rec["settings"]["init"]["method"] == "vanilla" and rec["settings"]["lr"] == 1e-3
    assert "init" not in rec["settings"]["method_settings"]
    wv = r["write_verify"]
    assert wv["sigma"] == [0.3]
    for m in R.WV_METHODS:
        assert len(wv[f"{m}_speedup"]) == 1 and len(wv["uniform"][f"{m}_speedup"][0]) == 1
    bf = r["bitflip"]
    assert set(bf["midpoint"]) == {"float32", "mantissa_only", "int8"}
    assert 0 < bf["midpoint"]["float32"][0] < 0.5
    assert r["eval_subset"]["n"] == 120
    on_disk = json.loads((root / "results.json").read_text())
    assert on_disk["worst_case"]["mc_min"] == w["mc_min"]
    md = (root / "results.md").read_text()
    for title in ("Table I", "Table IV", "Tables V/VI", "write-verify", "Bit-flip"):
        assert title in md
    assert (root / "fig8.png").is_file() and (root / "write_verify.png").is_file()


def test_mc_blocks_equal_one_run(finished):
    """The Monte Carlo minimum gathered from blocks is that of one run over all instances."""
    from cimext import zoo
    from cimext.device import DeviceModel
    from cimext.worstcase import monte_carlo

    root, r, _ = finished
    p = tiny()
    net, _ = zoo.load_run(root / "cache" / "models" / "vanilla-seed0")
    base = zoo.cim_device(net)
    dev = DeviceModel.verified(
        0.03, weight_bits=base.weight_bits, bits_per_device=base.bits_per_device, sigma=base.sigma
    )
    one = monte_carlo(net, R._eval_batches(p), dev, 20, seed=0, progress=False)
    assert one.min == pytest.approx(r["worst_case"]["mc_min"][0], abs=1e-12)


def test_resume_reuses_finished_units(finished, tmp_path):
    import shutil

    root, r, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    logs = []
    again = R.reproduce(copy, tiny(), progress=False, log=logs.append)
    assert logs == []  # every unit came from the cache
    assert again["worst_case"] == r["worst_case"]
    assert again["training"] == r["training"]
    # a lost unit (a run killed in it) is the only one computed again
    (copy / "cache" / "units" / "sweep-va-seed0.json").unlink()
    logs = []
    R.reproduce(copy, tiny(), progress=False, log=logs.append)
    assert [x for x in logs if x.startswith("-- ")] == ["-- sweep-va-seed0"]
    # changed settings recompute what they touch, and only that
    logs = []
    R.reproduce(copy, tiny(mc_n=30), progress=False, log=logs.append)
    assert [x for x in logs if x.startswith("-- ")] == ["-- mc-seed0-20"]


def test_a_failed_study_keeps_the_others(finished, tmp_path, monkeypatch):
    import shutil

    root, r, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "cache" / "units" / "bitflip-seed0.json").unlink()
    (copy / "cache" / "units" / "sweep-trice-seed0.json").unlink()

    def boom(*a, **k):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(R, "_bitflip", boom)
    monkeypatch.setattr(R, "_sweep", boom)
    res = R.reproduce(copy, tiny(), progress=False, log=lambda s: None)
    assert set(res["failed"]) == {"bitflip-seed0", "sweep-trice-seed0"}
    assert res["failed"]["bitflip-seed0"] == "RuntimeError: simulated failure"
    assert res["bitflip"]["midpoint"]["float32"] == [None]
    assert res["training"]["trice"]["worst"] == [None]
    assert res["training"]["vanilla"] == r["training"]["vanilla"]  # the others are intact
    assert res["worst_case"] == r["worst_case"]
    md = (copy / "results.md").read_text()
    assert "Failed units" in md and "bitflip-seed0" in md and "failed" in md
    assert (copy / "cache" / "units" / "bitflip-seed0.failed.json").is_file()
    monkeypatch.undo()
    res = R.reproduce(copy, tiny(), progress=False, log=lambda s: None)
    assert res["failed"] == {}
    assert not (copy / "cache" / "units" / "bitflip-seed0.failed.json").exists()
    assert res["bitflip"]["midpoint"]["float32"] == r["bitflip"]["midpoint"]["float32"]


def test_failed_training_skips_what_needs_it(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ValueError("no data")

    monkeypatch.setattr(R, "_train", boom)
    p = tiny(parts=["worst-case", "bitflip"])
    res = R.reproduce(tmp_path, p, progress=False, log=lambda s: None)
    assert res["worst_case"]["mc_min"] == [None] and res["bitflip"]["clean"] == [None]
    assert "train-vanilla-seed0" in res["failed"]
    assert "training" not in res  # only the parts asked for


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dataset="imagenet"), "unknown dataset"),
        (dict(parts=["everything"]), "parts"),
        (dict(parts=[]), "parts"),
        (dict(seeds=[]), "seeds"),
        (dict(seeds=[1, 1]), "seeds"),
        (dict(seeds=[-1]), "seeds"),
        (dict(eval_images=0), "eval_images"),
        (dict(mc_n=0), "mc_n"),
        (dict(epochs=1.5), "epochs"),
        (dict(mc_block=True), "mc_block"),
        (dict(colour="red"), "unknown plan entry"),
    ],
)
def test_plan_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        PLAN(**kw)


def test_cli_reproduce_runs_and_resumes(tmp_path, monkeypatch, capsys):
    from cimext.cli import main
    from cimext.cli import reproduce as rep_cli

    def small(dataset, **kw):
        p = PLAN(dataset, **kw)
        return tiny(parts=p["parts"], seeds=p["seeds"])

    monkeypatch.setattr(rep_cli.R, "plan", small)
    out = tmp_path / "r"
    argv = ["reproduce", "--dataset", "digits", "--quick", "--parts", "worst-case", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Table I" in text and (out / "results.json").is_file()
    first = json.loads((out / "results.json").read_text())
    # the same command again reuses the finished units (kept under cache/)
    assert main([*argv, "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["worst_case"] == first["worst_case"]
    assert torch.isfinite(torch.tensor(again["worst_case"]["mc_min"])).all()


def test_cli_ctrl_c_then_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle: exit 130, one line; the same command finishes the rest only."""
    from cimext.cli import main
    from cimext.cli import reproduce as rep_cli

    monkeypatch.setattr(rep_cli.R, "plan", lambda dataset, **kw: tiny(parts=["worst-case"]))
    real = R._mc_block
    calls = []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(R, "_mc_block", killed)
    out = tmp_path / "r"
    argv = ["reproduce", "--dataset", "digits", "--quiet", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resumes" in err[0]
    monkeypatch.setattr(R, "_mc_block", real)
    logs = []
    monkeypatch.setattr(R.Units, "__init__", _logging_init(R.Units.__init__, logs))
    assert main(argv) == 0
    assert logs == ["-- mc-seed0-10"]  # training, Table I and the first block were kept
    r = json.loads((out / "results.json").read_text())
    assert r["worst_case"]["mc_n"] == [20] and r["failed"] == {}


def _logging_init(init, logs):
    def wrapped(self, root, log=print):
        init(self, root, lambda s: logs.append(s) if s.startswith("-- ") else None)

    return wrapped
