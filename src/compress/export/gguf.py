"""``compress export --format gguf``: one of our pack-quantized checkpoints written as a llama.cpp GGUF file.

The integer codes are copied into llama.cpp's block types, never re-quantized. A block type is used only
where it holds our scheme exactly (blocks of 32 weights along the input dimension, one fp16 scale each):

- symmetric int4, group 32 → ``Q4_0``: ``x = d * (u - 8)``, ``u`` in 0..15. Our codes ``q`` in [-8, 7]
  dequantize as ``q * scale``, so ``u = q + 8`` and ``d = scale``;
- asymmetric int4, group 32 → ``Q4_1``: ``x = d * u + m``. Ours is ``(q - zp) * scale``, so ``u = q + 8``,
  ``d = scale`` and ``m = -scale * (zp + 8)``;
- symmetric int8, group 32 → ``Q8_0``: ``x = d * q``, ``q`` the int8 code itself.

``d`` and ``m`` are fp16 in GGUF. A float16 checkpoint's scales are copied bit for bit (Q4_0 and Q8_0 are then
exact); float32 or bfloat16 scales, and ``m`` (a product that fp16 rarely holds exactly), are rounded to
nearest fp16. Every layer is checked against the bound of that rounding, element-wise:
``|x_gguf - x_ours| <= 2^-11 * (|d * k| + |m|) + 2^-24 * |k|`` (``k`` the code multiplier), which fp16 rounding
within its range always meets; a scale that overflows fp16, or any larger difference, is refused. The summary
says the largest difference measured, absolute and in quantization steps.

Every other scheme or grouping (group 128, per channel, 2/3 bits, asymmetric 8-bit, a non-trivial activation
order) is refused in one sentence, as are checkpoints llama.cpp's ``llama`` architecture would run
differently (a family other than llama/mistral, biases, RoPE scaling, a low-rank adapter). Dense tensors are
F32 (F16 when the checkpoint stores them in fp16; 1-D tensors always F32). The q and k projections get
llama.cpp's row permutation (HF's half-split RoPE layout to its interleaved one), applied to codes, scales and
zero points alike: it permutes output rows, so every group stays whole.

The tokenizer goes in as llama.cpp's ``gpt2`` (byte-level BPE) model with GPT-2 pre-tokenization: tokens,
token types, merges, special ids. Other tokenizers are refused.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.codecs import layer_plan
from compress.codecs.pack_quantized import PACK_QUANTIZED
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.export.adapter import ADAPTER_CONFIG, ADAPTER_DIR
from compress.export.convert import checkpoint_format
from compress.export.load import read_json, read_tensors, weight_files

BLOCK = 32
FAMILIES = ("llama", "mistral")
EXPRESSIBLE = ("GGUF export maps symmetric int4, asymmetric int4 and symmetric int8 weights in groups of 32 "
               "(Q4_0, Q4_1, Q8_0)")
_U = 2.0 ** -11  # unit roundoff of fp16 (round to nearest)


def require_gguf():
    """The ``gguf`` module (the ``gguf`` extra); CompressError naming the install command when it is missing."""
    try:
        import gguf
    except ImportError:
        raise CompressError("GGUF export needs the gguf package: pip install 'compress-toolkit[gguf]'") from None
    return gguf


def block_type(scheme: QuantScheme, in_features: int) -> str:
    """``Q4_0``, ``Q4_1`` or ``Q8_0`` for a scheme that maps exactly; CompressError (one sentence) otherwise."""
    w = scheme.weights
    if w is None or w.type != "int" or scheme.input_activations is not None:
        raise CompressError(f"scheme {scheme.tag} has no GGUF block type: {EXPRESSIBLE}, weight-only")
    if w.strategy != "group" or w.group_size != BLOCK:
        grouping = "per channel" if w.strategy == "channel" else f"{w.strategy} {w.group_size or ''}".strip()
        raise CompressError(f"scheme {scheme.tag} ({grouping}) has no GGUF block type: {EXPRESSIBLE}")
    if in_features % BLOCK:
        raise CompressError(f"a layer with {in_features} inputs does not fill whole blocks of {BLOCK}; "
                            f"{EXPRESSIBLE}")
    key = (scheme.bits, scheme.symmetric)
    found = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}.get(key)
    if found is None:
        kind = "symmetric" if scheme.symmetric else "asymmetric"
        raise CompressError(f"scheme {scheme.tag} ({kind} {scheme.bits}-bit) has no GGUF block type: {EXPRESSIBLE}")
    return found


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp gives a q (``n_head`` heads) or k (kv heads) projection: ``new[i] = old[perm[i]]``
    (each head's two halves interleaved, as its non-NeoX RoPE expects)."""
    if rows % (2 * n_head):
        raise CompressError(f"a projection of {rows} rows cannot be split into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  kind: str) -> tuple[np.ndarray, dict[str, float]]:
    """The GGUF bytes ``[out, groups * block bytes]`` of one layer's codes, and the rounding measured.

    ``codes`` int8 ``[out, in]`` (signed, ours), ``scale`` ``[out, groups]`` as stored, ``zero_point`` int32
    ``[out, groups]`` (Q4_1 only). Raises CompressError when fp16 cannot hold the scales within its rounding."""
    out_f, in_f = codes.shape
    groups = in_f // BLOCK
    s = scale.double()
    d16 = scale.to(torch.float16)
    q = codes.to(torch.int32).reshape(out_f, groups, BLOCK)
    ours = q.double() * s[..., None]  # what compress.load reconstructs (exact in double)
    if kind == "Q4_1":
        assert zero_point is not None
        m_true = -s * (zero_point.double() + 8)
        m16 = m_true.to(torch.float16)
        u = (q + 8)
        ours = (q - zero_point[..., None]).double() * s[..., None]
        theirs = d16.double()[..., None] * u + m16.double()[..., None]
        k = u.double()
        bound = _U * ((s[..., None] * k).abs() + m_true.abs()[..., None]) + 2.0 ** -24 * k
        m_change = _relative(m16.double(), m_true)
    else:
        theirs = d16.double()[..., None] * q
        k = q.double().abs()
        bound = _U * (s[..., None] * k).abs() + 2.0 ** -24 * k
        m_change = 0.0
    error = (theirs - ours).abs()
    if not bool(torch.isfinite(d16).all()) or bool((error > bound * (1 + 1e-9)).any()):
        raise CompressError("a scale is outside what fp16 holds (GGUF block scales are fp16), so this layer "
                            "cannot be written within fp16 rounding")
    steps = float((error / s[..., None].abs().clamp_min(1e-300)).max()) if error.numel() else 0.0
    stats = {"max_abs_error": float(error.max()) if error.numel() else 0.0, "max_error_steps": steps,
             "scale_relative_change": _relative(d16.double(), s), "m_relative_change": m_change}
    d_bytes = d16.contiguous().numpy().view(np.uint8).reshape(out_f, groups, 2)
    if kind == "Q8_0":
        body = q.to(torch.int8).numpy().view(np.uint8)
        parts = [d_bytes, body]
    else:
        u8 = (q + 8).to(torch.uint8).numpy()
        nibbles = u8[..., : BLOCK // 2] | (u8[..., BLOCK // 2:] << 4)  # byte j: element j low, j + 16 high
        parts = [d_bytes, *([m16.contiguous().numpy().view(np.uint8).reshape(out_f, groups, 2)]
                            if kind == "Q4_1" else []), nibbles]
    data = np.concatenate(parts, axis=-1).reshape(out_f, -1)
    return np.ascontiguousarray(data), stats


def _relative(after: torch.Tensor, before: torch.Tensor) -> float:
    nonzero = before != 0
    if not bool(nonzero.any()):
        return 0.0
    return float(((after - before).abs()[nonzero] / before.abs()[nonzero]).max())


# ---- checkpoint facts ---------------------------------------------------------------------------------------
def _hparams(config: dict[str, Any], source: Path) -> dict[str, Any]:
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CompressError(f"GGUF export supports llama-family models ({', '.join(FAMILIES)}); {source} is a "
                            f"{family} model")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CompressError("GGUF export of llama models with attention or MLP biases is not supported")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = (rope.get("rope_type") if isinstance(rope, dict) else None) or \
        (scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None) or "default"
    if rope_type != "default":
        raise CompressError(f"GGUF export supports default RoPE only; this model uses {rope_type} RoPE scaling")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or config.get("rope_theta") or 10000.0
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        hp = {
            "context_length": int(config["max_position_embeddings"]),
            "embedding_length": hidden,
            "block_count": int(config["num_hidden_layers"]),
            "feed_forward_length": int(config["intermediate_size"]),
            "head_count": heads,
            "head_count_kv": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "rms_eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(theta),
            "vocab_size": int(config["vocab_size"]),
            "tied": bool(config.get("tie_word_embeddings", False)),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise CompressError(f"config.json in {source} lacks a llama hyperparameter ({error})") from None
    window = config.get("sliding_window")
    if window is not None and int(window) < hp["context_length"]:
        raise CompressError(f"this model attends within a sliding window of {window} tokens, which the GGUF "
                            "llama architecture does not express")
    return hp


def _tokenizer(source: Path, config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """llama.cpp's ``gpt2`` tokenizer fields from ``tokenizer.json`` (byte-level BPE, GPT-2 pre-tokenizer)."""
    data = read_json(source / "tokenizer.json", "tokenizer")
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    byte_level = (model.get("type") == "BPE" and not model.get("byte_fallback") and data.get("normalizer") is None
                  and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space", False))
    if not byte_level:
        raise CompressError("GGUF export supports byte-level BPE tokenizers with GPT-2 pre-tokenization only; "
                            f"{source / 'tokenizer.json'} is another kind")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special: set[int] = set()
    added: set[int] = set()
    for token in data.get("added_tokens") or []:
        vocab[token["content"]] = int(token["id"])
        (special if token.get("special") else added).add(int(token["id"]))
    largest = max(vocab.values(), default=-1)
    if largest >= vocab_size:
        raise CompressError(f"the tokenizer has token id {largest} but the model embeds {vocab_size} tokens; "
                            "GGUF needs one embedding row per token")
    size = vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = 3 if index in special else 4 if index in added else 1  # CONTROL, USER_DEFINED, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    try:
        tok_config = read_json(source / "tokenizer_config.json", "tokenizer config")
    except CompressError:
        tok_config = {}
    ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):  # the tokenizer's named token first, config.json's id if none
        name = tok_config.get(f"{key}_token")
        name = name.get("content") if isinstance(name, dict) else name
        value = vocab.get(name) if isinstance(name, str) else None
        if value is None:
            value = config.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < size:
            ids[key] = value
    post = data.get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if single else None
    add_bos = tok_config.get("add_bos_token", first is not None and vocab.get(first) == ids.get("bos"))
    add_eos = tok_config.get("add_eos_token", last is not None and vocab.get(last) == ids.get("eos"))
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "add_bos": bool(add_bos),
            "add_eos": bool(add_eos), "chat_template": tok_config.get("chat_template")}


# ---- the writer -------------------------------------------------------------------------------------------
def export_gguf(source: Path, output: Path) -> dict[str, Any]:
    """Write ``source`` (a pack-quantized llama checkpoint) as the GGUF file ``output`` (a path that must not
    exist yet; the CLI gives a temporary sibling and renames it); returns a summary for the CLI."""
    gguf = require_gguf()
    if not source.is_dir():
        raise CompressError(f"checkpoint {source} does not exist or is not a folder")
    config = read_json(source / "config.json", "config")
    quant = config.get("quantization_config")
    if quant is None:
        raise CompressError(f"{source} is not a quantized checkpoint (config.json has no quantization_config)")
    if checkpoint_format(quant) != "compressed-tensors":
        raise CompressError(f"{source} is in the GPTQ layout; GGUF export reads compressed-tensors checkpoints "
                            "(compress convert --to compressed-tensors first)")
    if (source / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise CompressError(f"{source} has low-rank compensation factors ({ADAPTER_DIR}/), which GGUF cannot "
                            "carry; export a checkpoint quantized without --lowrank-compensate")
    hp = _hparams(config, source)
    tokenizer = _tokenizer(source, config, hp["vocab_size"])
    tensors, origin = read_tensors(weight_files(source))
    plan = layer_plan(tensors, quant, source=str(source))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["block_count"])

    # every tensor is converted before the file is opened, so a refusal writes nothing
    written: list[tuple[str, np.ndarray, Any]] = []
    stats = {"max_abs_error": 0.0, "max_error_steps": 0.0, "scale_relative_change": 0.0, "m_relative_change": 0.0}
    scale_dtypes: set[str] = set()
    handled: set[str] = set()
    for layer in plan:
        file = origin.get(f"{layer.name}.{layer.codec.marker}", "?")
        target = _target_name(names, f"{layer.name}.weight")
        if not layer.codec.quantized:  # dense values (sparsity layouts): the weight they decode to
            weight = layer.codec.decode(layer.name, tensors, None)
            written.append((target, *_dense(_permuted(weight, layer.name, hp), 2)))
        else:
            if layer.codec is not PACK_QUANTIZED:
                raise CompressError(f"layer {layer.name} is stored as {layer.codec.name}; {EXPRESSIBLE}, from "
                                    "pack-quantized layers")
            try:
                stored = PACK_QUANTIZED.read(layer.name, tensors, layer.scheme)
            except CompressError as error:
                raise CompressError(f"{str(error).rstrip('.')} (in {file})") from None
            kind = block_type(layer.scheme, stored.in_features)
            _check_order(layer.name, stored, layer.scheme)
            codes, _, zp = stored.unpack()
            scale = stored.weight_scale
            scale_dtypes.add(str(scale.dtype).removeprefix("torch."))
            perm = _permutation(layer.name, stored.out_features, hp)
            if perm is not None:
                codes, scale, zp = codes[perm], scale[perm], zp[perm]
            try:
                data, measured = encode_blocks(codes, scale, None if layer.scheme.symmetric else zp, kind)
            except CompressError as error:
                raise CompressError(f"layer {layer.name}: {error}") from None
            for key, value in measured.items():
                stats[key] = max(stats[key], value)
            written.append((target, data, getattr(gguf.GGMLQuantizationType, kind)))
        handled.update(layer.codec.parts(layer.name, tensors))
        if f"{layer.name}.bias" in tensors:
            raise CompressError(f"layer {layer.name} has a bias, which the GGUF llama architecture does not take")
    for name in sorted(set(tensors) - handled):
        if hp["tied"] and name == "lm_head.weight":
            continue  # llama.cpp reads the tied head from token_embd
        tensor = tensors[name]
        if not tensor.dtype.is_floating_point:
            raise CompressError(f"tensor {name} in {origin.get(name, '?')} is not a weight GGUF export knows")
        written.append((_target_name(names, name), *_dense(_permuted(tensor, name.removesuffix(".weight"), hp),
                                                           tensor.ndim)))
    types = Counter(kind.name for _, _, kind in written)

    writer = gguf.GGUFWriter(str(output), "llama")
    writer.add_name(source.name)
    quant_counts = Counter({k: v for k, v in types.items() if k.startswith("Q")})
    main = quant_counts.most_common(1)[0][0] if quant_counts else "F32"
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{main}", gguf.LlamaFileType.ALL_F32)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_vocab_size(len(tokenizer["tokens"]))
    if hp["head_dim"] * hp["head_count"] != hp["embedding_length"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    writer.add_token_merges(tokenizer["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if key in tokenizer["ids"]:
            add(tokenizer["ids"][key])
    writer.add_add_bos_token(tokenizer["add_bos"])
    writer.add_add_eos_token(tokenizer["add_eos"])
    if isinstance(tokenizer["chat_template"], str):
        writer.add_chat_template(tokenizer["chat_template"])
    for name, data, kind in written:
        writer.add_tensor(name, data, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    exact = stats["max_abs_error"] == 0.0
    return {"source": str(source), "format": "gguf", "architecture": "llama", "tensors": len(written),
            "types": dict(sorted(types.items())), "bytes": os.path.getsize(output),
            "checkpoint_bytes": sum(os.path.getsize(f) for f in weight_files(source)),
            "scales": {"from": "/".join(sorted(scale_dtypes)) or None, "to": "float16", "exact": exact,
                       **stats}}


def _target_name(names: Any, name: str) -> str:
    target = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if target is None:
        raise CompressError(f"tensor {name} has no place in the GGUF llama architecture")
    return target


def _permutation(layer: str, rows: int, hp: dict[str, Any]) -> torch.Tensor | None:
    if layer.endswith("self_attn.q_proj"):
        return qk_permutation(rows, hp["head_count"])
    if layer.endswith("self_attn.k_proj"):
        return qk_permutation(rows, hp["head_count_kv"])
    return None


def _permuted(weight: torch.Tensor, layer: str, hp: dict[str, Any]) -> torch.Tensor:
    perm = _permutation(layer, weight.shape[0], hp) if weight.ndim == 2 else None
    return weight if perm is None else weight[perm]


def _dense(tensor: torch.Tensor, ndim: int) -> tuple[np.ndarray, Any]:
    """F16 for 2-D fp16 tensors, F32 for everything else (bf16 and fp32 widen exactly; norms stay F32)."""
    gguf = require_gguf()
    if tensor.dtype == torch.float16 and ndim >= 2:
        return tensor.contiguous().numpy(), gguf.GGMLQuantizationType.F16
    return tensor.float().contiguous().numpy(), gguf.GGMLQuantizationType.F32


def _check_order(name: str, stored: Any, scheme: QuantScheme) -> None:
    """A ``weight_g_idx`` that is not the trivial order (activation ordering) has no GGUF form."""
    g_idx = stored.weight_g_idx
    if g_idx is None:
        return
    trivial = torch.arange(stored.in_features, dtype=torch.int32) // scheme.effective_group_size(stored.in_features)
    if not torch.equal(g_idx.to(torch.int32).cpu(), trivial):
        raise CompressError(f"layer {name} groups its columns in activation order (weight_g_idx), which GGUF "
                            f"blocks of consecutive weights cannot express; {EXPRESSIBLE}, in natural order")

