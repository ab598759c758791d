"""Table tests for lightning_adapt.adapters.targeting on tiny Hugging Face models built from configs."""

from __future__ import annotations

import pytest
from helpers.toy import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_adapt.adapters.lora import LoRALinear
from lightning_adapt.adapters.targeting import (
    DEFAULT_TARGETS,
    TargetingError,
    find_targets,
    is_linear_like,
    output_head_names,
    replace_module,
)

MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def _model(name: str) -> nn.Module:
    return MODELS[name]()


LA = "model.layers.{}.self_attn.{}"
LM = "model.layers.{}.mlp.{}"
BA = "bert.encoder.layer.{}.attention.self.{}"


def _both(fmt: str, *leaves: str) -> list[str]:
    return [fmt.format(i, leaf) for i in (0, 1) for leaf in leaves]


# (model, target_modules, exclude_modules, expected names in named_modules order)
SELECT_CASES = [
    ("llama", None, (), _both(LA, "q_proj", "v_proj")),
    ("llama", ["q_proj"], (), _both(LA, "q_proj")),  # suffix
    ("llama", "q_proj", (), _both(LA, "q_proj")),  # a single string is one entry
    ("llama", ["model.layers.0.self_attn.q_proj"], (), [LA.format(0, "q_proj")]),  # exact
    ("llama", ["self_attn.o_proj"], (), _both(LA, "o_proj")),  # multi-component suffix
    ("llama", [r".*\.(q|k)_proj"], (), _both(LA, "q_proj", "k_proj")),  # regex full-match
    (
        "llama",
        [r"model\.layers\.1\..*_proj"],
        (),
        [LA.format(1, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [LM.format(1, x) for x in ("gate_proj", "up_proj", "down_proj")],
    ),
    (
        "llama",
        "all-linear",
        (),
        [
            n
            for i in (0, 1)
            for n in (
                *(LA.format(i, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj")),
                *(LM.format(i, x) for x in ("gate_proj", "up_proj", "down_proj")),
            )
        ],
    ),
    (
        "llama",
        "all-linear",
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "o_proj", "k_proj"],
        _both(LA, "q_proj", "v_proj"),
    ),
    (
        "llama",
        ["q_proj", "v_proj"],
        [r"model\.layers\.0\..*"],
        [LA.format(1, "q_proj"), LA.format(1, "v_proj")],
    ),
    ("llama", ["lm_head"], (), ["lm_head"]),  # explicit targeting of a head is allowed
    ("bert", None, (), _both(BA, "query", "value")),
    (
        "bert",
        "all-linear",
        (),
        [
            n
            for i in (0, 1)
            for n in (
                *(BA.format(i, x) for x in ("query", "key", "value")),
                f"bert.encoder.layer.{i}.attention.output.dense",
                f"bert.encoder.layer.{i}.intermediate.dense",
                f"bert.encoder.layer.{i}.output.dense",
            )
        ]
        + ["bert.pooler.dense"],
    ),
    (
        "bert",
        ["dense"],
        ["pooler.dense"],
        [
            n
            for i in (0, 1)
            for n in (
                f"bert.encoder.layer.{i}.attention.output.dense",
                f"bert.encoder.layer.{i}.intermediate.dense",
                f"bert.encoder.layer.{i}.output.dense",
            )
        ],
    ),
    ("gpt2", None, (), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    ("gpt2", ["attn.c_proj"], (), ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    (
        "gpt2",
        "all-linear",
        (),
        [f"transformer.h.{i}.{x}" for i in (0, 1) for x in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
    ),
]


@pytest.mark.parametrize(("model", "targets", "exclude", "expected"), SELECT_CASES)
def test_find_targets_selects(model: str, targets: object, exclude: list[str], expected: list[str]) -> None:
    assert find_targets(_model(model), targets, exclude) == expected  # type: ignore[arg-type]


# (model, target_modules, exclude_modules, substrings the error message must contain)
ERROR_CASES = [
    ("llama", ["proj"], (), ["['proj']", "match no module", "q_proj", "gate_proj"]),  # whole components only
    ("llama", ["q_pro"], (), ["['q_pro']", "match no module"]),
    ("llama", [r".*\.q_pro"], (), ["match no module"]),  # regex must full-match
    ("llama", ["q_proj", "nope"], (), ["['nope']"]),  # one bad entry among good ones
    ("llama", ["self_attn"], (), ["LlamaAttention", "cannot wrap", "model.layers.0.self_attn"]),
    ("llama", ["input_layernorm"], (), ["LlamaRMSNorm", "cannot wrap"]),  # embeddings can be adapted (test_layer_kinds)
    ("llama", ["q_proj"], ["nope"], ["['nope']", "match no module"]),  # excludes are checked too
    ("llama", ["q_proj"], ["q_proj"], ["selects no linear-like module"]),
    ("llama", ["(unclosed"], (), ["not a valid regular expression"]),
    ("bert", ["q_proj"], (), ["query", "bert.encoder.layer.0.attention.self.query"]),  # candidates listed
]


@pytest.mark.parametrize(("model", "targets", "exclude", "needles"), ERROR_CASES)
def test_find_targets_errors(model: str, targets: list[str], exclude: list[str], needles: list[str]) -> None:
    with pytest.raises(TargetingError) as info:
        find_targets(_model(model), targets, exclude)
    for needle in needles:
        assert needle in str(info.value)


def test_default_targets_error_when_none_matches() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetingError, match="selects no linear-like module"):
        find_targets(model)
    assert find_targets(model, ["0", "2"]) == ["0", "2"]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(2, 3), True),
        (Conv1D(3, 2), True),
        (nn.Embedding(3, 2), False),
        (nn.Conv2d(1, 1, 1), False),
        (nn.LayerNorm(2), False),
        (nn.Sequential(nn.Linear(2, 2)), False),
    ],
)
def test_is_linear_like(module: nn.Module, expected: bool) -> None:
    assert is_linear_like(module) is expected


def test_is_linear_like_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    assert is_linear_like(bnb.nn.Linear4bit(8, 4))
    assert is_linear_like(bnb.nn.Linear8bitLt(8, 4))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama", {"lm_head"}),  # get_output_embeddings()
        ("bert", {"classifier"}),  # leaf name
        ("gpt2", {"lm_head"}),  # tied to transformer.wte
    ],
)
def test_output_head_names(model: str, expected: set[str]) -> None:
    assert output_head_names(_model(model)) == expected


def test_output_head_names_tied_without_hf_api() -> None:
    emb = nn.Embedding(10, 4)
    proj = nn.Linear(4, 10, bias=False)
    proj.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "body": nn.Linear(4, 4), "proj": proj})
    assert output_head_names(model) == {"proj"}
    assert find_targets(model, "all-linear") == ["body"]


def test_output_head_subtree_excluded() -> None:
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))})
    assert output_head_names(model) == {"head", "head.0", "head.1"}
    assert find_targets(model, "all-linear") == ["body"]


def test_targets_never_inside_existing_adapter() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    replace_module(model, "0", LoRALinear(model[0], r=2, alpha=4.0))
    assert find_targets(model, "all-linear") == ["1"]
    with pytest.raises(TargetingError, match="cannot wrap"):
        find_targets(model, ["0"])  # the wrapper itself is not linear-like: the caller must check
    with pytest.raises(TargetingError, match="match no module"):
        find_targets(model, ["base_layer"])


def test_replace_module() -> None:
    model = tiny_llama()
    new = nn.Linear(32, 32, bias=False)
    replace_module(model, "model.layers.1.self_attn.q_proj", new)
    assert model.get_submodule("model.layers.1.self_attn.q_proj") is new
    with pytest.raises(TargetingError, match=r"no submodule 'model\.nope'"):
        replace_module(model, "model.nope", new)
    with pytest.raises(TargetingError, match="non-empty"):
        replace_module(model, "", new)


def test_default_targets_cover_common_names() -> None:
    assert {"q_proj", "v_proj", "query", "value", "q", "v", "c_attn", "query_key_value"} <= set(DEFAULT_TARGETS)
    assert not {"k_proj", "o_proj", "lm_head"} & set(DEFAULT_TARGETS)
