"""Shared fixtures: tiny random models built from config across families, and an offline tokenizer."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 128
HIDDEN = 32
LAYERS = 6

COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {**COMMON, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "head_dim": 8, "sliding_window": 8}),
    "phi": ("PhiConfig", "PhiForCausalLM", COMMON),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", COMMON),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256, **TOKENS)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                 max_position_embeddings=256, word_embed_proj_dim=HIDDEN, **TOKENS)),
}


def build_tiny(family: str, seed: int = 0, layers: int = LAYERS):
    """A random-init tiny model of ``family`` in eval mode, float32, CPU."""
    config_name, model_name, kwargs = FAMILIES[family]
    kwargs = dict(kwargs)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    kwargs[key] = layers
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return build_tiny(family)


def random_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_tokenizer():
    """A word-level tokenizer of at most VOCAB entries, trained offline on a few sentences (unknown words: [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "[UNK]"])
    text = ["the model cuts layers and repairs the cut so quality stays while cost falls",
            "engineers compress checkpoints for cheaper deployment on small machines",
            "The quick brown fox jumps over the lazy dog . , ! ?"]
    tokenizer.train_from_iterator(text, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                                unk_token="[UNK]")
    assert len(fast) <= VOCAB
    return fast


def byte_level_tokenizer(texts: list[str], special: str = "<|endoftext|>", add_bos: bool = False, **kwargs):
    """A byte-level BPE tokenizer (vocabulary 400, every byte in its alphabet) trained offline on ``texts``.

    ``special`` is its one special token (id 0); ``add_bos`` prefixes it to every encoding; ``kwargs`` go to
    ``PreTrainedTokenizerFast`` (bos/eos/pad tokens, model_max_length).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{special} $A", special_tokens=[(special, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


WORDS = ["the", "model", "cuts", "layers", "and", "repairs", "the", "cut", "so", "quality", "stays", "while", "cost",
         "falls", "engineers", "compress", "checkpoints", "for", "cheaper", "deployment", "on", "small", "machines"]


def write_text(folder, paragraphs: int = 40, words: int = 60) -> str:
    """A local calibration/perplexity text of random paragraphs over :data:`WORDS` (all in the tiny tokenizer)."""
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=generator).tolist())
             for _ in range(paragraphs)]
    path = folder / "text.txt"
    path.write_text("\n\n".join(lines))
    return str(path)


def save_workspace(root, tokenizer):
    """A tiny Llama and ``tokenizer`` saved to ``root``/tiny, and a text at ``root``/text.txt; returns ``root``."""
    build_tiny("llama").save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    write_text(root)
    return root


def reference_perplexity(folder, text_file: str, seq_len: int, windows: int) -> float:
    """Perplexity of the checkpoint in ``folder`` on the first ``windows`` windows of ``seq_len`` tokens of the test
    part (last 10 % of paragraphs) of ``text_file``, computed independently of layercut: the model's own loss."""
    import math
    from pathlib import Path

    paragraphs = [p.strip() for p in Path(text_file).read_text().split("\n\n") if p.strip()]
    test = "\n\n".join(paragraphs[round(len(paragraphs) * 0.9):])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(tokenizer(test, add_special_tokens=False)["input_ids"])
    chunks = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)[:windows]
    with torch.no_grad():
        losses = [model(input_ids=chunk[None], labels=chunk[None]).loss.item() for chunk in chunks]
    return math.exp(sum(losses) / len(losses))


def window_costs(costs: list[float], interaction: float = 0.0):
    """A synthetic landscape for the gate: removing layers costs their sum plus ``interaction`` for every removed
    pair of neighbours (negative: removing a contiguous block is cheaper than its layers apart). Returns the
    differentiable ``objective(gates [R, L]) -> [R]`` and the exact loss of hard cuts."""
    from layercut.forward import hard_gates

    costs_t = torch.tensor(costs)

    def objective(gates: torch.Tensor) -> torch.Tensor:
        removed = 1 - gates
        return (removed * costs_t).sum(-1) + interaction * (removed[:, 1:] * removed[:, :-1]).sum(-1)

    def exact(candidates):
        return objective(hard_gates(candidates, len(costs))).tolist()

    return objective, exact
