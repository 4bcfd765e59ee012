"""cimext.train.fit: methods, best-epoch selection, checkpoints and exact resume; CLI train."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import cimext
from cimext.train import METHODS, accuracy, fit


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    x = centers[y] + 0.5 * torch.randn(n, 4, generator=g)
    return TensorDataset(x, y)


def _loaders(seed=0):
    train = DataLoader(
        _blobs(256, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    val = DataLoader(_blobs(128, 1), batch_size=64)
    return train, val


def _mlp(seed=0, convert=True):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return cimext.convert(m, device=cimext.DeviceModel(sigma=0.2)) if convert else m


@pytest.mark.parametrize("method", ["vanilla", "va", "trice"])
def test_methods_learn(method):
    train, val = _loaders()
    model = _mlp()
    res = fit(model, train, val, method, epochs=4, lr=1e-2, progress=False)
    assert res.best_value > 0.9
    assert len(res.history) == 4 and res.method == method
    # The model ends with the best epoch's weights.
    with cimext.clean(model):
        assert accuracy(model, val) == pytest.approx(res.best_value)


def test_vanilla_works_on_plain_model():
    train, val = _loaders()
    res = fit(_mlp(convert=False), train, val, epochs=2, lr=1e-2, progress=False)
    assert res.best_value > 0.8


def test_noise_methods_need_converted_model():
    train, val = _loaders()
    with pytest.raises(TypeError, match="convert"):
        fit(_mlp(convert=False), train, val, "va", epochs=1, progress=False)


def test_resume_after_interrupt_gives_same_weights(tmp_path):
    train, val = _loaders()
    ref_model = _mlp()
    fit(
        ref_model,
        train,
        val,
        "va",
        epochs=4,
        lr=1e-2,
        progress=False,
        checkpoint_dir=tmp_path / "a",
    )

    def stop_after_two(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    train, val = _loaders()
    model = _mlp()
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            train,
            val,
            "va",
            epochs=4,
            lr=1e-2,
            progress=False,
            checkpoint_dir=tmp_path / "b",
            on_epoch_end=stop_after_two,
        )
    meta = json.loads((tmp_path / "b" / "last.json").read_text())
    assert meta["epoch"] == 1
    train, val = _loaders()
    model = _mlp(seed=123)  # a fresh process would start from other weights
    res = fit(
        model, train, val, "va", epochs=4, lr=1e-2, progress=False, checkpoint_dir=tmp_path / "b"
    )
    assert len(res.history) == 4
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert json.loads((tmp_path / "b" / "result.json").read_text())["best_epoch"] == res.best_epoch


def test_resume_with_other_settings_refused(tmp_path):
    train, val = _loaders()
    fit(_mlp(), train, val, epochs=1, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        fit(_mlp(), train, val, epochs=2, lr=0.5, progress=False, checkpoint_dir=tmp_path)


def test_custom_metric_selects_best_epoch():
    train, val = _loaders()
    values = iter([0.1, 0.9, 0.5])
    res = fit(_mlp(), train, val, epochs=3, progress=False, metric=lambda m, d: next(values))
    assert res.best_epoch == 1 and res.best_value == 0.9


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(method="nope"), ValueError, "method"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(metric="worst"), ValueError, "metric"),
        (dict(schedule="step"), ValueError, "schedule"),
    ],
)
def test_bad_input(kw, exc, match):
    train, val = _loaders()
    with pytest.raises(exc, match=match):
        fit(_mlp(), train, val, progress=False, **kw)


def test_empty_training_data():
    empty = DataLoader(TensorDataset(torch.empty(0, 4), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no samples"):
        fit(_mlp(), empty, empty, epochs=1, progress=False)


def test_methods_registry():
    assert {"vanilla", "va", "trice", "adv", "atrice"} <= set(METHODS)


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "cimext.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_cli_train_digits(tmp_path):
    r = _cli(
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--quiet",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "train.json").read_text())
    assert rec["test_accuracy"] > 0.5 and len(rec["history"]) == 3
    assert "test accuracy" in r.stdout
    assert (tmp_path / "model.safetensors").exists()
    # Fine-tuning from those weights with quantization starts where the float run ended.
    r = _cli(
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--quant",
        "4,4",
        "--quiet",
        "--init",
        str(tmp_path / "model.safetensors"),
        "--out",
        str(tmp_path / "q4"),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q4" / "train.json").read_text())["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["train", "--dataset", "nope"], 2, "invalid choice"),
        (["train", "--method", "magic", "--out", "{tmp}/x"], 2, "--method"),
        (["train", "--epochs", "0", "--out", "{tmp}/x"], 2, "--epochs"),
        (["train", "--quant", "four", "--out", "{tmp}/x"], 2, "--quant"),
        (["train", "--out", "{tmp}/file/sub"], 2, "not writable"),
        (["train", "--init", "{tmp}/none.safetensors", "--out", "{tmp}/x"], 2, "--init"),
        (["train", "--init", "{tmp}/file", "--out", "{tmp}/x"], 2, "--init"),
        (["train", "--dataset", "mnist", "--root", "{tmp}/none", "--out", "{tmp}/x"], 1, "MNIST"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, args, code, match):
    (tmp_path / "file").write_text("")
    r = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == code
    assert "Traceback" not in r.stderr
    assert match.lower() in r.stderr.lower()
