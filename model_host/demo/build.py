"""Build tiny chat models offline: a byte-level BPE tokenizer, a ChatML template with tools, a Qwen2
model, and (for the demo model) a few seconds of training on :mod:`corpus`.

The result is a normal Hugging Face model folder written with ``save_pretrained``; the server loads it
through the ordinary ``from_pretrained`` path like any Hub model.

The demo model itself ships inside the package (``model_host/demo/model``, 1.6 MB), built by this
module (``python -m model_host.demo --package``), so a first start takes seconds instead of minutes of
training. Its ``hfserve_build.json`` records a digest of the recipe (spec, corpus, template); a
shipped copy whose digest no longer matches (the corpus was edited, the package was not rebuilt) is
ignored and the model is trained into the cache as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from model_host.demo import corpus

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "hfserve-demo"
# Bump when the corpus, template or recipe changes, so cached copies are rebuilt.
DEMO_MODEL_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain added tokens: kept whole by the tokenizer but decoded as text, so the server can parse them.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    train_steps: int = 0
    seed: int = 0
    # Feed the tokenizer trainer synthetic text too, so a large vocab_size is really reached.
    synthetic_vocab_text: bool = False


DEMO_SPEC = ModelSpec(train_steps=800)


PACKAGED_DEMO_DIR = Path(__file__).resolve().parent / "model"


def chat_template() -> str:
    return resources.files("model_host.demo").joinpath("chat_template.jinja").read_text()


def default_cache_dir() -> Path:
    from model_host.ipc.system import cache_dir

    return cache_dir()


def _render(messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    render: Any = render_jinja_template  # annotated as returning str; returns (texts, indices)
    text, _ = render(
        [messages],
        tools=tools,
        chat_template=chat_template(),
        add_generation_prompt=add_generation_prompt,
    )
    return text[0]


def _examples() -> list[tuple[str, str]]:
    """(prompt, reply) pairs: one per assistant turn of every corpus conversation."""
    out: list[tuple[str, str]] = []
    for messages, tools in corpus.conversations():
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = _render(messages[:i], tools, add_generation_prompt=True)
            full = _render(messages[: i + 1], tools, add_generation_prompt=False)
            assert full.startswith(prompt)
            out.append((prompt, full[len(prompt) :].rstrip("\n")))
    return out


def build_tokenizer(out_dir: Path, vocab_size: int, texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[],
    )
    fast.add_tokens(MARKUP_TOKENS)
    fast.chat_template = chat_template()
    fast.save_pretrained(out_dir)
    return fast


_BUCKET_ROWS = 16
_LR = 4e-3
_MARGIN_STEPS = 20


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids, attention, labels


def _train(model: Any, tokenizer: Any, examples: list[tuple[str, str]], steps: int) -> float:
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    for prompt, reply in examples:
        p = tokenizer.encode(prompt, add_special_tokens=False).ids
        r = tokenizer.encode(reply, add_special_tokens=False).ids
        rows.append((p + r, [-100] * len(p) + r))
    # Length buckets: one padded batch per bucket, gradients summed, so short examples do not pay
    # for the padding of long ones (the whole corpus is still one optimiser step).
    rows.sort(key=lambda row: len(row[0]))
    buckets = [rows[i : i + _BUCKET_ROWS] for i in range(0, len(rows), _BUCKET_ROWS)]
    batches = [_pad_batch(b, tokenizer.token_to_id("<|endoftext|>")) for b in buckets]
    total = sum(int((lab != -100).sum()) for _, _, lab in batches)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    loss_value = 0.0
    perfect_steps = 0
    for step in range(steps):
        loss_value, wrong = 0.0, 0
        for input_ids, attention, labels in batches:
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
            target = labels[:, 1:]
            loss = (
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                / total
            )
            loss.backward()
            loss_value += float(loss.detach())
            wrong += int(((logits.argmax(-1) != target) & (target != -100)).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # Greedy replay of every reply is exact once no target token is mispredicted; a few
        # more steps widen the margins so tiny numeric differences cannot flip a token.
        if wrong == 0:
            perfect_steps += 1
            if perfect_steps >= _MARGIN_STEPS:
                log.info("demo model memorised the corpus after %d steps", step + 1)
                break
        else:
            perfect_steps = 0
    model.eval()
    return loss_value


def build_model(out_dir: Path, spec: ModelSpec) -> Path:
    """Write a complete model folder (tokenizer, template, config, weights) into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    examples = _examples()
    texts = [p + r for p, r in examples] + [corpus.EXTRA_TOKENIZER_TEXT]
    if spec.synthetic_vocab_text:
        texts += [" ".join(f"{w}{i}" for w in ("a", "item", "x", "no", "z")) for i in range(20000)]
    tokenizer = build_tokenizer(out_dir, spec.vocab_size, texts)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # Train on exactly the token ids the server will produce: the saved tokenizer.json, read by
    # the `tokenizers` library as the HTTP workers read it.
    from tokenizers import Tokenizer

    served_tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    loss = _train(model, served_tokenizer, examples, spec.train_steps) if spec.train_steps else None
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    info = {"spec": asdict(spec), "final_loss": loss, "toy_model": True, "recipe_sha256": recipe_digest(spec)}
    (out_dir / "hfserve_build.json").write_text(json.dumps(info, indent=2))
    return out_dir


def ensure_model(spec: ModelSpec, name: str, cache_dir: Path | None = None) -> Path:
    """Build the model once into the cache and reuse it afterwards (safe across processes)."""
    cache = cache_dir or default_cache_dir()
    target = cache / f"{name}-v{DEMO_MODEL_VERSION}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds the model built
        if (target / "config.json").exists():
            return target
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            build_model(tmp, spec)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s in %.1f s at %s", name, time.monotonic() - started, target)
    return target


def recipe_digest(spec: ModelSpec) -> str:
    """What the weights are a function of: the spec, every training example, the template."""
    recipe = {"spec": asdict(spec), "examples": _examples(), "template": chat_template()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def packaged_demo_model() -> Path | None:
    """The demo model shipped with the package, when it was built from today's recipe."""
    info_path = PACKAGED_DEMO_DIR / "hfserve_build.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe_sha256") != recipe_digest(DEMO_SPEC):
        log.warning("the packaged demo model is out of date (recipe changed); training one instead")
        return None
    return PACKAGED_DEMO_DIR


def build_packaged_demo_model() -> Path:
    """Train the demo model into the package folder (run after changing the corpus or recipe)."""
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=PACKAGED_DEMO_DIR.parent))
    try:
        build_model(tmp, DEMO_SPEC)
        shutil.rmtree(PACKAGED_DEMO_DIR, ignore_errors=True)
        os.replace(tmp, PACKAGED_DEMO_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PACKAGED_DEMO_DIR


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    return packaged_demo_model() or ensure_model(DEMO_SPEC, DEMO_MODEL_NAME, cache_dir)
