"""Load a Hugging Face model for compression: local folder, hub id, or the embedded demo model.

Why a wrapper around ``from_pretrained``: every way loading can fail on user input (a typo in a path, a folder
without weights, an unreachable hub, a corrupt file) must become one ``CompressError`` sentence (exit 2), never
a transformers traceback. And two policies live here once: weights come from safetensors only unless the user
passes ``allow_pickle`` (pickle can run code), and GPT-2 style ``Conv1D`` layers become ``nn.Linear`` so passes
only ever meet one layout.

A spec is resolved in this order: ``None`` (or ``"demo"`` when no such local path exists) is the embedded demo
model; an existing local path must be a folder with ``config.json``; something that looks like a path
(``./x``, ``/x``, ``~/x``, ``a/b/c``) but does not exist is an error; anything else is a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from compress.core.errors import CompressError
from compress.models.lazy import LazyWeights
from compress.models.safety import check_checkpoint_folder

__all__ = [
    "DEMO_MODEL_DIR",
    "LoadedModel",
    "instantiate_from_config",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_kind",
    "resolve_model_source",
]

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_NAME = "demo"

Kind = Literal["causal-lm", "encoder"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    """A model ready for a pass: eval mode, Conv1D converted, with the tokenizer calibration needs."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: Kind
    source: str  # resolved local path, or the hub id
    name: str  # "demo" for the embedded model, else the folder / repo basename: names default output folders


def _reason(exc: BaseException) -> str:
    """The first line of an exception, trimmed so the whole message stays one sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rstrip(".")[:200]


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a separator is meant as a local path."""
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.endswith("/")
        or Path(spec).suffix in (".json", ".safetensors", *_PICKLE_SUFFIXES)
    )


def resolve_model_source(spec: str | None) -> str:
    """The absolute folder for a local spec (checked), the demo folder for ``None``, else the hub id as given."""
    if spec is None or (spec == DEMO_NAME and not Path(spec).exists()):
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise CompressError(
                f"the embedded demo model is missing from this installation ({DEMO_MODEL_DIR})"
            )
        return str(DEMO_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CompressError(f"model path '{spec}' is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise CompressError(f"model folder '{spec}' has no config.json")
        return str(path.resolve())
    if _looks_like_path(spec):
        raise CompressError(f"model path '{spec}' does not exist")
    return spec


def _is_local(source: str) -> bool:
    return Path(source).is_dir()


def _hub_error(spec: str, exc: BaseException) -> CompressError:
    """Name the hub failure the user can act on: offline/unreachable, or no such repository."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain).lower()
    if names & {"RepositoryNotFoundError", "GatedRepoError"} or "not a valid model identifier" in text:
        return CompressError(
            f"could not load model '{spec}': no local folder of that name and no accessible model of that "
            "name on the Hugging Face Hub"
        )
    if (
        names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError"}
        or "couldn't connect" in text
        or "offline" in text
    ):
        return CompressError(
            f"could not load model '{spec}': no local folder of that name and the Hugging Face Hub is unreachable"
        )
    return CompressError(f"could not load model '{spec}' from the Hugging Face Hub: {_reason(exc)}")


def _remote_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    """Pass ``trust_remote_code`` only when asked, so transformers' own default and prompts stay in charge."""
    return {"trust_remote_code": True} if trust_remote_code else {}


def load_config(spec: str | None, *, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` without touching weights (``--dry-run``, planning)."""
    source = resolve_model_source(spec)
    shown = spec if spec is not None else DEMO_NAME
    try:
        return AutoConfig.from_pretrained(source, **_remote_kwargs(trust_remote_code))
    except (
        Exception
    ) as exc:  # transformers raises OSError / ValueError / JSON errors for the same user mistakes
        if not _is_local(source):
            raise _hub_error(shown, exc) from exc
        raise CompressError(f"could not read the config of model '{shown}': {_reason(exc)}") from exc


def model_kind(config) -> Kind:
    """``causal-lm`` when the checkpoint is a decoder with an LM head, else ``encoder``.

    ``architectures`` decides when present (``*ForCausalLM`` / ``*LMHeadModel``); otherwise the model type does:
    causal when transformers has a causal-LM class for it and no masked-LM class (BERT has both).
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return "causal-lm" if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else "encoder"
    model_type = getattr(config, "model_type", None)
    if (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "causal-lm"
    return "encoder"


def _auto_class(kind: Kind):
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def instantiate_from_config(config, *, trust_remote_code: bool = False) -> nn.Module:
    """A randomly initialised model of the right Auto class; under ``torch.device('meta')`` it costs nothing."""
    try:
        return _auto_class(model_kind(config)).from_config(config, **_remote_kwargs(trust_remote_code))
    except ValueError as exc:
        raise CompressError(f"transformers cannot build a model from this config: {_reason(exc)}") from exc


def load_tokenizer(spec: str | None, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; missing or broken is an error because calibration and eval need it."""
    source = resolve_model_source(spec)
    shown = spec if spec is not None else DEMO_NAME
    try:
        return AutoTokenizer.from_pretrained(source, **_remote_kwargs(trust_remote_code))
    except Exception as exc:
        if not _is_local(source):
            raise _hub_error(shown, exc) from exc
        raise CompressError(_tokenizer_problem(shown, Path(source), exc)) from exc


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt", "merges.txt")


def _tokenizer_problem(shown: str, folder: Path, exc: BaseException) -> str:
    """One complete sentence: no tokenizer files at all, or the reason transformers gives (on one line)."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return (f"model folder '{shown}' has no usable tokenizer: it holds none of tokenizer.json, tokenizer.model, "
                "vocab.json or vocab.txt, so copy the tokenizer files of the model it was made from into it")
    reason = " ".join(str(exc).split()).rstrip(" .:")[:300] or type(exc).__name__
    if isinstance(exc, KeyError | AttributeError | TypeError | IndexError):  # their text alone says little
        reason = f"{type(exc).__name__}: {reason}"
    return f"model folder '{shown}' has no usable tokenizer: transformers cannot load it ({reason})"


def check_model_folder(spec: str, folder: Path) -> None:
    try:
        check_checkpoint_folder(folder)
    except CompressError as error:
        raise CompressError(f"could not read the weights of model '{spec}': {error}") from None


def _weights_policy(spec: str, folder: Path, allow_pickle: bool) -> bool:
    """``use_safetensors`` for a local folder; refuses folders without weights and, unless allowed, pickle.

    Shard indexes and safetensors headers are validated here, before transformers reads any of them.
    """
    check_model_folder(spec, folder)
    if any(folder.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise CompressError(f"model folder '{spec}' has no weights (no *.safetensors file)")
    if not allow_pickle:
        raise CompressError(
            f"model folder '{spec}' has only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded; convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    return False


def _resolve_dtype(dtype: str) -> str | torch.dtype:
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise CompressError(f"unsupported dtype '{dtype}'; use auto, float32, float16 or bfloat16") from None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CompressError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompressError(f"device '{device}' was requested but no CUDA GPU is available")
    return dev


def _short_name(spec: str | None, source: str) -> str:
    if spec is None or Path(source) == DEMO_MODEL_DIR:
        return DEMO_NAME
    return Path(source).name if _is_local(source) else source.rstrip("/").split("/")[-1]


def load_model(
    spec: str | None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load weights (safetensors unless ``allow_pickle``) and tokenizer; eval mode, Conv1D converted.

    ``dtype="auto"`` keeps the checkpoint's dtype, so a bf16 model is not silently doubled in memory.
    """
    from compress.models.blocks import convert_conv1d_to_linear  # blocks imports this module for plan_layers

    torch_dtype = _resolve_dtype(dtype)
    target = _resolve_device(device)
    source = resolve_model_source(spec)
    shown = spec if spec is not None else DEMO_NAME
    local = _is_local(source)
    use_safetensors: bool | None = (
        _weights_policy(shown, Path(source), allow_pickle) if local else (None if allow_pickle else True)
    )
    config = load_config(spec, trust_remote_code=trust_remote_code)
    kind = model_kind(config)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    try:
        model = _auto_class(kind).from_pretrained(
            source,
            config=config,
            dtype=torch_dtype,
            use_safetensors=use_safetensors,
            **_remote_kwargs(trust_remote_code),
        )
    except Exception as exc:  # safetensors / torch / OSError: all mean the checkpoint cannot be read
        if not local:
            raise _hub_error(shown, exc) from exc
        raise CompressError(f"could not read the weights of model '{shown}': {_reason(exc)}") from exc
    model.eval()
    convert_conv1d_to_linear(model)
    if target.type != "cpu":
        model.to(target)
    return LoadedModel(
        model=model, tokenizer=tokenizer, kind=kind, source=source, name=_short_name(spec, source)
    )


def load_model_streaming(
    spec: str | None, *, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[LoadedModel, LazyWeights, str] | None:
    """Like ``load_model`` but reading only what is outside the blocks; blocks are read on demand through
    the returned ``LazyWeights`` (see ``compress.models.lazy``). None when the checkpoint cannot be
    streamed (hub id, pickle weights, Conv1D, an unusual key layout): the caller then loads eagerly."""
    from compress.models.blocks import find_blocks
    from compress.models.lazy import build_lazy

    source = resolve_model_source(spec)
    folder = Path(source)
    if not _is_local(source) or not any(folder.glob("*.safetensors")):
        return None
    check_model_folder(spec if spec is not None else DEMO_NAME, folder)
    config = load_config(spec, trust_remote_code=trust_remote_code)
    kind = model_kind(config)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = _config_dtype(config)
    try:
        built = build_lazy(_auto_class(kind), config, folder, torch_dtype, trust_remote_code=trust_remote_code)
    except CompressError:
        raise
    except Exception:  # anything unusual about this architecture: the eager path handles it
        return None
    if built is None:
        return None
    model, lazy = built
    block_path, _ = find_blocks(model)
    lazy.load_outside(block_path)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source, name=_short_name(spec, source))
    return loaded, lazy, block_path


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(value, str):
        value = getattr(torch, value, torch.float32)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32
