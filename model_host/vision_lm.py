"""A vision-language model as the host runs it: ``AutoModelForImageTextToText`` with its
``AutoProcessor``, and the three things its requests need beyond a causal LM's.

1. **Preparing a prompt** (``prepare``, run in a thread while the request waits): the images are
   decoded with Pillow (RGB, a GIF's first frame, EXIF orientation applied as transformers'
   ``load_image`` does) and the processor runs on the rendered prompt and the images, exactly as
   ``processor(text=..., images=...)`` would for ``generate()``: its ids (each image placeholder
   expanded to the image's tokens), ``pixel_values`` and the model's other image inputs.
2. **Encoding the images** (``encode``, in the step that prefills the request, counted against the
   prefill budget): the model's own ``get_image_features``, as its ``forward`` calls it.
3. **Prompt inputs** (``prompt_inputs``): the prompt goes in as embeddings, the token embeddings
   with the image tokens' rows replaced by the image features (the ``masked_scatter`` of the
   model's ``forward``, done per row), so a left-padded group of prompts with and without images,
   or one chunk of a long prompt, is one ordinary forward pass. Models with multimodal rotary
   positions (the Qwen2-VL family: ``get_rope_index``) get their 3-D positions per row; each row
   keeps the offset of its text positions past the prompt (``rope_deltas``) on its ``Sequence``,
   so decoding rows with and without images shares one batch.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_host.batch import Sequence
from model_host.causal_lm import CausalLM, Placement
from model_host.errors import ModelLoadError
from model_host.gemm_pack import pack_linears
from model_host.ipc.messages import ImageInput

log = logging.getLogger(__name__)

_KEY_SPACE = 2**62  # image tokens' cache keys are negative: never a token id


class ImagePromptError(ValueError):
    """A request's images or prompt that the processor cannot take; the message is the client's."""


def images_only(cls: type) -> type:
    """``cls`` (a processor class) without its video processor. Transformers builds video processors
    only with torchvision, which image requests do not need; a processor class that names one then
    cannot be built or loaded at all. The subclass keeps the class's name and behaviour."""

    class ImagesOnly(cls):  # type: ignore[valid-type,misc]
        video_processor = None

        @classmethod
        def get_attributes(klass) -> list[str]:
            return [a for a in super().get_attributes() if "video" not in a]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


def load_processor(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:
        if is_torchvision_available():
            raise
        name = _processor_class_name(Path(path))
        import transformers

        cls = getattr(transformers, name, None) if name else None
        if not isinstance(cls, type):
            raise
        log.info("%s: loading %s without its video processor (torchvision is not installed)", path, name)
        processor: Any = images_only(cls)
        return processor.from_pretrained(path)


def _processor_class_name(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            value = json.loads((folder / name).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            return value
    return None


def decode_image(data: bytes) -> Any:
    """RGB pixels of an image file's first frame, upright (as transformers' ``load_image``)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return ImageOps.exif_transpose(image).convert("RGB")


def image_key(digest: bytes, offset: int) -> int:
    """The prefix cache's stand-in for an image's ``offset``-th token: derived from the image's
    content, negative so that it is never a token id."""
    base = int.from_bytes(digest[:8], "big")
    return -1 - (base + offset) % _KEY_SPACE


@dataclass
class ImagePrompt:
    """One request's prompt with its images, as the processor made it."""

    ids: list[int]  # the prompt, each image placeholder expanded to the image's tokens
    inputs: dict[str, torch.Tensor]  # pixel_values and the model's other image inputs
    image_index: torch.Tensor  # [image tokens] where the image tokens are in ``ids``, ascending
    encoder_tokens: int  # the vision encoder's work, in patches: its share of the prefill budget
    cache_key: list[int]  # ``ids`` with each image token replaced by an ``image_key``
    positions: torch.Tensor | None = None  # [3, len(ids)] multimodal rotary positions
    rope_delta: int = 0  # next text position minus the prompt's length (Qwen2-VL's rope_deltas)
    features: torch.Tensor | None = field(default=None, repr=False)  # [image tokens, hidden]

    def needs_encoding(self, start: int) -> bool:
        """Tokens from ``start`` on include image tokens whose features are not computed yet."""
        return self.features is None and bool((self.image_index >= start).any())


def _cache_key(ids: list[int], image_index: torch.Tensor, images: Seq[ImageInput]) -> list[int]:
    """Each contiguous run of image tokens is one image, in order; when runs and images do not
    pair up (two images' tokens adjacent), every image token stands for all the images."""
    key = list(ids)
    positions = image_index.tolist()
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    if len(runs) == len(images):
        for run, image in zip(runs, images, strict=True):
            for offset, p in enumerate(run):
                key[p] = image_key(image.digest, offset)
    else:
        combined = hashlib.sha256(b"".join(i.digest for i in images)).digest()
        for offset, p in enumerate(positions):
            key[p] = image_key(combined, offset)
    return key


@dataclass
class VisionLM(CausalLM):
    processor: Any = None
    image_token_id: int = -1
    rope_index: Any = None  # the model's get_rope_index, for multimodal rotary positions
    _feature_args: frozenset[str] = frozenset()  # what get_image_features takes by name
    _rope_args: frozenset[str] = frozenset()

    # -- while the request waits (a worker thread) -----------------------------------------------
    def prepare(self, images: Seq[ImageInput], prompt_text: str) -> ImagePrompt:
        try:
            pictures = [decode_image(image.data) for image in images]
        except Exception as exc:  # Pillow raises many types for a file it cannot read
            raise ImagePromptError("an image could not be decoded") from exc
        try:
            out = self.processor(
                text=[prompt_text], images=pictures, return_tensors="pt", add_special_tokens=False
            )
        except Exception as exc:  # placeholders that do not match the images, mostly
            log.info("processor refused a prompt: %s", exc)
            raise ImagePromptError(
                f"the prompt's image placeholders do not match its {len(images)} image(s)"
            ) from exc
        ids_tensor = out["input_ids"][0]
        inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        image_index = (ids_tensor == self.image_token_id).nonzero().flatten()
        ids = ids_tensor.tolist()
        cost = self._encoder_tokens(inputs, image_index)
        prompt = ImagePrompt(ids, inputs, image_index, cost, _cache_key(ids, image_index, images))
        if self.rope_index is not None:
            args = {k: v for k, v in inputs.items() if k in self._rope_args}
            positions, deltas = self.rope_index(ids_tensor[None], **args)
            prompt.positions, prompt.rope_delta = positions[:, 0], int(deltas.flatten()[0])
        return prompt

    def _encoder_tokens(self, inputs: dict[str, torch.Tensor], image_index: torch.Tensor) -> int:
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return int(image_index.numel())
        if pixels.dim() == 2:  # flattened patches (Qwen2-VL)
            return int(pixels.shape[0])
        # [images (or crops), channels, height, width]: patches of the vision config's size.
        vision = getattr(self.model.config, "vision_config", None)
        patch = int(getattr(vision, "patch_size", 14) or 14)
        crops = pixels.numel() // (pixels.shape[-3] * pixels.shape[-2] * pixels.shape[-1])
        return max(int(crops * (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)), 1)

    # -- in the step ------------------------------------------------------------------------------
    def encode(self, prompt: ImagePrompt) -> None:
        """The image tokens' features: the vision encoder and projector, as ``forward`` runs them."""
        args = {k: v.to(self.device) for k, v in prompt.inputs.items() if k in self._feature_args}
        out = self.model.model.get_image_features(**args, return_dict=True)  # as the model's forward
        pooled = out.pooler_output
        features = torch.cat(list(pooled)) if isinstance(pooled, list | tuple) else pooled
        features = features.reshape(-1, features.shape[-1])
        if features.shape[0] != prompt.image_index.numel():
            raise ValueError(f"{features.shape[0]} image features for {prompt.image_index.numel()} tokens")
        prompt.features = features
        prompt.inputs = {}  # the pixels are spent

    def prompt_inputs(
        self, seqs: list[Sequence], ids: torch.Tensor, positions: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Row ``i`` of ``ids`` holds ``seqs[i]``'s prompt tokens from ``start`` on, left-padded."""
        width = ids.shape[1]
        spans = [min(len(s.prompt) - start, width) for s in seqs]
        embeds = None
        if any(s.images is not None and (s.images.image_index >= start).any() for s in seqs):
            embeds = self.model.get_input_embeddings()(ids)
            for i, (seq, n) in enumerate(zip(seqs, spans, strict=True)):
                prompt: ImagePrompt | None = seq.images
                if prompt is None:
                    continue
                if prompt.needs_encoding(start):
                    self.encode(prompt)
                assert prompt.features is not None or not (prompt.image_index >= start).any()
                inside = (prompt.image_index >= start) & (prompt.image_index < start + n)
                if prompt.features is not None and inside.any():
                    columns = (prompt.image_index[inside] - start + (width - n)).to(embeds.device)
                    rows = prompt.features[inside.to(prompt.features.device)]
                    embeds[i, columns] = rows.to(embeds.device, embeds.dtype)
        if self.rope_index is not None:
            rope = positions[None].repeat(3, 1, 1)
            for i, (seq, n) in enumerate(zip(seqs, spans, strict=True)):
                if seq.images is not None and seq.images.positions is not None:
                    rope[:, i, width - n :] = seq.images.positions[:, start : start + n].to(rope.device)
            positions = torch.cat([positions[None], rope])  # text positions first, as generate() does
        for seq, n in zip(seqs, spans, strict=True):
            if start + n >= len(seq.prompt):
                seq.images = None  # the whole prompt is in: its images are spent
        return (None if embeds is not None else ids), embeds, positions

    def decode_positions(self, seqs: list[Sequence], positions: torch.Tensor) -> torch.Tensor:
        if self.rope_index is None:
            return positions
        deltas = torch.tensor([s.rope_delta for s in seqs], device=positions.device)[:, None]
        rope = (positions + deltas)[None].expand(3, -1, -1)
        return torch.cat([positions[None], rope])

    @classmethod
    def load(
        cls,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool,
        placement: Placement | None = None,
        pack_weights: bool = False,
        lean_decode: bool = False,
    ) -> VisionLM:
        """Load onto ``device`` (a model spread over devices by a ``placement`` is a causal LM's
        option only: the batch's image inputs would need placing too); ``pack_weights`` as for a
        causal LM. ``lean_decode`` is a causal LM's option only: a vision model's decode steps
        carry per-row rotary offsets that only its own forward applies."""
        from transformers import AutoModelForImageTextToText

        if placement is not None:
            raise ModelLoadError(f"{path}: a vision-language model loads onto one device")

        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
            processor = load_processor(path, trust_remote_code)
        except Exception as exc:  # transformers raises many types for a bad folder
            raise ModelLoadError(f"cannot load vision-language model from {path}: {exc}") from exc
        model.to(device).eval()  # type: ignore[arg-type]
        config = model.config
        text = getattr(config, "text_config", None) or config
        max_context = int(getattr(text, "max_position_embeddings", 0) or 2048)
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            raise ModelLoadError(
                f"cannot load vision-language model from {path}: its config has no image token"
            )
        params = inspect.signature(model.forward).parameters
        # The base model inside the head, whose image features and positions its forward uses.
        inner: Any = getattr(model, "model", None)
        if not callable(getattr(inner, "get_image_features", None)):
            raise ModelLoadError(
                f"cannot load vision-language model from {path}: {type(model).__name__} has no "
                "model.get_image_features, which this server feeds images through"
            )
        rope_index = getattr(inner, "get_rope_index", None)
        return cls(
            path,
            model,
            device,
            max_context,
            "cache" if "cache" in params else "past_key_values",
            "logits_to_keep" in params,
            gemm=pack_linears(model, path) if pack_weights else None,
            processor=processor,
            image_token_id=int(image_token_id),
            rope_index=rope_index,
            _feature_args=_named_args(inner.get_image_features),
            _rope_args=_named_args(rope_index) - {"input_ids"} if rope_index is not None else frozenset(),
        )

    def close(self) -> None:
        super().close()
        self.processor = None
        self.rope_index = None


def _named_args(fn: Any) -> frozenset[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds)
