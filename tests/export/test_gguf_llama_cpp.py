"""llama.cpp itself reads the GGUF files: a LoRA-merged SmolLM2-135M (Llama) exported as f32 / f16 / q8_0 gives the
same greedy tokens as transformers on the merged safetensors, logits within the stated tolerances; the adapter GGUF
on the base GGUF gives the merged model's logits; a Qwen2 file runs too. Needs llama-cpp-python, which compiles
llama.cpp (``make llama-cpp``, several minutes): CI leaves it out and skips this file;
tests/export/test_gguf.py checks the writer without it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_adapt.export.gguf import write_gguf, write_gguf_adapter
from lightning_adapt.export.safetensors_io import model_keys, parse_size, read_index
from lightning_adapt.export.stream_merge import Adapters, LayerAdapter, _entries, stream_merge

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama.cpp's own check needs llama-cpp-python: `make llama-cpp` builds it (not in CI)"
)
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 16
#: max |llama.cpp logit - transformers logit| over every position of every prompt and its continuation (SmolLM2's
#: logits have a standard deviation of 5-8; measured: f32 0.025 (0.037 on the unmerged base), f16 0.12); bf16 and
#: q8_0 are measured and printed, their mean |diff| bounded by 0.5
TOLERANCE = {"f32": 0.1, "f16": 0.5}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_adapters(keys: dict[str, Any], r: int = 8) -> Adapters:
    """A random LoRA on every linear layer, large enough to move the logits (B = 0.01·N(0, 1), scale 2)."""
    g = torch.Generator().manual_seed(3)
    layers = {}
    for key, stored in keys.items():
        if key.endswith(tuple(f"{t}.weight" for t in TARGETS)):
            out, inp = stored.shape
            a, b = torch.randn(r, inp, generator=g) / inp**0.5, torch.randn(out, r, generator=g) * 0.01
            layers[key.removesuffix(".weight")] = LayerAdapter(a, b, 2.0)
    return Adapters(layers)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2-135M-Instruct with a random LoRA merged: safetensors (transformers' input) and GGUF files, all
    streamed from the base's files; the unmerged base GGUF and the adapter GGUF."""
    from lightning_adapt.models import resolve_model

    base = resolve_model("smollm2-135m-instruct")
    tmp = tmp_path_factory.mktemp("gguf-llama-cpp")
    keys = model_keys(read_index(base))
    adapters = smollm2_adapters(keys)
    (tmp / "merged").mkdir()
    stream_merge(keys, tmp / "merged", adapters, None, parse_size("5GB"))
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        if (base / name).is_file():
            shutil.copy(base / name, tmp / "merged" / name)
    files = {"merged": tmp / "merged", "base": base}
    for quant in ("f32", "f16", "bf16", "q8_0"):
        files[quant] = write_gguf(tmp / f"{quant}.gguf", base, _entries(keys, adapters, None), quant).path
    files["base_f32"] = write_gguf(tmp / "base.gguf", base, _entries(keys, Adapters({}), None), "f32").path
    files["adapter"] = write_gguf_adapter(tmp / "adapter.gguf", base, adapters, "f32").path
    return files


def hf_greedy(directory: Path, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of ``ids`` and its logits at every position of prompt + continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        logits = model(out).logits[0].numpy()
    return out[0, len(ids) :].tolist(), logits


def cpp_model(path: Path, lora: Path | None = None) -> Any:
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0, **kwargs)


def cpp_greedy(llm: Any, ids: list[int]) -> list[int]:
    """llama.cpp's greedy continuation: the argmax of its own logits, token by token."""
    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    for _ in range(NEW_TOKENS):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new


@pytest.fixture(scope="module")
def reference(exported: dict[str, Path]) -> dict[str, tuple[list[int], list[int], np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    found = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        new, logits = hf_greedy(exported["merged"], ids)
        found[prompt] = (ids, new, logits)
    return found


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_agrees_with_transformers(
    quant: str, exported: dict[str, Path], reference: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Same prompt ids (llama.cpp's own tokenizer gives them too), same greedy tokens (f32, f16), logits within
    TOLERANCE; bf16's and q8_0's differences are measured and printed (greedy tokens may part after a near tie)."""
    llm = cpp_model(exported[quant])
    worst, mean, agree = 0.0, [], 0
    for prompt, (ids, hf_new, hf_logits) in reference.items():
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        cpp_new = cpp_greedy(llm, ids)
        llm.reset()
        llm.eval(ids + hf_new)  # teacher-forced on transformers' tokens: the rows compare one to one
        logits = np.array(llm.scores[: llm.n_tokens])
        assert np.isfinite(logits).all()
        worst = max(worst, float(np.abs(logits - hf_logits).max()))
        mean.append(float(np.abs(logits - hf_logits).mean()))
        agree += sum(a == b for a, b in zip(cpp_new, hf_new, strict=True))
        if quant in TOLERANCE:
            assert cpp_new == hf_new, (prompt, cpp_new, hf_new)
    with capsys.disabled():
        print(
            f"\n{quant}: greedy tokens agree {agree}/{len(PROMPTS) * NEW_TOKENS}, max |logit diff| {worst:.4f}, mean {np.mean(mean):.5f}"
        )
    if quant in TOLERANCE:
        assert worst < TOLERANCE[quant]
    else:  # measured: bf16 56/64 greedy tokens, max 0.62, mean 0.055; q8_0 54/64, max 2.46, mean 0.24
        assert float(np.mean(mean)) < 0.5


def test_the_adapter_gguf_on_the_base_is_the_merged_model(exported: dict[str, Path]) -> None:
    """llama.cpp applies the adapter file to the base file (``--lora``): the logits are the merged file's."""
    ids = cpp_model(exported["f32"]).tokenize(PROMPTS[0].encode(), add_bos=False, special=True)
    merged, with_adapter, base = (
        cpp_model(exported["f32"]),
        cpp_model(exported["base_f32"], exported["adapter"]),
        cpp_model(exported["base_f32"]),
    )
    rows = {}
    for name, llm in (("merged", merged), ("adapter", with_adapter), ("base", base)):
        llm.eval(ids)
        rows[name] = np.array(llm.scores[: llm.n_tokens])
    moved = float(np.abs(rows["merged"] - rows["base"]).max())
    gap = float(np.abs(rows["merged"] - rows["adapter"]).max())
    print(f"adapter vs merged max |logit diff| {gap:.5f}; the LoRA moved the logits by up to {moved:.3f}")
    assert moved > 0.5 and gap < 0.02


def test_a_qwen2_file_runs_in_llama_cpp(tmp_path: Path) -> None:
    """A tiny random Qwen2 (q/k/v biases, no q/k permutation, Qwen2's pre-tokenizer): llama.cpp's logits are
    transformers' within the f32 tolerance, and its tokenizer splits text as the Hugging Face one does."""
    from test_gguf import random_adapters, tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_adapt.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"), local_files_only=True)
    source = tiny_model(tmp_path / "qwen2", tokenizer, "qwen2")
    keys = model_keys(read_index(source))
    adapters = random_adapters()
    (tmp_path / "merged").mkdir()
    stream_merge(keys, tmp_path / "merged", adapters, None, parse_size("5GB"))
    shutil.copy(source / "config.json", tmp_path / "merged" / "config.json")
    write_gguf(tmp_path / "qwen2.gguf", source, _entries(keys, adapters, None), "f32")
    qwen_tokenizer = AutoTokenizer.from_pretrained(source)
    llm = cpp_model(tmp_path / "qwen2.gguf")
    for prompt in PROMPTS:
        ids = qwen_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = qwen_tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    assert float(np.abs(np.array(llm.scores[: llm.n_tokens]) - expected).max()) < TOLERANCE["f32"]
