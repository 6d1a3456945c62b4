"""Tiny vision-language models for the tests, built offline: random weights, a real processor.

Two families, each a normal Hugging Face folder (``save_pretrained``) that the server loads through
``AutoModelForImageTextToText`` / ``AutoProcessor`` like a Hub model:

- ``qwen2-vl``: ``Qwen2VLForConditionalGeneration`` with its PIL image processor (14-pixel patches
  merged 2×2, images scaled to at most 224×224 pixels, so a 448×448 image is 64 tokens) and its
  multimodal rotary positions (``rope_deltas``);
- ``llava``: ``LlavaForConditionalGeneration`` with a tiny CLIP vision tower (112-pixel images,
  14-pixel patches: 64 tokens an image).

The tokenizer is the demo model's with the image tokens added; each processor's own chat template (a
ChatML template with the demo's tools, and the family's image placeholder) is saved with it, as
``chat_template.jinja``, where the HTTP workers find it. Built once per cache folder.
"""

from __future__ import annotations

import base64
import fcntl
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BUILD_VERSION = "1"
FAMILIES = ("qwen2-vl", "llava")
HIDDEN = 64
# Weights drawn wider than transformers' 0.02, so a random model's logits are far apart: a greedy
# pick then does not hinge on the last bits that batching may change.
INIT_RANGE = 0.2

_DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "model_host" / "demo" / "model" / "tokenizer.json"
_PLACEHOLDERS = {"qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>\n"}
_IMAGE_TOKENS = {
    "qwen2-vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}

_TEMPLATE = """\
{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}{{- 'PLACEHOLDER' -}}
{%- elif part.type == 'text' -%}{{- part.text -}}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- render(messages[0].content) + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n' }}
{%- for tool in tools %}
{%- set fn = tool.function if tool.function is defined else tool %}
{{- '- ' + fn.name + ': ' + (fn.description or '') + '\\n' }}
{%- endfor %}
{{- 'Call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + render(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role in ['user', 'system', 'developer'] %}
{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.content %}{{- render(message.content) }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{%- if (not loop.first) or message.content %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + render(message.content) + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def chat_template(family: str) -> str:
    return _TEMPLATE.replace("PLACEHOLDER", _PLACEHOLDERS[family].replace("\n", "\\n"))


def _tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(_DEMO_TOKENIZER))
    tok.add_special_tokens(_IMAGE_TOKENS[family])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _text_config(vocab_size: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "initializer_range": INIT_RANGE,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "bos_token_id": None,
    }


def _build_qwen2_vl(folder: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from model_host.vision_lm import images_only

    tok = _tokenizer("qwen2-vl")
    ids = {t: tok.convert_tokens_to_ids(t) for t in _IMAGE_TOKENS["qwen2-vl"]}
    text = _text_config(len(tok), tok.eos_token_id, tok.pad_token_id)
    # head_dim 16: 8 rotary frequencies, split over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": HIDDEN,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": INIT_RANGE,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    _save_model(Qwen2VLForConditionalGeneration(config), folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=224 * 224)
    # Transformers builds Qwen2-VL's video processor only with torchvision, which the server does
    # not need: the processor is saved (and loaded by the host) without it.
    processor = images_only(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=chat_template("qwen2-vl")
    )
    processor.save_pretrained(folder)


def _build_llava(folder: Path) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer("llava")
    config = LlavaConfig(
        text_config={"model_type": "qwen2", **_text_config(len(tok), tok.eos_token_id, tok.pad_token_id)},
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 112,
            "patch_size": 14,
            "projection_dim": 32,
            "initializer_range": INIT_RANGE,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    _save_model(LlavaForConditionalGeneration(config), folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops
        chat_template=chat_template("llava"),
    )
    processor.save_pretrained(folder)


def _save_model(model: Any, folder: Path) -> None:
    import torch

    model.eval()
    model.generation_config.do_sample = False
    with torch.no_grad():  # the wider init of INIT_RANGE also for layers transformers leaves at 0.02
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed_positions" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_RANGE)
    model.save_pretrained(folder)


_BUILDERS = {"qwen2-vl": _build_qwen2_vl, "llava": _build_llava}


def build_vision_model(cache_dir: Path, family: str) -> Path:
    """The folder of the tiny ``family`` model under ``cache_dir``, built on first use."""
    root = cache_dir / "vision-models"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"tiny-{family}-v{BUILD_VERSION}"
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build once
        if not (folder / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
            try:
                _BUILDERS[family](tmp)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class Picture:
    """A test image: seeded random pixels saved as a file (PNG, JPEG, WebP, GIF), as a client
    sends it (``url``: a data URL) and as the reference reads it (``pil``: RGB, first frame)."""

    data: bytes
    mime: str

    @classmethod
    def noise(cls, width: int, height: int, seed: int, fmt: str = "PNG") -> Picture:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        return cls(out.getvalue(), f"image/{fmt.lower()}")

    def url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"

    def pil(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as image:
            return image.convert("RGB")
