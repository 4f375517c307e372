"""Policy training end to end on a tiny random Llama: DPO published behind the win-rate gate,
rejection sampling, RLOO, GRPO and PPO against a real reward service, the gate refusing a worse
policy, and the command line."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from plaudit.cli import TrainPolicySettings, main
from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.feedback.domain import Comparison, Correction
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.runtime.policy_model import LoadedPolicy
from plaudit.trainer.policy import (
    PolicyPublishOptions,
    StartingPoint,
    already_trained_under,
    load_policy_model,
    promotion_record,
    starting_point,
    train_policy,
)
from plaudit.trainer.policy_config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RejectionSamplingConfig,
    RLConfig,
)
from plaudit.trainer.policy_export import (
    export_policy,
    export_policy_checkpoint,
    load_policy_checkpoint,
)
from plaudit.trainer.reward import PairSource
from tests.conftest import ServerThread, toy_pairs, write_jsonl

SMALL = {
    "max_length": 40,
    "max_prompt_length": 24,
    "batch_size": 8,
    "eval_prompts": 6,
    "eval_max_new_tokens": 6,
}


def test_dpo_publishes_a_policy_with_its_metrics_and_gate_decision(
    tiny_policy_checkpoint: Path, tiny_registry: Path, reward_server: ServerThread, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(48))
    registry = ModelRegistry(tmp_path / "registry", "policy")
    cfg = DPOConfig(
        base=str(tiny_policy_checkpoint),
        learning_rate=5e-3,
        beta=0.5,
        eval_fraction=0.2,
        reward_addr=reward_server.address,
        quantize="int8-block",
        **SMALL,
    )
    result = train_policy(
        cfg,
        PairSource(files=(data,)),
        registry,
        publish=PolicyPublishOptions(promote=True),
        output_dir=tmp_path / "run",
    )
    manifest = result.manifest
    assert manifest is not None and manifest.kind == "policy" and manifest.parent is None
    assert registry.verify(manifest.version).metrics == result.metrics
    for key in ("eval/accuracy", "eval/initial_accuracy", "eval/win_rate", "eval/kl"):
        assert key in manifest.metrics
    assert manifest.metrics["eval/reward"] == pytest.approx(
        result.promotion["candidate_reward"], abs=1e-12
    )
    promotion = manifest.promotion
    assert promotion is not None and promotion["requested"] is True
    assert promotion["baseline"] == f"base model {tiny_policy_checkpoint}"
    assert promotion["min_win_rate"] == 0.5
    assert promotion["passed"] == promotion["promoted"]
    assert promotion["passed"] == (
        promotion["win_rate"] > 0.5 and promotion["lc_win_rate"] > 0.5 and promotion["kl"] <= 10
    )
    assert registry.promoted() == (manifest.version if promotion["promoted"] else None)
    assert promotion["reward_model"] == [ModelRegistry(tiny_registry).promoted()]
    assert manifest.notes["training"]["method"] == "dpo"
    assert Path(manifest.notes["checkpoint"]).is_dir()
    # the published graph is what the generation service serves
    served = LoadedPolicy.load(registry, manifest.version, provider="cpu")
    assert served.version == manifest.version
    # --quantize: the int8-block graph went through the next-token gate, kept or refused
    quant = manifest.quantization
    assert quant is not None and quant.method.startswith("MatMulNBits 8-bit")
    assert quant.passed == ("int8-block" in manifest.onnx_files)
    assert served.precision == ("int8-block" if quant.passed else "fp32")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["version"] == manifest.version and summary["config"]["beta"] == 0.5


def test_rejection_sampling_uses_the_reward_service_and_corrections(
    tiny_policy_checkpoint: Path, reward_server: ServerThread, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    pairs = toy_pairs(30)
    with FeedbackStore(url) as store:
        events: list[Comparison | Correction] = [
            Comparison(
                prompt=p["prompt"],
                chosen=p["chosen"],
                rejected=p["rejected"],
                annotator_id="a",
                idempotency_key=f"pair-{i}",
            )
            for i, p in enumerate(pairs)
        ]
        events += [
            Correction(
                prompt=p["prompt"],
                completion=p["rejected"],
                corrected=p["chosen"],
                annotator_id="b",
                idempotency_key=f"fix-{i}",
            )
            for i, p in enumerate(pairs[:10])
        ]
        assert not [r for r in store.submit_many(events) if isinstance(r, Exception)]
        last = max(item.cursor for item in store.export_sft())
    cfg = RejectionSamplingConfig(
        base=str(tiny_policy_checkpoint),
        num_candidates=3,
        max_new_tokens=6,
        max_prompts=8,
        sft_learning_rate=1e-3,
        eval_fraction=0.2,
        reward_addr=reward_server.address,
        **SMALL,
    )
    result = train_policy(cfg, PairSource(database_url=url), output_dir=tmp_path / "run")
    m = result.metrics
    assert m["sampling/prompts"] == 8
    assert m["sampling/best_reward"] >= m["sampling/mean_reward"]
    held_out = {p for p in (q["prompt"] for q in pairs) if _held_out(p, 0.2)}
    corrections_in_training = sum(p["prompt"] not in held_out for p in pairs[:10])
    assert m["train/corrections"] == corrections_in_training
    assert m["train/sft_examples"] == 8 + corrections_in_training
    assert {"eval/reward", "eval/win_rate", "eval/kl"} <= set(m)
    assert result.data_cursor is not None and int(result.data_cursor) >= last
    assert result.promotion["reward_model"]  # the version that scored the samples
    assert not result.promotion["promoted"]  # not asked to


def _held_out(prompt: str, fraction: float) -> bool:
    from plaudit.trainer.objective import prompt_bucket

    return prompt_bucket(prompt) < fraction


def tiny_rl_command(tmp_path: Path, checkpoint: Path, reward_addr: str, *extra: str) -> list[str]:
    """``plaudit train policy --method rl`` on 20 prompts of the tiny policy, run folder
    ``tmp_path/run``; ``extra`` flags are added (and override these)."""
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {i}"} for i in range(20)]
    )
    return [
        "train", "policy", "--method", "rl", "--registry", str(tmp_path / "registry"),
        "--data", str(data), "--base", str(checkpoint), "--reward-addr", reward_addr,
        "--rloo-k", "2", "--prompts-per-step", "2", "--max-new-tokens", "6",
        "--max-length", "40", "--max-prompt-length", "24", "--eval-fraction", "0.2",
        "--output-dir", str(tmp_path / "run"), "--no-progress", "--log-level", "WARNING",
        *extra,
    ]  # fmt: skip


def test_rl_from_the_command_line(
    tiny_policy_checkpoint: Path,
    reward_server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = tiny_rl_command(
        tmp_path, tiny_policy_checkpoint, reward_server.address,
        "--steps", "3", "--learning-rate", "1e-3", "--eval-prompts", "4",
        "--eval-max-new-tokens", "6",
    )  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    metrics = summary["metrics"]
    assert metrics["train/steps"] == 3 and {"rl/score", "rl/kl", "rl/reward"} <= set(metrics)
    assert {"eval/win_rate", "eval/kl", "eval/reward"} <= set(metrics)
    manifest = ModelRegistry(tmp_path / "registry", "policy").manifest(summary["version"])
    assert manifest.promotion == summary["promotion"] and manifest.notes["training"]["rloo_k"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "rl/score" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "training.png").is_file()


def test_grpo_from_the_command_line(
    tiny_policy_checkpoint: Path,
    reward_server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two rollout batches of 2 prompts x 3 samples, two optimizer steps on each (the second
    off-policy, so the clip can act), Dr. GRPO's aggregation; published with its gate record."""
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {i}"} for i in range(20)]
    )
    args = [
        "train", "policy", "--method", "grpo", "--registry", str(tmp_path / "registry"),
        "--data", str(data), "--base", str(tiny_policy_checkpoint),
        "--reward-addr", reward_server.address, "--steps", "2", "--group-size", "3",
        "--grpo-epochs", "2", "--prompts-per-step", "2", "--batch-size", "4",
        "--max-new-tokens", "6", "--learning-rate", "1e-3", "--no-scale-rewards",
        "--loss-aggregation", "token-sum-constant",
        "--max-length", "40", "--max-prompt-length", "24", "--eval-fraction", "0.2",
        "--eval-prompts", "4", "--eval-max-new-tokens", "6", "--promote",
        "--output-dir", str(tmp_path / "run"), "--no-progress", "--log-level", "WARNING",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    metrics = summary["metrics"]
    assert metrics["train/steps"] == 4 and metrics["train/rollout_batches"] == 2
    keys = {"rl/score", "rl/kl", "rl/reward", "rl/entropy", "rl/clip_fraction", "rl/k3_kl"}
    assert keys <= set(metrics) and all(math.isfinite(metrics[k]) for k in keys)
    assert metrics["rl/entropy"] > 0
    assert {"eval/win_rate", "eval/kl", "eval/reward"} <= set(metrics)
    manifest = ModelRegistry(tmp_path / "registry", "policy").manifest(summary["version"])
    assert manifest.promotion == summary["promotion"]
    assert manifest.notes["training"]["method"] == "grpo"
    assert manifest.notes["training"]["loss_aggregation"] == "token-sum-constant"
    assert summary["promotion"]["promoted"] == summary["promotion"]["passed"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "rl/score" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["rl/score"] == steps[1]["rl/score"]  # two steps on one rollout batch
    assert all(math.isfinite(r["train/loss"]) for r in steps)
    assert (tmp_path / "run" / "training.png").is_file()


@pytest.mark.parametrize(("value_model", "lora_r"), [("shared", 0), ("separate", 4)])
def test_ppo_trains_a_value_head_and_publishes_without_it(
    value_model: str,
    lora_r: int,
    tiny_policy_checkpoint: Path,
    reward_server: ServerThread,
    tmp_path: Path,
) -> None:
    """PPO with the value head on the policy (full fine-tuning), or on a separate value model
    (LoRA), two rollout batches of 2 epochs x 2 minibatches, the KL coefficient adapting."""
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {i}"} for i in range(20)]
    )
    registry = ModelRegistry(tmp_path / "registry", "policy")
    cfg = PPOConfig(
        base=str(tiny_policy_checkpoint),
        steps=2,
        prompts_per_step=4,
        ppo_epochs=2,
        num_minibatches=2,
        max_new_tokens=6,
        learning_rate=1e-3,
        kl_target=1.0,
        whiten_rewards=True,
        value_model=value_model,
        lora_r=lora_r,
        eval_fraction=0.2,
        reward_addr=reward_server.address,
        **{**SMALL, "batch_size": 2, "eval_prompts": 4},
    )
    result = train_policy(
        cfg,
        PairSource(files=(data,)),
        registry,
        publish=PolicyPublishOptions(promote=True),
        output_dir=tmp_path / "run",
    )
    m = result.metrics
    assert m["train/steps"] == 2 * 2 * 2 and m["train/rollout_batches"] == 2
    keys = {"rl/score", "rl/kl", "rl/reward", "rl/entropy", "rl/clip_fraction", "rl/value_loss"}
    assert keys <= set(m) and all(math.isfinite(m[k]) for k in keys)
    assert m["rl/value_loss"] >= 0 and 0 <= m["rl/clip_fraction"] <= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    coefs = [r["rl/kl_coef"] for r in log if "rl/kl_coef" in r]
    assert coefs[0] == cfg.kl_coef and len(set(coefs)) == 2  # adapted after the first batch
    manifest = result.manifest
    assert manifest is not None and manifest.notes["training"]["method"] == "ppo"
    promotion = manifest.promotion
    assert promotion is not None and promotion["requested"] is True
    assert promotion["promoted"] == promotion["passed"]
    assert registry.promoted() == (manifest.version if promotion["promoted"] else None)
    # the value head (and value model) trained with the policy but are not part of it
    assert result.model is not None
    assert not any("plaudit_value" in name for name in result.model.state_dict())
    with safe_open(str(result.checkpoint / "model.safetensors"), "pt") as saved:
        assert not any("plaudit_value" in name for name in saved.keys())  # noqa: SIM118
    assert (tmp_path / "run" / "training.png").is_file()
    if not lora_r:
        assert manifest.lora_adapter is None
        return
    # LoRA: the PEFT adapter ships beside the merged graph, and base + adapter is the policy
    adapter = manifest.lora_adapter
    assert adapter is not None and (adapter.rank, adapter.stacked_on) == (4, None)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(
        manifest.files
    )
    _, folder = registry.checkout(manifest.version)
    base, _, _ = load_policy_model(str(tiny_policy_checkpoint))
    served = PeftModel.from_pretrained(base, str(folder / adapter.path)).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            served(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


class LengthScorer:
    """A stand-in reward model that prefers longer completions."""

    def __init__(self) -> None:
        self.versions = {"length"}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([len(c) for c in completions], dtype=np.float64)


def test_the_gate_refuses_a_worse_policy(tiny_policy_checkpoint: Path, tmp_path: Path) -> None:
    """DPO towards terse answers, judged by a reward that likes long ones, against the served
    parent: the candidate loses, is published with the refusal, and the parent stays."""
    registry = ModelRegistry(tmp_path / "registry", "policy")
    parent = export_policy_checkpoint(
        str(tiny_policy_checkpoint), registry, promote=True, max_length=64
    ).version
    terse = [
        {"prompt": p["prompt"], "chosen": "Ok.", "rejected": p["chosen"] + " " + p["rejected"]}
        for p in toy_pairs(40)
    ]
    cfg = DPOConfig(
        base=str(tiny_policy_checkpoint),
        learning_rate=2e-2,
        beta=0.5,
        epochs=2,
        eval_fraction=0.25,
        **{**SMALL, "eval_max_new_tokens": 12},
    )
    result = train_policy(
        cfg,
        PairSource(files=(write_jsonl(tmp_path / "terse.jsonl", terse),)),
        registry,
        publish=PolicyPublishOptions(promote=True),
        output_dir=tmp_path / "run",
        scorer=LengthScorer(),
    )
    promotion = result.promotion
    assert promotion["baseline"] == f"parent {parent}"
    assert promotion["win_rate"] < 0.5 and not promotion["passed"] and not promotion["promoted"]
    assert promotion["candidate_reward"] < promotion["baseline_reward"]
    assert result.manifest is not None and result.manifest.parent == parent
    assert result.manifest.promotion == promotion
    assert registry.promoted() == parent


def test_gate_thresholds() -> None:
    cfg = RLConfig(promotion_min_win_rate=0.55, promotion_max_kl=3.0)
    metrics = {
        "eval/win_rate": 0.55, "eval/lc_win_rate": 0.6, "eval/kl": 1.0, "eval/wins": 11.0,
        "eval/prompts": 20.0,
    }  # fmt: skip
    refused = promotion_record(metrics, cfg, "base", requested=True)
    assert not refused["passed"] and "win rate 0.550 <= 0.55" in refused["reason"]
    passed = promotion_record({**metrics, "eval/win_rate": 0.6}, cfg, "base", requested=False)
    assert passed["passed"] and not passed["promoted"] and "not asked" in passed["reason"]
    assert passed["kl_reference"] == "base" and passed["max_kl"] == 3.0
    too_far = promotion_record({**metrics, "eval/win_rate": 0.6, "eval/kl": 3.5}, cfg, "base",
                               requested=True)  # fmt: skip
    assert not too_far["promoted"] and "KL 3.50 > 3 nats" in too_far["reason"]
    unmeasured = promotion_record({}, cfg, "base", requested=True)
    assert not unmeasured["promoted"] and "not measured" in unmeasured["reason"]


def test_settings_pick_the_methods_defaults_and_refuse_foreign_flags(tmp_path: Path) -> None:
    data = [tmp_path / "x.jsonl"]
    rl = TrainPolicySettings(method="rl", data=data, steps=7).policy_config()
    assert isinstance(rl, RLConfig) and rl.steps == 7 and rl.kl_coef == RLConfig().kl_coef
    dpo = TrainPolicySettings(data=data, lora_r=8).policy_config()
    assert isinstance(dpo, DPOConfig) and dpo.beta == 0.1 and dpo.lora_r == 8
    assert dpo.promotion_min_win_rate == 0.5
    with pytest.raises(ValueError, match="--beta: not a setting of --method rl"):
        TrainPolicySettings(method="rl", data=data, beta=0.2)
    grpo = TrainPolicySettings(method="grpo", data=data, steps=3).policy_config()
    assert isinstance(grpo, GRPOConfig) and grpo.kl_coef == 0.04 and grpo.steps == 3
    assert grpo.loss_aggregation == "sequence-mean" and grpo.grpo_epochs == 1
    ppo = TrainPolicySettings(method="ppo", data=data, kl_coef=0.2).policy_config()
    assert isinstance(ppo, PPOConfig) and ppo.kl_coef == 0.2 and ppo.ppo_epochs == 4
    assert (ppo.gamma, ppo.lam, ppo.vf_coef, ppo.cliprange_value) == (1.0, 0.95, 0.1, 0.2)
    with pytest.raises(ValueError, match="--rloo-k: not a setting of --method grpo"):
        TrainPolicySettings(method="grpo", data=data, rloo_k=2)
    with pytest.raises(ValueError, match="--group-size: not a setting of --method ppo"):
        TrainPolicySettings(method="ppo", data=data, group_size=2)
    with pytest.raises(ValueError, match="either --data"):
        TrainPolicySettings(method="dpo")
    with pytest.raises(ValueError, match="invalid dpo settings: max_prompt_length"):
        TrainPolicySettings(data=data, max_length=64, max_prompt_length=64)


# -- where a scheduled training starts, and whether it is needed -----------------------------------
def test_base_live_starts_from_the_promoted_policy(
    tiny_policy_checkpoint: Path, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path / "registry", "policy")
    tiny = str(tiny_policy_checkpoint)
    with pytest.raises(FailedPreconditionError, match="--base live"):
        starting_point("live", registry, None)
    assert starting_point("smollm2", registry, None) == StartingPoint(
        "smollm2", None, "base model smollm2"
    )
    exported = export_policy_checkpoint(tiny, registry, promote=True, max_length=64).version
    # a plain export is its backbone's weights: starting there starts from the live policy
    assert starting_point("live", registry, exported) == StartingPoint(
        tiny, tiny, f"live policy {exported}"
    )
    model, tokenizer, _ = load_policy_checkpoint(tiny)
    run = tmp_path / "run" / "checkpoint"
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    trained = export_policy(
        model, tokenizer, registry, notes={"checkpoint": str(run)}, backbone=tiny, max_length=64
    ).version
    assert starting_point("live", registry, trained) == StartingPoint(
        str(run), tiny, f"live policy {trained}", trained_on=trained
    )  # a LoRA adapter trained from here is stacked on `trained`
    shutil.rmtree(run)  # the run folder is gone: the backbone, and the KL is said to be to it
    gone = starting_point("live", registry, trained)
    assert gone.load == tiny and gone.reference.endswith(f"({trained}'s checkpoint is gone)")
    assert gone.trained_on is None


def test_only_after_new_reward_skips_what_the_serving_reward_model_already_judged(
    tiny_policy_checkpoint: Path,
    tiny_registry: Path,
    reward_server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = ModelRegistry(tmp_path / "registry", "policy")
    assert already_trained_under(registry, reward_server.address) is None  # nothing trained yet
    live_reward = ModelRegistry(tiny_registry).promoted()
    model, tokenizer, _ = load_policy_checkpoint(str(tiny_policy_checkpoint))
    export_policy(model, tokenizer, registry, promotion={"reward_model": ["reward-old"]},
                  max_length=64)  # fmt: skip
    assert already_trained_under(registry, reward_server.address) is None  # a new reward model
    judged = export_policy(
        model, tokenizer, registry, promotion={"reward_model": [live_reward]}, max_length=64
    ).version
    why = already_trained_under(registry, reward_server.address)
    assert why == f"policy {judged} was already trained against reward model {live_reward}"
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(8))
    capsys.readouterr()
    assert main([
        "train", "policy", "--method", "rl", "--data", str(data), "--base", "live",
        "--registry", str(tmp_path / "registry"), "--reward-addr", reward_server.address,
        "--only-after-new-reward", "--log-level", "WARNING",
    ]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == {"skipped": True, "reason": why}
    assert len(registry.list_versions()) == 2  # nothing trained, nothing published
