"""bitsandbytes and matplotlib are extras (``lightning-adapt[qlora,plots]``): without them the rest works and what
needs them says how to install them, before anything runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lightning_adapt.entry import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.split(".")[0] == "matplotlib" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "recipes/sentiment/lora.yaml", "recipes/sentiment/qlora.yaml", "--output", "{tmp}/cmp"],
        ["inspect", "--ckpt_path", "{tmp}/missing", "--plot", "{tmp}/spectra.png"],
    ],
    ids=["compare", "inspect"],
)
def test_pictures_without_matplotlib_name_the_extra_before_running(
    argv: list[str], no_matplotlib: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-adapt: error: Pictures need matplotlib.") and "lightning-adapt[plots]" in err
    assert list(tmp_path.iterdir()) == [], "nothing ran, nothing was written"


def test_the_package_declares_the_extras() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith(("bitsandbytes", "matplotlib")) for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["qlora"] == ["bitsandbytes>=0.48"] and extras["plots"] == ["matplotlib>=3.7"]
