"""Training batches of the chat data: padded, grouped by length, packed (issue 15).

Packing must be exact: inside a packed row each example's logits equal its logits alone (the mask is
block-diagonal), the per-token loss equals the padded batches', and no label crosses an example boundary.
Padding is measured on the real chat training set; every layout resumes mid-epoch exactly.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.toy import tiny_llama, trainer
from torch.utils.data import BatchSampler, DataLoader

from lightning_adapt.data import ChatDataModule, ResumableDataLoader
from lightning_adapt.data.batching import (
    BATCHING_MODES,
    IGNORE_INDEX,
    Batching,
    LengthGroupedBatchSampler,
    first_fit,
    pack_collate,
    token_counts,
)
from lightning_adapt.data.chat import NoResponseLeftWarning
from lightning_adapt.errors import DataError
from lightning_adapt.tasks import CausalLMTask


def _like(dm: ChatDataModule, batching: str) -> ChatDataModule:
    """A DataModule with ``dm``'s arguments but ``batching``, sharing its tokenized splits (setup is slow)."""
    args = {**dm.hparams, "batching": batching}
    twin = ChatDataModule(**args)
    twin.tokenizer, twin._splits = dm.tokenizer, dm._splits
    return twin


@pytest.fixture(scope="module")
def real_chat() -> dict[int, tuple[ChatDataModule, list[str]]]:
    """The packaged chat training set at max_length 64 and 96, with the warnings of its setup."""
    out = {}
    for max_length in (64, 96):
        dm = ChatDataModule(tokenizer="smollm2-135m-instruct", max_length=max_length, val_size=32, batch_size=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.setup("fit")
        out[max_length] = (dm, [str(w.message) for w in caught if issubclass(w.category, NoResponseLeftWarning)])
    return out


def _epoch(loader: DataLoader[Any]) -> tuple[float, int, list[dict[str, torch.Tensor]]]:
    batches = list(loader)
    counts = [token_counts(b) for b in batches]
    return 1 - sum(r for r, _ in counts) / sum(p for _, p in counts), len(batches), batches


def _tokens(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return sorted(torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches]).tolist())


@pytest.mark.parametrize("max_length", [64, 96])
def test_packing_and_grouping_cut_the_padding_of_the_real_chat_set(real_chat: Any, max_length: int) -> None:
    dm, _ = real_chat[max_length]
    padded, n_padded, pad_batches = _epoch(_like(dm, "pad").train_dataloader())
    grouped, n_grouped, group_batches = _epoch(_like(dm, "group_by_length").train_dataloader())
    packed, n_packed, pack_batches = _epoch(_like(dm, "pack").train_dataloader())
    assert padded > 0.10, "the padded layout wastes over a tenth of its positions"
    assert packed <= 0.02 and grouped <= 0.02 < padded
    assert n_grouped == n_padded and sum(len(b["input_ids"]) != 4 for b in group_batches) <= 1
    capacity = 4 * max_length
    assert all(b["input_ids"].shape == (1, b["input_ids"].shape[1]) for b in pack_batches)
    assert max(b["input_ids"].shape[1] for b in pack_batches) <= capacity
    fill = sum(b["input_ids"].numel() for b in pack_batches) / (n_packed * capacity)
    assert fill > 0.9, f"packs hold {fill:.0%} of their capacity"
    assert _tokens(pack_batches) == _tokens(group_batches) == _tokens(pad_batches), "every layout trains each token"


def test_an_example_without_response_tokens_is_dropped_with_one_warning(real_chat: Any) -> None:
    dm, messages = real_chat[64]
    assert len(messages) == 1 and "truncates away every response token of 2 of 2329 train examples" in messages[0]
    assert "Fix: raise data.max_length above 64" in messages[0] and real_chat[96][1] == []
    rows = dm._splits["train"] + dm._splits["val"]
    assert all(any(x != IGNORE_INDEX for x in r["labels"]) for r in rows)
    assert len(dm._splits["train"]) == len(real_chat[96][0]._splits["train"]) - 2


def test_a_split_left_without_responses_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    long = " ".join(["word"] * 40)
    conversations = [[f"{long} {i}?", f"answer {i}"] for i in range(4)]
    (tmp_path / "long.yml").write_text(yaml.safe_dump({"conversations": conversations}))
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), data_dir=str(tmp_path), max_length=48, val_size=1)
    with pytest.raises(DataError, match=r"max_length=48 leaves no response token in any train or val example .*Fix"):
        dm.setup("fit")


def test_a_bad_batching_value_names_the_argument_the_choices_and_the_fix() -> None:
    with pytest.raises(DataError) as info:
        ChatDataModule(batching="packed")  # type: ignore[arg-type]
    message = str(info.value)
    assert "data.batching='packed'" in message and str(list(BATCHING_MODES)) in message and "Fix:" in message


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_example_of_a_packed_row_has_its_logits_alone(attention: str) -> None:
    model = tiny_llama(attn_implementation=attention).eval()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 100, (n,), generator=g).tolist(), "labels": [0] * n} for n in (7, 12, 5)]
    packed = pack_collate(rows)
    with torch.no_grad():
        together = model(**packed_inputs(packed), use_cache=False).logits[0]
        unmasked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        cached = model(**packed_inputs(packed)).logits[0]  # the config's use_cache=True: positions are not read
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            end = start + len(row["input_ids"])
            torch.testing.assert_close(together[start:end], alone, atol=1e-5, rtol=1e-5)
            start = end
    for mixed in (unmasked, cached):
        assert not torch.allclose(mixed[7:19], together[7:19], atol=1e-3), "the examples attend to each other"
    torch.testing.assert_close(cached[:7], together[:7], atol=1e-5, rtol=1e-5)


def test_the_export_probe_keeps_the_examples_of_a_packed_row_apart() -> None:
    """The merge's probe forward (``make_probe``) reads ``position_ids``: each packed example's logits are its own."""
    from lightning_adapt.export.exporter import make_probe

    model = tiny_llama().eval()
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [0] * n} for n in (6, 9)]
    probe = make_probe(model, pack_collate(rows))
    assert probe is not None
    with torch.no_grad():
        logits = probe()[0]
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[6:], alone, atol=1e-5, rtol=1e-5)


def packed_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def _token_loss_sum(task: CausalLMTask, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """``(sum of target-token losses, targets)`` through the task's own forward (HF's shifted mean loss)."""
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        return float(task(batch).loss) * targets, targets


def test_the_per_token_loss_of_packed_rows_equals_the_padded_batch(tiny_llama_dir: Path) -> None:
    task = CausalLMTask(str(tiny_llama_dir))
    task.configure_model()
    task.eval()
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), categories=["greetings"], val_size=4, max_length=64)
    dm.setup("fit")
    rows = dm._splits["train"][:6]
    full = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows[:3]]  # a label at position 0 too
    for examples in (rows, full):
        padded = _token_loss_sum(task, dm.collate(examples))
        packed = _token_loss_sum(task, pack_collate(examples))
        assert packed[1] == padded[1], "a label was predicted across an example boundary"
        assert packed[0] / packed[1] == pytest.approx(padded[0] / padded[1], rel=1e-5, abs=1e-6)


def test_a_packed_chat_run_trains_through_the_trainer(tiny_llama_dir: Path) -> None:
    task = CausalLMTask(str(tiny_llama_dir), learning_rate=1e-2)
    dm = ChatDataModule(
        tokenizer=str(tiny_llama_dir), categories=["greetings"], val_size=4, max_length=48, batching="pack"
    )
    trainer(limit_train_batches=2, limit_val_batches=1).fit(task, datamodule=dm)
    assert task.trainer.global_step == 2 and "val_ppl" in task.last_val


def _rows(loader: Any) -> list[list[int]]:
    return [b["input_ids"].flatten().tolist() for b in loader]


@pytest.mark.parametrize("batching", ["group_by_length", "pack"])
def test_the_new_layouts_depend_on_seed_and_epoch_only_and_resume_mid_epoch(
    tiny_llama_dir: Path, batching: Batching
) -> None:
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), categories=["greetings", "humor"], val_size=4, batching=batching)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    head = _rows([next(it), next(it), next(it)])
    state = loader.state_dict()
    tail = _rows(it)
    assert state["batches"] == 3 and len(head + tail) == len(loader) > 6
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    torch.manual_seed(99)
    assert _rows(resumed) == tail, "the resumed epoch continues with the same batches"
    again = dm.train_dataloader()
    assert _rows(again) == head + tail
    again.batch_sampler.sampler.set_epoch(1)  # type: ignore[union-attr]
    assert _rows(again) != head + tail, "a new epoch, a new order"


def test_grouping_survives_lightnings_distributed_sampler_injection() -> None:
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    lengths = [3 + (7 * i) % 40 for i in range(64)]
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    dm = ChatDataModule(batching="group_by_length", batch_size=4)
    dm._splits = {"train": rows}
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook: it records the arguments
    seen = []
    for rank in (0, 1):
        sampler = DistributedSamplerWrapper(loader.batch_sampler.sampler, num_replicas=2, rank=rank, shuffle=False)  # type: ignore[union-attr]
        shard = _update_dataloader(loader, sampler)
        assert isinstance(shard, ResumableDataLoader) and isinstance(shard.batch_sampler, LengthGroupedBatchSampler)
        batches = list(shard.batch_sampler)  # type: ignore[arg-type]
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert len(spans) == 8 and all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "no two batches interleave"
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(64)), "the ranks share the epoch"


def _naive_first_fit(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    bins: list[list[int]] = []
    for i in order:
        home = next((b for b in bins if sum(lengths[j] for j in b) + lengths[i] <= capacity), None)
        if home is None:
            bins.append(home := [])
        home.append(i)
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_puts_each_example_into_the_first_bin_with_room(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 97, (300,), generator=g).tolist()
    bins = first_fit(lengths, 256, seed)
    assert bins == _naive_first_fit(lengths, 256, seed)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 256
