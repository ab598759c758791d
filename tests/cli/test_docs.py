"""The documentation cannot drift from the product: every command in README.md and docs/ is run as written (the
Lightning subcommands up to their resolved config: the recipes' runs are tests/cli/test_cli.py's), and every
measured figure block is what ``benchmarks/figures.py`` renders from its runs' reports."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from lightning_adapt.entry import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: commands that are not run here, and who runs them
RUN_ELSEWHERE = {
    "make test": "CI (.ci/run)",
    "make demo": "tests/cli/test_cli.py::test_every_recipe_fits (the same fit, shortened)",
    ".venv/bin/python benchmarks/bench_chat_batching.py": "tests/cli/test_bench_driver.py and make bench",
}


def _figures() -> Any:
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_commands() -> list[tuple[str, str]]:
    """``(where, line)`` for every command line in a fenced code block of the README and docs/."""
    found = []
    for doc in DOCS:
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), re.S):
            for line in block.splitlines() if lang in ("bash", "sh", "console", "") else []:
                if re.match(r"(lightning-adapt|make|\.venv/bin/python) ", line.strip()):
                    found.append((doc.name, line.strip()))
    return found


def _argv(line: str) -> list[str]:
    """The command's arguments, with joined compare expansion (``{full,lora,qlora}``) as the shell does it."""
    words = shlex.split(line, comments=True)[1:]
    out: list[str] = []
    for word in words:
        m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", word)
        out += [m.group(1) + c + m.group(3) for c in m.group(2).split(",")] if m else [word]
    return out


def test_every_documented_command_is_covered() -> None:
    commands = documented_commands()
    assert len(commands) >= 15, "the extraction found the docs' commands"
    lightning_adapt = [line for _, line in commands if line.startswith("lightning-adapt ")]
    others = [line for _, line in commands if not line.startswith("lightning-adapt ")]
    for line in others:
        assert any(line.startswith(prefix) for prefix in RUN_ELSEWHERE), f"{line!r}: no test runs it"
    assert {_argv(line)[0] for line in lightning_adapt} >= {"fit", "export", "chat", "predict", "estimate", "compare"}


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path) -> dict[str, str]:
    """What the docs' placeholder paths stand for: a decoder's config, a BERT classifier, a PEFT adapter."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("docs")
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    (tmp / "bert-classifier").mkdir()
    config |= {"architectures": ["BertForSequenceClassification"], "num_labels": 3}
    (tmp / "bert-classifier" / "config.json").write_text(json.dumps(config))
    adapter = tmp / "adapter"
    adapter.mkdir()
    import torch

    torch.manual_seed(0)
    keys = {f"base_model.model.encoder.layer.{i}.attention.self.query": (32, 32) for i in range(2)}
    tensors = {k + ".lora_A.weight": torch.randn(4, 32) for k in keys} | {
        k + ".lora_B.weight": torch.randn(32, 4) for k in keys
    }
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return {
        "path/to/config.json": str(tiny_llama_dir / "config.json"),
        "path/to/bert-classifier": str(tmp / "bert-classifier"),
        "outputs/sentiment-lora/version_0/export/adapter": str(adapter),
        "spectra.png": str(tmp / "spectra.png"),
        "rank.json": str(tmp / "rank.json"),
    }


def _substitute(argv: list[str], placeholders: dict[str, str]) -> list[str]:
    return [placeholders.get(arg, arg) for arg in argv]


@pytest.mark.parametrize(
    "line", sorted({line for _, line in documented_commands() if line.startswith("lightning-adapt ")})
)
def test_each_documented_command_runs(
    line: str,
    placeholders: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``estimate`` and ``inspect`` run whole; ``compare`` parses every recipe with its options (nothing runs: its
    runs are tests/cli/test_compare.py's); the Lightning subcommands resolve their whole config (``--print_config``)
    with the recipe's classes checked, checkpoints being placeholders here."""
    monkeypatch.chdir(ROOT)
    argv = _substitute(_argv(line), placeholders)
    command = argv[0]
    if command in ("estimate", "inspect"):
        if command == "inspect" and "--config" in argv:  # a Lightning checkpoint placeholder: the adapter stands in
            argv[argv.index("--ckpt_path") + 1] = placeholders["outputs/sentiment-lora/version_0/export/adapter"]
        main(argv)
        assert capsys.readouterr().out.strip()
    elif command == "compare":
        from lightning_adapt.compare.command import _prepare, parse_args

        plan, shape = _prepare(parse_args(argv[1:]))
        assert [run.recipe.name for run in plan.runs] and (shape is not None) == ("--project" in argv)
    else:
        argv = [a for a in argv if a != "--print_config"]
        with pytest.raises(SystemExit) as info:
            main([*argv, "--print_config"])
        assert info.value.code in (None, 0)
        assert "class_path" in capsys.readouterr().out


def test_the_figure_blocks_are_what_the_script_renders_from_its_runs() -> None:
    figures = _figures()
    readme = (ROOT / "README.md").read_text()
    names = re.findall(r"<!-- figures:(\w+) -->", readme)
    assert sorted(names) == sorted(figures.COMPARISONS), "every comparison is quoted, each once"
    assert figures.rendered(readme) == readme, "README figures differ from make figures' (run it, never edit them)"
    for name in names:
        data = json.loads((figures.FIGURES / name / "figures.json").read_text())
        assert data["command"] == "lightning-adapt compare " + " ".join(figures.COMPARISONS[name])
        assert all(run["steps"] and run["metrics_after"] for run in data["runs"]), f"{name}: every run trained"
        assert (figures.FIGURES / name / "report.md").is_file()


def test_the_renderer_changes_a_hand_edited_figure() -> None:  # the check above can fail
    figures = _figures()
    readme = (ROOT / "README.md").read_text()
    edited = re.sub(r"(<!-- figures:sentiment -->\n.*?)(\d\.\d{3}) →", r"\g<1>0.999 →", readme, count=1, flags=re.S)
    assert edited != readme and figures.rendered(edited) == readme


def _python_blocks() -> list[tuple[str, str, str]]:
    """``(file, marker comment or "", code)`` of every Python block in the README and docs/."""
    found = []
    for doc in DOCS:
        for marker, code in re.findall(r"(<!-- [^>]*-->\n)?```python\n(.*?)```", doc.read_text(), re.S):
            found.append((doc.name, marker, code))
    return found


def test_every_python_block_is_run() -> None:
    """The README's two examples run in their own tests (named in their markers); the rest run here."""
    blocks = _python_blocks()
    marked = [(name, marker) for name, marker, _ in blocks if marker]
    assert [m.split(":")[0] for _, m in marked] == ["<!-- first-example", "<!-- own-module"], marked
    unmarked = [(name, code) for name, marker, code in blocks if not marker]
    assert [name for name, _ in unmarked] == ["reliability.md"], "a new Python block needs a test that runs it"


def test_the_reliability_loader_block_runs() -> None:
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset, default_collate

    from lightning_adapt.data import ResumableDataLoader

    code = next(code for name, marker, code in _python_blocks() if name == "reliability.md")
    namespace: dict[str, Any] = {"collate": default_collate}
    exec(compile(code, "docs/reliability.md", "exec"), namespace)
    import torch

    module = SimpleNamespace(train_set=TensorDataset(torch.arange(20.0)))
    loader = namespace["train_dataloader"](module)
    assert isinstance(loader, ResumableDataLoader)
    batches = [b[0] for b in loader]
    assert len(batches) == 3 and sorted(torch.cat(batches).tolist()) == list(map(float, range(20)))
