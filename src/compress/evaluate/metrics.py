"""Quality metrics: perplexity, KL and top-1 agreement against a baseline, embedding similarity.

Pure functions on models and token tensors, so the CLI, the pipeline and the benchmarks all measure the
same thing the same way (BENCHMARKS.md: the same windows for every method, KL(p_base || p_model) beside
perplexity because KL separates methods long before perplexity moves). All math is done in float32 from
the logits (accumulated in float64), whatever dtype the model runs in, so a bf16 model is not penalised
by a bf16 log-softmax. Logits are consumed batch by batch and never held for the whole evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.core.errors import CompressError

Progress = Callable[[str, int, int], None] | None


@dataclass
class LMScores:
    """Perplexity over a set of windows; ``tokens`` is how many next-token predictions were scored."""

    ppl: float
    nll: float
    tokens: int


@dataclass
class ComparisonScores:
    """A compressed causal LM against its baseline on the same windows and positions."""

    ppl: float
    baseline_ppl: float
    ppl_increase: float  # relative: ppl / baseline_ppl - 1
    kl: float  # mean per-token KL(p_baseline || p_model), nats
    top1: float  # fraction of positions whose argmax agrees
    tokens: int


@dataclass
class EmbeddingScores:
    """A compressed encoder against its baseline on mean-pooled sentence embeddings."""

    cosine: float  # mean cosine between the model's and the baseline's embedding of each text
    cosine_min: float
    spearman: float  # rank correlation of the two pairwise-similarity matrices (upper triangle)
    texts: int


def _device(model: nn.Module) -> torch.device:
    """Where the model's inputs must go; a module without parameters (a stub) takes CPU tensors."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_windows(windows: Tensor) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise CompressError(
            f"evaluation windows must be a [windows, length>=2] tensor, got {tuple(windows.shape)}"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise CompressError(f"evaluation windows must hold token ids (integers), got {windows.dtype}")


def _next_token_logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    """float32 log-probabilities at positions 0..L-2, the ones that have a next token to score."""
    out = model(input_ids=ids.to(_device(model)))
    logits = out.logits if hasattr(out, "logits") else out
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll_sum(logp: Tensor, ids: Tensor) -> float:
    targets = ids[:, 1:].to(logp.device).unsqueeze(-1)
    return -logp.gather(-1, targets).double().sum().item()


def _batches(windows: Tensor, batch_size: int) -> list[Tensor]:
    if batch_size < 1:
        raise CompressError(f"batch size must be at least 1, got {batch_size}")
    return list(torch.split(windows.long(), batch_size))


def perplexity(
    model: nn.Module, windows: Tensor, *, batch_size: int = 8, progress: Progress = None
) -> LMScores:
    """exp(mean NLL) over every next-token position of every window (L-1 per window).

    Summing then dividing once (rather than averaging per-batch means) keeps the result independent
    of the batch size, which the tests check.
    """
    _check_windows(windows)
    total, done = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size):
            total += _nll_sum(_next_token_logprobs(model, batch), batch)
            done += batch.shape[0]
            if progress:
                progress("perplexity", done, windows.shape[0])
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    return LMScores(ppl=math.exp(nll), nll=nll, tokens=tokens)


def compare_lm(
    model: nn.Module, baseline: nn.Module, windows: Tensor, *, batch_size: int = 8, progress: Progress = None
) -> ComparisonScores:
    """Perplexity of both models, KL(p_baseline || p_model) and top-1 agreement, in one pass.

    Both models run on each batch in turn so only one batch of logits per model is alive at a time.
    KL and top-1 use the same L-1 positions as perplexity, so ``tokens`` is one number for all of them.
    """
    _check_windows(windows)
    nll_m = nll_b = kl = 0.0
    agree, done = 0, 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size):
            logp_b = _next_token_logprobs(baseline, batch)
            logp_m = _next_token_logprobs(model, batch).to(logp_b.device)
            nll_b += _nll_sum(logp_b, batch)
            nll_m += _nll_sum(logp_m, batch)
            kl += (logp_b.exp() * (logp_b - logp_m)).sum(-1).double().sum().item()
            agree += (logp_b.argmax(-1) == logp_m.argmax(-1)).sum().item()
            del logp_b, logp_m
            done += batch.shape[0]
            if progress:
                progress("compare", done, windows.shape[0])
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    ppl, base = math.exp(nll_m / tokens), math.exp(nll_b / tokens)
    return ComparisonScores(
        ppl=ppl,
        baseline_ppl=base,
        ppl_increase=ppl / base - 1,
        kl=kl / tokens,
        top1=agree / tokens,
        tokens=tokens,
    )


def mean_pooled_embeddings(
    model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 256
) -> Tensor:
    """Attention-mask-weighted mean of ``last_hidden_state``, rows L2-normalised: [len(texts), hidden].

    This is what sentence-transformers does for all-MiniLM-L6-v2, so our cosine is the one its users see.
    Padding positions get zero weight, so a text's embedding does not depend on its batch neighbours.
    """
    if not texts:
        raise CompressError("embedding evaluation needs at least one text")
    rows: list[Tensor] = []
    device = _device(model)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model(**enc)
            hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(F.normalize(pooled, p=2, dim=-1).cpu())
    return torch.cat(rows)


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties given their average rank (scipy.stats.rankdata 'average'), in float64."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    counts = counts.double()
    start = counts.cumsum(0) - counts
    return (start + (counts - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson on average ranks)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    if denom == 0.0:  # a constant side has no ranking; call it agreement only if both are constant
        return 1.0 if ra.norm().item() == rb.norm().item() == 0.0 else 0.0
    return (ra @ rb).item() / denom


def compare_embeddings(
    model: nn.Module, baseline: nn.Module, tokenizer, texts: list[str], **kw
) -> EmbeddingScores:
    """Per-text cosine to the baseline, and whether the model still ranks text pairs the same way.

    Cosine catches drift of each vector; the rank correlation of pairwise similarities catches what
    retrieval users feel (which neighbours come first), and needs at least 3 texts to mean anything.
    ``kw`` goes to :func:`mean_pooled_embeddings` (batch_size, max_length).
    """
    if len(texts) < 3:
        raise CompressError(f"embedding comparison needs at least 3 texts, got {len(texts)}")
    e_m = mean_pooled_embeddings(model, tokenizer, texts, **kw).double()
    e_b = mean_pooled_embeddings(baseline, tokenizer, texts, **kw).double()
    cos = (e_m * e_b).sum(-1)
    iu = torch.triu_indices(len(texts), len(texts), offset=1)
    sim_m = (e_m @ e_m.T)[iu[0], iu[1]]
    sim_b = (e_b @ e_b.T)[iu[0], iu[1]]
    return EmbeddingScores(
        cosine=cos.mean().item(),
        cosine_min=cos.min().item(),
        spearman=spearman(sim_m, sim_b),
        texts=len(texts),
    )
