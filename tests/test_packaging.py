"""The package list of pyproject.toml names every package of the source tree, so a
non-editable install (a wheel) holds the same modules as the checkout."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "cimext").rglob("__init__.py")
        if "__pycache__" not in p.parts and "triton_kernels" not in p.parts
    }
    # packages kept outside cimext/ and mapped in by package-dir (triton_kernels)
    for name, folder in setuptools.get("package-dir", {}).items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{name} -> {folder}"
        found.add(name)
    assert found == listed, f"missing: {sorted(found - listed)}, extra: {sorted(listed - found)}"


def test_test_extras_hold_what_the_tests_import():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    for name in ("pytest", "hypothesis", "scipy"):
        assert name in extras
