"""Policy objectives on literal values, the completion-only log-probs against a manual
computation, prompt/completion tokenization, and DPO learning a toy preference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plaudit.trainer.policy import train_policy
from plaudit.trainer.policy_config import DPOConfig
from plaudit.trainer.policy_data import PolicyTokenizer, TokenRow, collate_rows
from plaudit.trainer.policy_objective import (
    adaptive_kl_coef,
    aggregate_token_losses,
    best_of_n,
    clipped_surrogate,
    clipped_value_loss,
    dpo_loss,
    dpo_metrics,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalized_rewards,
    per_token_rewards,
    policy_gradient_loss,
    ppo_loss,
    rloo_advantages,
    sequence_logprobs,
    sft_loss,
    whiten,
    win_rate,
)
from plaudit.trainer.policy_sampling import (
    SamplingParams,
    completion_token_logprobs,
    forward_logprobs,
    generate_rows,
)
from plaudit.trainer.reward import PairSource
from tests.conftest import toy_pairs, write_jsonl


# -- DPO ----------------------------------------------------------------------------------------
def test_dpo_loss_is_log_2_when_the_policy_is_the_reference() -> None:
    logps = torch.tensor([-12.0, -3.5, -40.0])
    other = torch.tensor([-7.0, -9.0, -1.0])
    loss, chosen, rejected = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)
    metrics = dpo_metrics(chosen.numpy(), rejected.numpy())
    assert metrics == {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,  # all ties
        "rewards/margins": 0.0,
    }


def test_dpo_gradients_on_literal_log_probs() -> None:
    pi_c = torch.tensor([-3.0], requires_grad=True)
    pi_r = torch.tensor([-5.0], requires_grad=True)
    ref_c, ref_r, beta = torch.tensor([-4.0]), torch.tensor([-4.0]), 0.5
    loss, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    # h_c - h_r = (1) - (-1) = 2, so the logit is beta * 2 = 1
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-1.0)))
    assert float(chosen[0]) == pytest.approx(0.5) and float(rejected[0]) == pytest.approx(-0.5)
    loss.backward()
    sigmoid_neg = 1.0 / (1.0 + math.e)  # sigmoid(-1)
    assert pi_c.grad is not None and pi_r.grad is not None
    # descending the loss raises the chosen log-prob and lowers the rejected one
    assert float(pi_c.grad[0]) == pytest.approx(-beta * sigmoid_neg)
    assert float(pi_r.grad[0]) == pytest.approx(beta * sigmoid_neg)


def test_dpo_weights_scale_each_pair() -> None:
    pi, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])
    unweighted, _, _ = dpo_loss(pi, ref, ref, pi, beta=1.0)
    weighted, _, _ = dpo_loss(pi, ref, ref, pi, beta=1.0, weight=torch.tensor([1.0, 0.0]))
    first, _, _ = dpo_loss(pi[:1], ref[:1], ref[:1], pi[:1], beta=1.0)
    assert float(weighted) == pytest.approx(float(first) / 2)
    assert float(unweighted) > float(weighted)


# -- RLOO, KL, REINFORCE ------------------------------------------------------------------------
def test_rloo_advantages_on_literal_values_sum_to_zero() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = rloo_advantages(rewards)
    # sample i's baseline is the mean of the other three
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [0.0] * 4])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(advantages.sum(-1), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0]]))


def test_kl_penalty_and_policy_gradient() -> None:
    scores = torch.tensor([1.0, 2.0, 0.0])
    pi = torch.tensor([-3.0, -2.0, -1.0])
    ref = torch.tensor([-4.0, -2.0, -0.5])
    rewards = kl_penalized_rewards(scores, pi, ref, kl_coef=0.1)
    # score - 0.1 * (log pi - log ref): +1 nat above the reference costs 0.1
    assert torch.allclose(rewards, torch.tensor([0.9, 2.0, 0.05]))
    logp = torch.tensor([-2.0, -3.0], requires_grad=True)
    advantages = torch.tensor([1.5, -0.5])
    loss = policy_gradient_loss(logp, advantages)
    assert float(loss.detach()) == pytest.approx(-(1.5 * -2.0 + -0.5 * -3.0) / 2)
    loss.backward()
    assert logp.grad is not None
    assert torch.allclose(logp.grad, -advantages / 2)  # raise what beat its baseline


# -- GRPO ---------------------------------------------------------------------------------------
def test_group_advantages_on_literal_values() -> None:
    rewards = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    # group 1: mean 1, sample std 1; group 2: all equal, so no signal
    expected = torch.tensor([[-1 / 1.0001, 0.0, 1 / 1.0001], [0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards), expected)
    centred = torch.tensor([[-10.0, 0.0, 10.0], [0.0, 0.0, 0.0]])  # Dr. GRPO: no std
    assert torch.allclose(group_advantages(rewards * 10, scale=False), centred)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0]]))


def test_k3_kl_on_literal_values() -> None:
    logp = torch.tensor([-1.0, -1.0, -2.0])
    ref = torch.tensor([-1.0, -2.0, -1.0])
    # exp(d) - d - 1 with d = ref - logp = 0, -1, 1
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.0, math.exp(-1), math.e - 2]))


def test_clipped_surrogate_takes_the_pessimistic_term() -> None:
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, advantages, clip_eps=0.2)
    # -min(rho A, clip(rho, 0.8, 1.2) A)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_loss_aggregations_on_literal_values() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(aggregate_token_losses(losses, mask, "sequence-mean")) == pytest.approx(3.0)
    assert float(aggregate_token_losses(losses, mask, "token-mean")) == pytest.approx(2.5)
    constant = aggregate_token_losses(losses, mask, "token-sum-constant", constant=4.0)
    assert float(constant) == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError):
        aggregate_token_losses(losses, mask, "median")


def test_grpo_loss_and_gradient_at_the_sampling_policy() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    ref = logp.detach() - 1.0  # every token: ref - logp = -1, so k3 = exp(-1)
    advantages = torch.tensor([1.0, -1.0])
    loss, numbers = grpo_loss(logp, logp.detach(), ref, advantages, mask, clip_eps=0.2, kl_coef=0.5)
    # ratio 1: per token -A + 0.5 * exp(-1); sequence means, then their mean
    k3 = math.exp(-1)
    assert float(loss.detach()) == pytest.approx(((-1 + 0.5 * k3) + (1 + 0.5 * k3)) / 2)
    assert numbers == {"rl/clip_fraction": 0.0, "rl/k3_kl": pytest.approx(k3)}
    loss.backward()
    assert logp.grad is not None
    # d/dlogp: (-A + 0.5 * (1 - exp(ref - logp))) / tokens of the sequence / sequences
    kl_grad = 0.5 * (1 - k3)
    expected = torch.tensor([[(-1 + kl_grad) / 4] * 2, [(1 + kl_grad) / 2, 0.0]])
    assert torch.allclose(logp.grad, expected)


# -- PPO ----------------------------------------------------------------------------------------
def test_per_token_rewards_put_the_score_on_the_last_token() -> None:
    scores = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) = [[-0.05, 0, 0.1], [0, -0.1, (padding)]], then + score at the end
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]]))


def test_gae_over_three_tokens_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])  # 9: padding, never read
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    # row 1: deltas 0, 1 (the value after the last token is 0); A1 = 1, A0 = 0.95
    expected = torch.tensor([[0.46575, 0.385, 0.3], [0.95, 1.0, 0.0]])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, torch.tensor([[0.96575, 0.985, 1.0], [1.95, 2.0, 0.0]]))
    discounted, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.95)
    # deltas 0.9 * 0.6 - 0.5 = 0.04, 0.9 * 0.7 - 0.6 = 0.03, 0.3; gamma * lam = 0.855
    a1 = 0.03 + 0.855 * 0.3
    assert torch.allclose(discounted, torch.tensor([[0.04 + 0.855 * a1, a1, 0.3]]))


def test_whiten_over_the_masked_entries() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    z = 1 / math.sqrt(2 / 3 + 1e-8)  # mean 2, population variance 2/3
    assert torch.allclose(whiten(x, mask), torch.tensor([[-z, 0.0], [z, 0.0]]))
    assert torch.allclose(whiten(x, mask, shift_mean=False), torch.tensor([[2 - z, 2], [2 + z, 0]]))


def test_clipped_value_loss_and_ppo_loss_on_literal_values() -> None:
    values = torch.tensor([[1.5, 0.9]])
    old_values = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[2.0, 0.5]])
    mask = torch.tensor([[True, True]])
    loss, numbers = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    # token 0: clipped value 1.2, max(0.25, 0.64); token 1: within the clip, 0.16
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.16) / 2)
    assert numbers == {"rl/value_clip_fraction": 0.5}
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    total, parts = ppo_loss(
        logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), values, old_values, returns,
        mask, clip_eps=0.2, cliprange_value=0.2, vf_coef=0.1,
    )  # fmt: skip
    # policy: token means of -1.2 (clipped) and 0.8 (clipped)
    assert parts["rl/policy_loss"] == pytest.approx(-0.2)
    assert parts["rl/clip_fraction"] == 1.0
    assert float(total) == pytest.approx(-0.2 + 0.1 * 0.2)


def test_adaptive_kl_coefficient() -> None:
    # Ziegler et al.: error clipped to +-0.2, scaled by samples / horizon
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, samples=100) == pytest.approx(
        0.1 * (1 + 0.2 * 0.01)
    )
    assert adaptive_kl_coef(0.1, kl=5.4, target=6.0, horizon=10000, samples=100) == pytest.approx(
        0.1 * (1 - 0.1 * 0.01)
    )


def test_best_of_n_and_win_rate() -> None:
    assert best_of_n([0.1, 2.5, -1.0, 2.0]) == 1
    assert best_of_n(np.array([3.0, 3.0, 1.0])) == 0  # a tie goes to the first
    with pytest.raises(ValueError):
        best_of_n([])
    assert win_rate(np.array([1.0, 0.0, 2.0, 5.0]), np.array([0.0, 1.0, 2.0, 4.0])) == 0.625


# -- log-probs of completion tokens -------------------------------------------------------------
def test_sequence_logprobs_mask_prompt_and_padding() -> None:
    torch.manual_seed(0)
    rows = [TokenRow((5, 6, 7), (8, 9)), TokenRow((1,), (2, 3, 4, 5))]
    batch = collate_rows(rows, pad_id=0)
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    logits = torch.randn(2, 5, 11)
    got = sequence_logprobs(logits, batch.input_ids, batch.completion_mask)
    manual = []
    for b, row in enumerate(rows):
        logp = torch.log_softmax(logits[b], -1)
        start = len(row.prompt)
        manual.append(
            sum(float(logp[t - 1, batch.input_ids[b, t]]) for t in range(start, len(row)))
        )
    assert got.tolist() == pytest.approx(manual, abs=1e-5)
    # the padded position's logits do not matter
    logits[0, 4:] = 1e3
    assert sequence_logprobs(logits, batch.input_ids, batch.completion_mask).tolist() == (
        pytest.approx(manual, abs=1e-5)
    )
    # sft: the mean over all six completion tokens
    tokens, _ = completion_token_logprobs(_FullLogits(logits), batch)
    assert float(sft_loss(tokens)) == pytest.approx(-sum(manual) / 6, abs=1e-5)


class _FullLogits(torch.nn.Module):
    """A 'model' that returns fixed logits (no decoder), so the full-logits path is taken."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.config = type("Config", (), {})()

    def forward(self, **_: object) -> object:
        return type("Out", (), {"logits": self.logits})()


def test_collate_left_padding_keeps_positions() -> None:
    rows = [TokenRow((5, 6), (7,)), TokenRow((1,), ())]
    right, left = collate_rows(rows, 0), collate_rows(rows, 0, left=True)
    assert right.position_ids.tolist()[1][:1] == [0]
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 1]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert left.completion_mask.tolist() == [[0, 0, 1], [0, 0, 0]]


@pytest.fixture(scope="module")
def tiny(tiny_policy_checkpoint: Path) -> tuple[Any, PolicyTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_checkpoint)
    return model, PolicyTokenizer(tokenizer, model, max_length=48, max_prompt_length=24)


def test_fast_logprobs_match_full_logits_and_ignore_padding(
    tiny: tuple[Any, PolicyTokenizer],
) -> None:
    model, tokens = tiny
    rows = tokens.rows(
        ["What is two plus two?", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"],
        ["Four.", "Goodbye, and have a nice day."],
    )
    with torch.no_grad():
        fast = forward_logprobs(model, rows, tokens.pad_id, torch.device("cpu"))
        batch = collate_rows(rows, tokens.pad_id)
        logits = model(**batch.model_inputs()).logits
        full = sequence_logprobs(logits, batch.input_ids, batch.completion_mask)
        alone = [forward_logprobs(model, [r], tokens.pad_id, torch.device("cpu")) for r in rows]
    assert fast.tolist() == pytest.approx(full.tolist(), abs=1e-4)
    assert fast.tolist() == pytest.approx([float(a[0]) for a in alone], abs=1e-4)


def test_sampled_tokens_score_as_generation_scored_them(
    tiny: tuple[Any, PolicyTokenizer],
) -> None:
    """Samples from a left-padded batch get the log-probs the sampler used (positions right)."""
    model, tokens = tiny
    prompts = ["Hi", "Tell me a long story about a dragon and a castle, please."]
    torch.manual_seed(3)
    rows = generate_rows(
        model, tokens, prompts, SamplingParams(max_new_tokens=6), torch.device("cpu")
    )
    assert [r.prompt for r in rows] == [tokens.prompt_ids(p) for p in prompts]
    batch = collate_rows([TokenRow(r.prompt, ()) for r in rows], tokens.pad_id, left=True)
    torch.manual_seed(3)
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=6,
        pad_token_id=tokens.pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for i, row in enumerate(rows):
        expected = sum(
            float(torch.log_softmax(out.scores[t][i], -1)[tok])
            for t, tok in enumerate(row.completion)
        )
        with torch.no_grad():
            got = forward_logprobs(model, [row], tokens.pad_id, torch.device("cpu"))
        assert float(got[0]) == pytest.approx(expected, abs=1e-3)


def test_prompts_use_the_chat_template_and_keep_their_end(
    tiny: tuple[Any, PolicyTokenizer], tiny_policy_checkpoint: Path
) -> None:
    _, tokens = tiny
    hf = AutoTokenizer.from_pretrained(tiny_policy_checkpoint)
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = hf(rendered, add_special_tokens=False)["input_ids"]
    assert len(full) > tokens.max_prompt_length
    assert list(tokens.prompt_ids(prompt)) == full[-tokens.max_prompt_length :]  # end kept
    row = tokens.rows([prompt], ["Goodbye! " * 20])[0]
    assert len(row) == tokens.max_length  # the completion's end is cut
    assert tokens.rows(["Hi"], ["Bye"])[0].completion[-1] == hf.eos_token_id
    words = hf("Good night", add_special_tokens=False)["input_ids"]
    generated = tokens.generated((1, 2), [*words, hf.eos_token_id, hf.eos_token_id, 7])
    assert generated.completion == (*words, hf.eos_token_id)  # cut after the first EOS
    assert tokens.decode(generated.completion) == "Good night"


# -- DPO learns a toy preference ----------------------------------------------------------------
def test_dpo_loss_falls_and_held_out_accuracy_rises(
    tiny_policy_checkpoint: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(64))
    cfg = DPOConfig(
        base=str(tiny_policy_checkpoint),
        max_length=40,
        max_prompt_length=24,
        batch_size=8,
        learning_rate=5e-3,
        beta=0.5,
        epochs=2,
        eval_fraction=0.2,
        eval_prompts=2,
        eval_max_new_tokens=2,
    )
    result = train_policy(cfg, PairSource(files=(data,)), output_dir=tmp_path / "run")
    m = result.metrics
    assert m["eval/initial_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert m["eval/initial_accuracy"] == 0.5
    assert m["eval/loss"] < m["eval/initial_loss"] - 0.1
    assert m["eval/accuracy"] >= 0.75
    assert m["rewards/margins"] > 0 and m["rewards/chosen"] > m["rewards/rejected"]
    assert m["eval/kl"] > 0  # it moved away from the reference
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert result.manifest is None and not result.promotion["promoted"]
    assert (tmp_path / "run" / "training.png").is_file()
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file()
