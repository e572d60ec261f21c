"""Tiny from-config models of every family we claim to support, built offline in milliseconds.

Why from config: tests must never download, and a 2-layer model with random weights exercises the same module
tree (block paths, layer names, Conv1D, attention wiring) as the real checkpoint. Hidden sizes are multiples of
64 so group sizes 32 and 64 divide every in_features. Tokenizers are trained on ``SENTENCES`` with the
``tokenizers`` library (byte-level BPE for decoders, word-level for BERT), so nothing here reads the network or
the embedded assets.

Use through the fixtures in ``tests/conftest.py`` (``tiny_model``, ``tiny_model_dir``, ...) or directly:
``build_model("llama")``, ``save_tiny("gpt2", folder)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB_SIZE = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 256

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to predict the next word",
    "quantization maps weights to a few bits per value",
    "pruning removes weights that matter the least",
    "calibration data shows which inputs the layers see",
    "every block is compressed one at a time on its own inputs",
    "the cat sat on the mat and looked at the dog",
    "numbers like one two three four five six seven eight nine ten",
    "we test what we ship and we ship what we test",
    "hello world this is a tiny corpus for tiny models",
]

FAMILIES = ("llama", "qwen2", "mistral", "opt", "gpt2", "gpt_neox", "phi", "bert")
CAUSAL_FAMILIES = tuple(f for f in FAMILIES if f != "bert")


@dataclass(frozen=True)
class Expected:
    """What ``find_blocks`` / ``select_layers`` must report for a family (``block_path.i.<layer>`` names)."""

    block_path: str
    layers: tuple[str, ...]  # per-block layer names, in named_modules order
    kind: str  # "causal-lm" | "encoder"


_LLAMA_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

EXPECTED: dict[str, Expected] = {
    "llama": Expected("model.layers", _LLAMA_LAYERS, "causal-lm"),
    "qwen2": Expected("model.layers", _LLAMA_LAYERS, "causal-lm"),
    "mistral": Expected("model.layers", _LLAMA_LAYERS, "causal-lm"),
    "opt": Expected(
        "model.decoder.layers",
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
        "causal-lm",
    ),
    "gpt2": Expected("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), "causal-lm"),
    "gpt_neox": Expected(
        "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        "causal-lm",
    ),
    "phi": Expected(
        "model.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
        "causal-lm",
    ),
    "bert": Expected(
        "encoder.layer",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        "encoder",
    ),
}


def tiny_config(family: str) -> PretrainedConfig:
    """A 2-layer, 64-wide config of ``family`` with ``architectures`` set as a saved checkpoint would have."""
    common = {"vocab_size": VOCAB_SIZE, "tie_word_embeddings": False}
    llama_like = {
        **common,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
    }
    if family == "llama":
        cfg, arch = LlamaConfig(**llama_like), "LlamaForCausalLM"
    elif family == "qwen2":
        cfg, arch = Qwen2Config(**llama_like), "Qwen2ForCausalLM"
    elif family == "mistral":
        cfg, arch = MistralConfig(**llama_like, sliding_window=None), "MistralForCausalLM"
    elif family == "opt":
        cfg = OPTConfig(
            **common,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
        arch = "OPTForCausalLM"
    elif family == "gpt2":
        cfg = GPT2Config(
            **common,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            bos_token_id=2,
            eos_token_id=3,
        )
        arch = "GPT2LMHeadModel"
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            **common,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
        arch = "GPTNeoXForCausalLM"
    elif family == "phi":
        cfg = PhiConfig(
            **common,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
        arch = "PhiForCausalLM"
    elif family == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
        arch = "BertModel"
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    cfg.architectures = [arch]
    return cfg


def build_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised tiny model in eval mode; the seed makes weights reproducible across runs."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    auto = AutoModel if EXPECTED[family].kind == "encoder" else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=dtype)
    return model.eval()


def build_tokenizer(kind: str = "causal-lm") -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``SENTENCES``, shaped like the real ones of its kind.

    Causal: byte-level BPE with ``<s> </s>`` (what GPT-2, Llama 3 and Qwen ship; transformers re-reads Qwen2
    tokenizers as byte-level BPE, so a word-level one would silently produce no tokens). Encoder: word-level
    with ``[CLS] [SEP]``. Unknown characters map to the unk token, so any text tokenizes.
    """
    if kind == "encoder":
        specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
        names = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        names["mask_token"] = "[MASK]"
        tok = Tokenizer(models.WordLevel(unk_token=specials[0]))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials)
    else:
        specials = ["<unk>", "<pad>", "<s>", "</s>"]
        names = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        tok = Tokenizer(models.BPE(unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=[])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **names)


def save_tiny(family: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny model (safetensors) and its tokenizer into ``folder``, as a real checkpoint folder looks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(family, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    build_tokenizer(EXPECTED[family].kind).save_pretrained(folder)
    return folder


def write_pickle_only(family: str, folder: Path, *, seed: int = 0) -> Path:
    """A legacy checkpoint folder: config, tokenizer and ``pytorch_model.bin``, no safetensors."""
    folder = Path(folder)
    save_tiny(family, folder, seed=seed)
    model = build_model(family, seed=seed)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


CORPUS_WORDS = "the quick brown fox jumps over the lazy dog and a small model learns the next word".split()


def write_rotated_corpus(path: Path, *, lines: int = 120, shift: int = 9) -> Path:
    """A tiny calibration text: ``lines`` paragraphs, each the word list rotated by ``i % shift``."""
    path.write_text("\n\n".join(" ".join(CORPUS_WORDS[i % shift:] + CORPUS_WORDS[: i % shift])
                                  for i in range(lines)))
    return path
