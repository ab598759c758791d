"""``streaming: true``: the same examples as the table path, every batching mode, exact mid-epoch resume, and under
DDP each rank reads its own share and all ranks stop together."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.own_data import MULTI_TURN, SYSTEMLESS, as_format, write

from lightning_adapt.data import ChatDataModule
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.data.streaming import StreamingLoader


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    return write(tmp_path / "chats.jsonl", [as_format(c, "messages") for c in (SYSTEMLESS + MULTI_TURN) * 4])


def _module(tokenizer: Path, source: Path, **kwargs: Any) -> ChatDataModule:
    dm = ChatDataModule(tokenizer=str(tokenizer), source=str(source), **{"val_size": 4, "batch_size": 3, **kwargs})
    dm.setup("fit")
    return dm


def _learned(batches: list[dict[str, torch.Tensor]]) -> Counter[int]:
    """Every learned token of an epoch (a packed row's first label per example is masked: count inputs instead)."""
    return Counter(int(t) for b in batches for t in b["labels"].flatten() if t != IGNORE_INDEX)


def test_a_stream_holds_the_same_examples_as_the_table(chats: Path, tiny_llama_dir: Path) -> None:
    table = _module(tiny_llama_dir, chats)
    stream = _module(tiny_llama_dir, chats, streaming=True)
    first = [r["input_ids"] for r in table._splits["train"]] + [r["input_ids"] for r in table._splits["val"]]
    streamed_val = [r["input_ids"] for r in stream._splits["val"]]
    streamed_train = [
        b["input_ids"][i][b["attention_mask"][i] == 1].tolist()
        for b in stream.train_dataloader()
        for i in range(b["input_ids"].shape[0])
    ]
    assert len(streamed_val) == 4 and len(streamed_train) == len(first) - 4
    assert Counter(map(tuple, streamed_train + streamed_val)) == Counter(map(tuple, first))


@pytest.mark.parametrize("batching", ["pad", "group_by_length", "pack"])
def test_every_batching_mode_trains_on_every_token_once_an_epoch(
    batching: str, chats: Path, tiny_llama_dir: Path
) -> None:
    padded = list(_module(tiny_llama_dir, chats, streaming=True).train_dataloader())
    laid_out = list(_module(tiny_llama_dir, chats, streaming=True, batching=batching).train_dataloader())
    if batching == "pack":
        assert all(b["input_ids"].shape[0] == 1 and "position_ids" in b for b in laid_out)
        assert sum(b["input_ids"].numel() for b in laid_out) == sum(int(b["attention_mask"].sum()) for b in padded)
    else:
        assert _learned(laid_out) == _learned(padded)


@pytest.mark.parametrize("batching", ["pad", "group_by_length", "pack"])
def test_a_resumed_epoch_continues_with_the_same_batches(batching: str, chats: Path, tiny_llama_dir: Path) -> None:
    dm = _module(tiny_llama_dir, chats, streaming=True, batching=batching, batch_size=2)
    loader = dm.train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, epoch1, strict=False))
    for epoch, batches in ((0, epoch0), (1, epoch1)):
        resumed = dm.train_dataloader()
        resumed.load_state_dict({"epoch": epoch, "batches": 3, "rng": None})
        rest = list(resumed)
        assert len(rest) == len(batches) - 3
        assert all(torch.equal(a[k], b[k]) for a, b in zip(batches[3:], rest, strict=True) for k in a)
        assert resumed.state_dict()["epoch"] == epoch and resumed.state_dict()["batches"] == len(batches)


def _rank(rank: int, init: str, rows: int, out: str) -> None:
    import datasets

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    stream = datasets.Dataset.from_list(
        [{"input_ids": [i], "labels": [i], "length": 1} for i in range(rows)]
    ).to_iterable_dataset(num_shards=1)

    def collate(chunk: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([r["input_ids"] for r in chunk])}

    loader = StreamingLoader(stream, batching="pad", batch_size=1, max_length=1, seed=0, collate=collate)
    seen = [int(b["input_ids"][0, 0]) for b in loader]
    torch.save(seen, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_under_ddp_each_rank_reads_its_own_share_and_the_ranks_stop_together(tmp_path: Path) -> None:
    rows = 7  # round-robin over 2 ranks: 4 and 3 rows; both must stop after 3 batches or DDP would hang
    torch.multiprocessing.spawn(_rank, args=(f"file://{tmp_path / 'init'}", rows, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(a) == len(b) == 3
    assert not set(a) & set(b) and set(a) | set(b) <= set(range(rows))


def test_a_streamed_recipe_fits_through_the_trainer(chats: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    import lightning as L

    from lightning_adapt import LoRAInjectionCallback
    from lightning_adapt.tasks import CausalLMTask

    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), source=str(chats), streaming=True, val_size=4, batch_size=2)
    task = CausalLMTask(model_name_or_path=str(tiny_llama_dir))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[LoRAInjectionCallback(r=4, alpha=8)],
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
