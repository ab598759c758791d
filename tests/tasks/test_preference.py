"""Preference tuning (issue 27): the DPO / IPO / ORPO losses against a hand computation and TRL's formulas, the
reference (adapters off with LoRA: one copy of the base; a frozen copy for full fine-tuning), the pairs data, and a
tiny DPO-LoRA run that raises held-out preference accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.toy import trainer

from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.data import PreferenceDataModule
from lightning_adapt.data.preference import derive_pairs, read_preference_jsonl
from lightning_adapt.errors import ConfigError, DataError
from lightning_adapt.tasks import PreferenceTask
from lightning_adapt.tasks.preference import preference_loss, sequence_logps

# a toy batch of 3 pairs: summed log-probabilities of the policy and the reference
PC = torch.tensor([-12.5, -30.0, -7.25], dtype=torch.float64)
PR = torch.tensor([-14.0, -29.0, -9.5], dtype=torch.float64)
RC = torch.tensor([-13.0, -31.5, -7.0], dtype=torch.float64)
RR = torch.tensor([-13.5, -29.5, -9.0], dtype=torch.float64)


def test_dpo_loss_equals_a_hand_computation() -> None:
    beta = 0.1
    out = preference_loss("sigmoid", PC, PR, RC, RR, beta)
    # pair 0: h = (-12.5 + 13) - (-14 + 13.5) = 0.5 + 0.5 = 1.0; loss = log(1 + e^{-0.1})
    # pair 1: h = (1.5) - (0.5) = 1.0; pair 2: h = (-0.25) - (-0.5) = 0.25; loss = log(1 + e^{-0.025})
    expected = [math.log1p(math.exp(-0.1)), math.log1p(math.exp(-0.1)), math.log1p(math.exp(-0.025))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, 0.15, -0.025], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.05, -0.05], abs=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trls_formula(beta: float, label_smoothing: float) -> None:
    # TRL's DPOTrainer, loss_type="sigmoid" (docs: "the sigmoid loss from the original DPO paper"; label smoothing
    # is cDPO's): logits = (pc - rc) - (pr - rr)
    #   losses = -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
    logits = (PC - RC) - (PR - RR)
    trl = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    out = preference_loss("sigmoid", PC, PR, RC, RR, beta, label_smoothing)
    torch.testing.assert_close(out.losses, trl, atol=1e-6, rtol=0)


def test_ipo_and_orpo_equal_trls_formulas() -> None:
    beta = 0.1
    logits = (PC - RC) - (PR - RR)  # IPO: (logits - 1/(2 beta))^2, on per-token means (the caller averages)
    torch.testing.assert_close(preference_loss("ipo", PC, PR, RC, RR, beta).losses, (logits - 1 / (2 * beta)) ** 2)
    pc, pr = PC / 20, PR / 20  # ORPO: per-token means; log odds of the chosen over the rejected
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    out = preference_loss("orpo", pc, pr, None, None, beta)
    torch.testing.assert_close(out.losses, -beta * F.logsigmoid(log_odds))
    torch.testing.assert_close(out.chosen_rewards, beta * pc)


def test_sequence_logps_sum_the_labelled_next_token_log_probabilities() -> None:
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert count.tolist() == [2, 2]
    torch.testing.assert_close(total, torch.stack([logp[0, 0, 3] + logp[0, 1, 1], logp[1, 1, 4] + logp[1, 2, 2]]))


def test_bad_settings_are_refused_all_at_once(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        PreferenceTask(str(tiny_llama_dir), loss="kto", beta=0.0, label_smoothing=0.7)  # type: ignore[arg-type]
    text = str(info.value)
    assert "model.loss='kto'" in text and "['sigmoid', 'ipo', 'orpo']" in text and "model.beta=0.0" in text
    assert "model.label_smoothing=0.7" in text and text.count("Fix:") == 3
    with pytest.raises(ConfigError, match="applies to loss='sigmoid' only, not 'ipo'"):
        PreferenceTask(str(tiny_llama_dir), loss="ipo", label_smoothing=0.1)


def test_derived_pairs_reject_another_prompts_real_response() -> None:
    pairs = [("hi", "hello"), ("how are you", "fine"), ("bye", "hello"), ("name?", "Bot")]
    triples = derive_pairs(pairs, seed=0)
    assert len(triples) == 4 and {(p, c) for p, c, _ in triples} == set(pairs)
    responses = {r for _, r in pairs}
    assert all(r in responses and r.lower() != c.lower() for _, c, r in triples)


def test_jsonl_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path.write_text("\n".join([good, "{not json", json.dumps({"prompt": "p", "chosen": ""}), ""]))
    with pytest.raises(DataError) as info:
        read_preference_jsonl(str(path))
    text = str(info.value)
    assert "line 2: not JSON" in text and "line 3: ['chosen', 'rejected'] missing" in text and "Fix:" in text
    path.write_text(good + "\n")
    assert read_preference_jsonl(str(path)) == [("p", "c", "r")]
    with pytest.raises(DataError, match=r"data\.data_path='/nonexistent\.jsonl' is not an existing file"):
        PreferenceDataModule(data_path="/nonexistent.jsonl")


def test_batches_hold_the_chosen_rows_then_the_rejected(tiny_llama_dir: Path) -> None:
    dm = PreferenceDataModule(tokenizer=str(tiny_llama_dir), categories=["greetings"], val_size=4, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    rows = dm._splits["val"][:3]
    assert batch["input_ids"].shape[0] == 6
    for i, row in enumerate(rows):
        for side, offset in (("chosen", 0), ("rejected", 3)):
            n = len(row[side]["input_ids"])
            assert batch["input_ids"][i + offset, :n].tolist() == row[side]["input_ids"]
            assert batch["labels"][i + offset, :n].tolist() == row[side]["labels"]
        assert row["chosen"]["prompt_ids"] == row["rejected"]["prompt_ids"], "one prompt, two responses"
    predict = dm.predict_collate(rows)
    assert predict["reference"] == [r["reference"] for r in rows] and predict["input_ids"].shape[0] == 3


@pytest.mark.slow  # ~40 s of CPU: SmolLM2's 49k-token vocabulary dominates even a 2-layer model
def test_a_tiny_dpo_lora_run_raises_held_out_preference_accuracy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # chosen: the corpus's reply; rejected: the same reply in capitals (a preference a tiny random model can learn)
    from lightning_adapt.data._common import packaged_path
    from lightning_adapt.data.chat import read_chat_pairs

    folder = packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data_dir")
    pairs = read_chat_pairs(str(folder), ["greetings", "conversations", "humor"])
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": c.upper()}) + "\n" for p, c in pairs))
    L.seed_everything(0)
    task = PreferenceTask(str(tiny_llama_dir), beta=0.5, learning_rate=1e-2)
    dm = PreferenceDataModule(str(tiny_llama_dir), data_path=str(path), max_length=40, batch_size=4, val_size=24)
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    memory = MemoryReportCallback(log_metrics=False)
    t = trainer(callbacks=[lora, memory], limit_train_batches=16, num_sanity_val_steps=-1)
    t.fit(task, datamodule=dm)
    before, after = task.baseline["val_acc"], task.last_val["val_acc"]
    print(f"held-out val_acc {before:.3f} -> {after:.3f}, val_reward_acc -> {task.last_val['val_reward_acc']:.3f}")
    assert after > before, (before, after)
    assert task.baseline["val_reward_acc"] == 0.0, "at the start the policy is its reference: no reward is higher"
    assert task.reference_model is None, "adapters off served as the reference: no second copy of the base"
    assert "reference copy" not in memory.reports["fit_end"]


@pytest.mark.slow  # two Trainer steps and a second load of the model
def test_full_fine_tuning_loads_a_frozen_reference_that_the_memory_report_counts(tiny_llama_dir: Path) -> None:
    L.seed_everything(0)
    task = PreferenceTask(str(tiny_llama_dir), learning_rate=1e-3)
    dm = PreferenceDataModule(str(tiny_llama_dir), categories=["greetings"], max_length=40, batch_size=2, val_size=2)
    memory = MemoryReportCallback(log_metrics=False)
    trainer(callbacks=[memory], max_steps=2, limit_val_batches=0).fit(task, datamodule=dm)
    reference = task.reference_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    base = sum(p.numel() * p.element_size() for p in task.model.parameters())
    assert memory.reports["fit_end"]["reference copy"] == (base, base), "measured and estimated: the base once more"
    assert not any(k.startswith("_reference") or "reference" in k for k in task.state_dict()), "not checkpointed"
    loaded = dict(reference.named_parameters())
    trained = [n for n, p in task.model.named_parameters() if not torch.equal(p, loaded[n])]
    assert trained, "the policy trained while the reference stayed the pretrained weights"


def test_cached_reference_log_probabilities_give_the_same_loss_without_a_reference_forward(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora

    dm = PreferenceDataModule(tokenizer=str(tiny_llama_dir), categories=["greetings"], val_size=4, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))

    def task() -> PreferenceTask:
        module = PreferenceTask(str(tiny_llama_dir), reference_cache=str(tmp_path / "cache"))
        module.configure_model()
        inject_lora(module.model, LoRASpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)  # B != 0: the policy differs from its reference
        return module

    first = task()
    fresh = first.step_outputs(batch)["loss"]
    first.save_reference_cache()
    files = list((tmp_path / "cache").glob("reference-logps-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 2, "one entry per pair"
    second = task()  # a new run: reads the file, never runs the reference
    monkeypatch.setattr(PreferenceTask, "reference_logits", lambda *_: pytest.fail("the reference ran"))
    assert torch.equal(second.step_outputs(batch)["loss"], fresh)
