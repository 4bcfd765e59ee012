"""The README's two set-up commands, run as written from a fresh clone in a fresh virtual
environment (slow: installs torch from the local wheel, builds the extension, runs the demo and
the fast test subset). CI runs it."""

import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Slow; the nested test run inside the clone runs the fast subset (-m "not slow"), so it does not
# recurse into this test.
pytestmark = pytest.mark.slow


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(cmds) >= 2, "the Set up section must hold the two commands"
    return [c.strip() for c in cmds[:2]]


def _run(cmd: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {cmd}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_commands_from_a_fresh_clone(tmp_path):
    main_cmd, test_cmd = _readme_commands()
    assert main_cmd.endswith("cimext demo")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = dict(os.environ)
    env.update(
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}",
        VIRTUAL_ENV=str(env_dir),
        CIMEXT_CACHE=str(tmp_path / "cache"),  # train the demo model from scratch
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    env.pop("PYTHONPATH", None)
    r = _run(main_cmd, clone, env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for label in ("Monte Carlo min of 1000", "weight PGD", "F-LWC", "LWC"):
        assert label in r.stdout
    report = clone / "runs" / "demo" / "report.html"
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    # the test command, restricted to the fast subset (the full suite runs in CI itself)
    r = _run(f'{test_cmd} -q -m "not slow" -x', clone, env, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
