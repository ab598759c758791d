"""FSDP2 through ``ModelParallelStrategy`` + ``FullyShardCallback`` on CPU (2 processes, gloo): LoRA trains as one
process with twice the batch, each rank holds half of the frozen base, adapter-only checkpoints hold the full
adapters and resume across world sizes.

Each run launches ``tests/helpers/fsdp_run.py`` as a user would (Lightning's launcher starts the other rank), fp32,
dropout 0, every rank its own slice of each global batch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.multiprocess import assert_same_weights, global_losses, launch, ranks
from helpers.toy import Net, ToyModule, loader, trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.callbacks.shard import FullyShardCallback, _blocks, _setup_problems
from lightning_adapt.errors import ConfigError

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "fsdp_run.py"
STEPS_PER_EPOCH = 4  # 64 rows / global batch 16
LAST = "epoch=1-step=8.ckpt"
FIRST = "epoch=0-step=4.ckpt"


def _run(out: Path, devices: int, *extra: str, check: bool = True) -> Any:
    return launch(SCRIPT, out, devices, *extra, check=check)


_ranks, _global_losses, _assert_same_weights = ranks, global_losses, assert_same_weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    paths = {name: root / name for name in ("one", "file", "dcp")}
    _run(paths["one"], 1)  # no FSDP: the reference
    _run(paths["file"], 2, "--shard")  # save_distributed_checkpoint=False: one file
    _run(paths["dcp"], 2, "--shard", "--dcp", "--validate")  # a directory of shards
    return paths


@pytest.mark.parametrize("kind", ["file", "dcp"])
def test_two_sharded_processes_train_as_one_with_twice_the_batch(runs: dict[str, Path], kind: str) -> None:
    one, two = _ranks(runs["one"], 1), _ranks(runs[kind], 2)
    assert len(one[0]["losses"]) == 2 * STEPS_PER_EPOCH
    torch.testing.assert_close(_global_losses(two), _global_losses(one), atol=1e-5, rtol=0)
    for name, value in two[0]["trainable"].items():  # gathered from the shards: the same on every rank
        assert torch.equal(value, two[1]["trainable"][name]), name
    _assert_same_weights(two[0]["trainable"], one[0]["trainable"])
    assert one[0]["trainable"] and all("lora_" in n for n in one[0]["trainable"])
    n_params = 2 * (4 * 2 + 2) + 2 + 8  # 2 blocks (4 Linear + LayerNorm), classifier, 8 adapter matrices
    assert one[0]["sharded"] == 0 and two[0]["sharded"] == two[1]["sharded"] == n_params, "every parameter sharded"


def test_each_rank_holds_half_of_the_frozen_base(runs: dict[str, Path]) -> None:
    whole = _ranks(runs["one"], 1)[0]["frozen_bytes"]
    assert whole == 4 * (2 * (4 * (64 * 64 + 64) + 2 * 64) + 64 * 4 + 4)  # fp32 blocks + classifier
    for record in _ranks(runs["file"], 2):
        assert abs(record["frozen_bytes"] - whole / 2) <= 0.1 * whole / 2, (record["frozen_bytes"], whole)


def test_base_fingerprint_is_the_same_on_every_rank_and_world_size(runs: dict[str, Path]) -> None:
    one, two = _ranks(runs["one"], 1)[0]["fingerprint"], _ranks(runs["file"], 2)
    assert torch.equal(two[0]["fingerprint"], two[1]["fingerprint"])
    assert two[0]["fingerprint"][0] == one[0], "names, shapes (global, not the shard's) and dtypes"
    torch.testing.assert_close(two[0]["fingerprint"][1], one[1], rtol=1e-12, atol=0)


def test_single_file_holds_the_full_adapters_only(runs: dict[str, Path]) -> None:
    trained = _ranks(runs["file"], 2)[0]["trainable"]
    checkpoints = sorted(p.name for p in (runs["file"] / "ckpt").iterdir())
    assert checkpoints == [FIRST, LAST]
    state = torch.load(runs["file"] / "ckpt" / LAST, weights_only=True)["state_dict"]
    assert state.keys() == trained.keys() | {FINGERPRINT_KEY}
    for name, value in trained.items():  # all of each adapter, not rank 0's shard (accelerate #4206)
        assert torch.equal(state[name], value), name


def test_distributed_checkpoint_holds_the_full_adapters_only(runs: dict[str, Path], tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    trained = _ranks(runs["dcp"], 2)[0]["trainable"]
    directory = runs["dcp"] / "ckpt" / LAST
    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("state_dict."): v for k, v in metadata.items() if k.startswith("state_dict.")}
    assert saved.keys() == trained.keys() | {FINGERPRINT_KEY}
    assert all(tuple(getattr(saved[name], "size", ())) == tuple(value.shape) for name, value in trained.items())
    dcp_to_torch_save(directory, tmp_path / "whole.pt")
    state = torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    for name, value in trained.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize(
    ("source", "devices", "flags"),
    [
        ("file", 1, ()),  # 2 sharded processes -> 1 process without FSDP
        ("one", 2, ("--shard",)),  # 1 process without FSDP -> 2 sharded processes
        ("dcp", 1, ("--shard", "--dcp")),  # distributed checkpoint, 2 -> 1 (DCP reshards)
    ],
)
def test_resume_across_world_sizes_reproduces_the_uninterrupted_run(
    runs: dict[str, Path], tmp_path: Path, source: str, devices: int, flags: tuple[str, ...]
) -> None:
    _run(tmp_path, devices, *flags, "--resume", str(runs[source] / "ckpt" / FIRST))
    after, uninterrupted = _ranks(tmp_path, devices), _ranks(runs["one"], 1)
    assert len(after[0]["losses"]) == STEPS_PER_EPOCH, "only the second epoch ran"
    torch.testing.assert_close(
        _global_losses(after), _global_losses(uninterrupted)[STEPS_PER_EPOCH:], atol=1e-5, rtol=0
    )
    _assert_same_weights(after[0]["trainable"], uninterrupted[0]["trainable"])


def test_resuming_on_another_base_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    done = _run(tmp_path, 1, "--shard", "--seed", "1", "--resume", str(runs["file"] / "ckpt" / FIRST), check=False)
    assert done.returncode != 0
    assert "BaseMismatchError: this adapter-only checkpoint was trained on a different base model (frozen values" in (
        done.stdout + done.stderr
    )


def test_validate_after_fit_keeps_the_sharded_model(runs: dict[str, Path]) -> None:
    metrics = [torch.load(runs["dcp"] / f"validate{r}.pt", weights_only=True) for r in range(2)]
    assert all("val_loss" in m[0] for m in metrics)


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("fsdp-qlora")
    paths = {name: root / name for name in ("one", "shard", "replicate")}
    _run(paths["one"], 1, "--method", "qlora")
    _run(paths["shard"], 2, "--shard", "--method", "qlora")
    _run(paths["replicate"], 2, "--shard", "--method", "qlora", "--quantized", "replicate")
    return paths


@pytest.mark.parametrize("kind", ["shard", "replicate"])
def test_qlora_two_sharded_processes_train_as_one_with_twice_the_batch(qlora_runs: dict[str, Path], kind: str) -> None:
    one, two = _ranks(qlora_runs["one"], 1), _ranks(qlora_runs[kind], 2)
    torch.testing.assert_close(_global_losses(two), _global_losses(one), atol=1e-5, rtol=0)
    for name, value in two[0]["trainable"].items():
        assert torch.equal(value, two[1]["trainable"][name]), name
    _assert_same_weights(two[0]["trainable"], one[0]["trainable"])
    assert torch.equal(two[0]["fingerprint"], one[0]["fingerprint"]), "same base check on any world size"


def test_a_changed_base_trains_sharded_as_in_one_process(tmp_path: Path) -> None:
    """PiSSA on a QLoRA base under FSDP2: every rank computes the same residual base before quantizing it (the same
    fingerprint as one process), the A0 / B0 buffers stay whole beside the sharded adapters, and two sharded
    processes train as one with the whole batch."""
    pissa = ("--method", "qlora", "--init", "pissa", "--threads", "1")  # one LAPACK path (test_distributed's reason)
    _run(tmp_path / "one", 1, *pissa)
    _run(tmp_path / "shard", 2, "--shard", *pissa)
    one, two = _ranks(tmp_path / "one", 1), _ranks(tmp_path / "shard", 2)
    torch.testing.assert_close(_global_losses(two), _global_losses(one), atol=1e-5, rtol=0)
    for name, value in two[0]["trainable"].items():
        assert torch.equal(value, two[1]["trainable"][name]), name
    _assert_same_weights(two[0]["trainable"], one[0]["trainable"])
    assert torch.equal(two[0]["fingerprint"], one[0]["fingerprint"]), "the same changed base on every rank"


def test_qlora_each_rank_holds_half_of_the_4bit_codes_or_all_of_them(qlora_runs: dict[str, Path]) -> None:
    # 8 quantized 64x64 layers: 2,048 packed bytes each (the quant state is not a parameter: not counted here)
    codes, whole = 8 * 64 * 64 // 2, _ranks(qlora_runs["one"], 1)[0]["frozen_bytes"]
    floats = whole - codes  # biases, norms and the (unquantized) classifier
    assert floats == 4 * (8 * 64 + 2 * 2 * 64 + 64 * 4 + 4)
    for record in _ranks(qlora_runs["shard"], 2):
        assert record["frozen_bytes"] == whole // 2
    for record in _ranks(qlora_runs["replicate"], 2):
        assert record["frozen_bytes"] == codes + floats // 2


def test_qlora_resume_across_world_sizes_reproduces_the_uninterrupted_run(
    qlora_runs: dict[str, Path], tmp_path: Path
) -> None:
    _run(tmp_path, 1, "--method", "qlora", "--resume", str(qlora_runs["shard"] / "ckpt" / FIRST))
    after, uninterrupted = _ranks(tmp_path, 1), _ranks(qlora_runs["one"], 1)
    torch.testing.assert_close(
        _global_losses(after), _global_losses(uninterrupted)[STEPS_PER_EPOCH:], atol=1e-5, rtol=0
    )
    _assert_same_weights(after[0]["trainable"], uninterrupted[0]["trainable"])


def test_shardable_4bit_layer_is_bit_identical_and_keeps_its_state_dict() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_adapt.layers import dequantize_weight, is_quantized, quant_storage_bytes
    from lightning_adapt.quantize import QuantConfig, quantize_linear
    from lightning_adapt.shard4bit import make_shardable

    torch.manual_seed(0)
    layer = quantize_linear(torch.nn.Linear(64, 32), QuantConfig(mode="nf4", compute_dtype=torch.float32))
    x = torch.randn(3, 64, requires_grad=True)
    expected, state, weight, size = layer(x), layer.state_dict(), dequantize_weight(layer), quant_storage_bytes(layer)
    make_shardable(layer, torch.device("cpu"))
    make_shardable(layer, torch.device("cpu"))  # idempotent
    assert isinstance(layer, bnb.nn.Linear4bit) and type(layer).__name__ == "ShardableLinear4bit"
    layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # as FSDP2 does: a plain one
    assert torch.equal(layer(x), expected)
    assert is_quantized(layer) and torch.equal(dequantize_weight(layer), weight) and quant_storage_bytes(layer) == size
    after = layer.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))


def test_a_base_that_differs_between_ranks_is_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, 2, "--shard", "--per-rank-seed", check=False)
    assert done.returncode != 0
    assert "the frozen base differs between rank 0 and rank(s) [1]: FSDP2 shards" in done.stdout + done.stderr


def test_another_strategy_is_refused_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs ModelParallelStrategy, got SingleDeviceStrategy\. Fix"):
        trainer(tmp_path, callbacks=[FullyShardCallback()]).fit(ToyModule(), loader())


def test_tensor_parallel_mesh_is_refused() -> None:
    strategy = ModelParallelStrategy()
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}  # type: ignore[assignment]
    (problem,) = _setup_problems(SimpleNamespace(callbacks=[]), strategy)  # type: ignore[arg-type]
    assert "tensor_parallel_size=2" in problem and "tensor_parallel_size=1)" in problem


def test_blocks_are_detected_or_named() -> None:
    net = Net(width=8, depth=3)
    assert [name for name, _ in _blocks(net, None)] == ["layers.0", "layers.1", "layers.2"]
    assert [name for name, _ in _blocks(net, ("Block", "LayerNorm"))][:2] == ["layers.2.norm", "layers.2"]
    with pytest.raises(ConfigError, match=r"\['Blok'\] match no module of Net.*repeated ones: \['Linear', "):
        _blocks(net, ("Blok",))
    with pytest.raises(ConfigError, match="layer_classes=\\[\\]"):
        FullyShardCallback(layer_classes=[])


LLM_SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "fsdp_llm_run.py"


@pytest.fixture(scope="module")
def llm_runs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("fsdp-export")
    runs = {"one": (1,), "two": (2, "--shard"), "qlora": (2, "--shard", "--method", "qlora")}
    for name, (devices, *flags) in runs.items():
        launch(LLM_SCRIPT, root / name, devices, "--model", str(tiny_llama_dir), *flags)  # type: ignore[arg-type]
    return {name: root / name for name in runs}


def _merged(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "export" / "merged" / "model.safetensors")


def test_fsdp2_export_equals_the_one_process_export_and_loads(llm_runs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    one, two = _merged(llm_runs["one"]), _merged(llm_runs["two"])
    assert one.keys() == two.keys() and not any("lora" in k for k in two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    trained = [torch.load(llm_runs["two"] / f"rank{r}.pt", weights_only=False)["trainable"] for r in (0, 1)]
    assert trained[0] and all(torch.equal(v, trained[1][k]) for k, v in trained[0].items())
    model = AutoModelForCausalLM.from_pretrained(llm_runs["two"] / "export" / "merged", local_files_only=True)
    assert torch.equal(
        model.state_dict()["model.layers.0.self_attn.q_proj.weight"], two["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("run", ["two", "qlora"])
def test_fsdp2_export_is_byte_identical_to_exporting_its_checkpoint_in_one_process(
    llm_runs: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path, run: str
) -> None:
    from lightning_adapt import LoRAInjectionCallback, MergeOnSaveCallback, QuantizeBaseCallback
    from lightning_adapt.tasks.causal_lm import CausalLMTask

    (ckpt,) = (llm_runs[run] / "ckpt").iterdir()
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    callbacks: list[Any] = [LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])]
    if run == "qlora":
        callbacks.insert(0, QuantizeBaseCallback(mode="nf4", compute_dtype="fp32"))
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir))
    MergeOnSaveCallback(str(tmp_path / "out")).export_checkpoint(module, state, [c.spec for c in callbacks])
    for part in ("merged/model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "out" / part).read_bytes() == (llm_runs[run] / "export" / part).read_bytes(), part


@pytest.mark.parametrize("run", ["two", "qlora"])
def test_memory_report_measures_per_rank_bytes_and_the_estimator_predicts_them(
    llm_runs: dict[str, Path], run: str
) -> None:
    one = torch.load(llm_runs["one"] / "rank0.pt", weights_only=False)["memory"]["fit_end"]
    for rank in (0, 1):
        record = torch.load(llm_runs[run] / f"rank{rank}.pt", weights_only=False)
        assert record["no_estimate"] is None
        report = record["memory"]["fit_end"]
        for component in ("weights", "weights: fp32", "adapter weights", "gradients", "optimizer state"):
            measured, estimated = report[component]
            assert measured == estimated, (component, measured, estimated)
        assert report["trainable params"] == one["trainable params"], "a count, not bytes: the same on every rank"
        if run == "two":  # the same LoRA run in one process: each rank holds half of every weight
            assert abs(report["weights"][0] - one["weights"][0] / 2) <= 0.02 * one["weights"][0]
        else:
            measured, estimated = report["weights: quantized"]
            assert measured == estimated, "half of the 4-bit codes, all of their block constants"


def test_merge_on_save_under_fsdp2_refuses_what_it_cannot_stream_with_the_export_command_as_fix(
    tmp_path: Path,
) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_adapt import LoRAInjectionCallback, MergeOnSaveCallback

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    callbacks = [LoRAInjectionCallback(r=2, target_modules=["q_proj"])]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path, callbacks=callbacks
    )
    with pytest.raises(ConfigError, match=r"is not a Hugging Face directory of safetensors.*lightning-adapt export"):
        MergeOnSaveCallback(dirpath=str(tmp_path / "out")).setup(trainer, ToyModule(), "fit")


def test_fsdp2_recipes_take_their_data_parallel_size_from_devices() -> None:
    """``lightning-adapt fit --config recipes/chat/lora-fsdp.yaml --trainer.devices 2`` needs no other size: the
    recipes leave data_parallel_size ``auto``; sizes that cannot fit the processes are one line before launch."""
    import lightning as L
    import yaml

    from lightning_adapt.checks import mesh_sizes
    from lightning_adapt.cli import _resolve_mesh

    root = Path(__file__).resolve().parents[2]
    for recipe in ("lora-fsdp", "qlora-fsdp"):
        config = yaml.safe_load((root / "recipes" / "chat" / f"{recipe}.yaml").read_text())
        strategy = ModelParallelStrategy(**config["trainer"]["strategy"]["init_args"])
        _resolve_mesh(L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False))
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1), recipe
    assert mesh_sizes("auto", "auto", 4, 2) == (2, 4), "both auto: Lightning's own rule (nodes x devices)"
    assert mesh_sizes(2, "auto", 4, 1) == (2, 2) and mesh_sizes(4, 2, 4, 2) == (4, 2)
    with pytest.raises(ConfigError, match=r"= 2 x 1 = 2 processes, got data_parallel_size='auto', tensor_parallel"):
        mesh_sizes("auto", 3, 2, 1)
