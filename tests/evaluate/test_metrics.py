"""Metrics against HF's own loss, hand computations and invariances (batching, padding)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from compress.core.errors import CompressError
from compress.evaluate.metrics import (
    compare_embeddings,
    compare_lm,
    mean_pooled_embeddings,
    perplexity,
    spearman,
)

VOCAB = 97


def _perturbed(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3))
    return noisy


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


class TableLM(nn.Module):
    """Stub causal LM: the logits at each position are a fixed row chosen by the input token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_perplexity_matches_hf_loss(llama, windows):
    with torch.inference_mode():
        hf_loss = llama(input_ids=windows, labels=windows).loss.item()
    scores = perplexity(llama, windows, batch_size=4)
    assert scores.tokens == 6 * 15
    assert scores.ppl == pytest.approx(math.exp(hf_loss), rel=1e-5)
    assert scores.nll == pytest.approx(hf_loss, rel=1e-5)


def test_uniform_logits_give_vocab_size_perplexity(windows):
    stub = TableLM(torch.zeros(VOCAB, VOCAB))
    assert perplexity(stub, windows).ppl == pytest.approx(VOCAB, rel=1e-6)


def test_batching_does_not_change_results(llama, windows):
    noisy = _perturbed(llama, 0.05)
    one, eight = (
        compare_lm(noisy, llama, windows, batch_size=1),
        compare_lm(noisy, llama, windows, batch_size=8),
    )
    for field in ("ppl", "baseline_ppl", "kl", "top1"):
        assert getattr(one, field) == pytest.approx(getattr(eight, field), rel=1e-5)
    assert perplexity(llama, windows, batch_size=1).ppl == pytest.approx(
        perplexity(llama, windows).ppl, rel=1e-6
    )


def test_compare_against_itself_and_a_perturbed_copy(llama, windows):
    calls: list[tuple[str, int, int]] = []
    same = compare_lm(llama, llama, windows, batch_size=4, progress=lambda *a: calls.append(a))
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0 and abs(same.ppl_increase) < 1e-6
    assert calls == [("compare", 4, 6), ("compare", 6, 6)]
    noisy = compare_lm(_perturbed(llama, 0.3), llama, windows)
    assert noisy.kl > 1e-4
    assert noisy.baseline_ppl == pytest.approx(same.baseline_ppl, rel=1e-6)
    assert noisy.ppl_increase == pytest.approx(noisy.ppl / noisy.baseline_ppl - 1)


def test_kl_direction_matches_hand_computation():
    # vocab 3; logits depend only on the input token, so each position's distributions are known.
    base = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 0.5]])
    model = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 0.0], [-3.0, 1.0, 0.5]])
    windows = torch.tensor([[0, 1, 2], [1, 0, 0]])

    def softmax(row: list[float]) -> list[float]:
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    def kl(p: list[float], q: list[float]) -> float:
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    positions = [0, 1, 1, 0]  # input tokens at the L-1 scored positions of both windows
    forward = [kl(softmax(base[t].tolist()), softmax(model[t].tolist())) for t in positions]
    reverse = [kl(softmax(model[t].tolist()), softmax(base[t].tolist())) for t in positions]
    expected, wrong = sum(forward) / 4, sum(reverse) / 4
    assert abs(expected - wrong) > 0.1  # the toy really tells the two directions apart

    scores = compare_lm(TableLM(model), TableLM(base), windows)
    assert scores.kl == pytest.approx(expected, rel=1e-5)
    agree = [base[t].argmax() == model[t].argmax() for t in positions]
    assert scores.top1 == pytest.approx(sum(agree) / 4) and scores.tokens == 4


def test_bad_windows_are_rejected(llama):
    with pytest.raises(CompressError):
        perplexity(llama, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(CompressError):
        perplexity(llama, torch.zeros(2, 8))


# -- encoders -------------------------------------------------------------------------------------

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree river sky sun moon".split()
TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "the red sun",
    "a big blue river ran slow under the sky",
    "the small tree",
    "moon and sun over the house",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_identical_encoder_scores_one(bert, tokenizer):
    scores = compare_embeddings(bert, bert, tokenizer, TEXTS, batch_size=4)
    assert scores.cosine == pytest.approx(1.0, abs=1e-6) and scores.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert scores.spearman == pytest.approx(1.0) and scores.texts == len(TEXTS)


def test_noisy_encoder_scores_lower(bert, tokenizer):
    scores = compare_embeddings(_perturbed(bert, 0.3), bert, tokenizer, TEXTS)
    assert scores.cosine < 0.99 and scores.cosine_min <= scores.cosine
    assert scores.spearman < 0.99


def test_embeddings_are_normalised_and_padding_invariant(bert, tokenizer):
    long, short = TEXTS[3], TEXTS[2]
    assert len(tokenizer(long)["input_ids"]) > len(tokenizer(short)["input_ids"])
    together = mean_pooled_embeddings(bert, tokenizer, [long, short])
    alone = mean_pooled_embeddings(bert, tokenizer, [short])
    assert together.norm(dim=-1) == pytest.approx(torch.ones(2), abs=1e-6)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)


def test_spearman_averages_ties():
    a = torch.tensor([3.0, 1.0, 3.0, 2.0])  # ranks 3.5, 1, 3.5, 2
    assert spearman(a, torch.tensor([3.5, 1.0, 3.5, 2.0])) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(0.5)


def test_too_few_texts_is_bad_input(bert, tokenizer):
    with pytest.raises(CompressError):
        compare_embeddings(bert, bert, tokenizer, TEXTS[:2])
