"""Fill-in-the-middle prompts for ``/v1/completions`` ``suffix``.

A code model trained for infilling reads the text before and after the hole between its own
sentinel tokens and writes the middle. The format is recognised from the tokenizer's vocabulary:
the first known set of sentinels that the tokenizer has as whole tokens. (Code Llama's sentinels
carry a leading "▁" and spacing rules of their own; they are not recognised, so such a model's
``suffix`` is refused rather than guessed at.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer


@dataclass(frozen=True, slots=True)
class FimFormat:
    name: str
    prefix: str
    suffix: str
    middle: str
    order: Literal["psm", "spm"] = "psm"  # prefix-suffix-middle, or suffix first (Codestral)

    def render(self, before: str, after: str) -> str:
        if self.order == "spm":
            return f"{self.suffix}{after}{self.prefix}{before}"
        return f"{self.prefix}{before}{self.suffix}{after}{self.middle}"

    def sentinels(self) -> tuple[str, ...]:
        return (self.prefix, self.suffix) if self.order == "spm" else (self.prefix, self.suffix, self.middle)


FORMATS = (
    # Qwen2.5-Coder, StarCoder2, CodeGemma, Granite (newer)
    FimFormat("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    # StarCoder, SantaCoder, Granite code
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimFormat("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    # [BOS][SUFFIX]after[PREFIX]before, as mistral-common encodes it
    FimFormat("codestral", "[PREFIX]", "[SUFFIX]", "", order="spm"),
)


def detect_fim(tokenizer: Tokenizer) -> FimFormat | None:
    """The infilling format whose sentinels are all single tokens of ``tokenizer``."""
    for fmt in FORMATS:
        if all(tokenizer.token_to_id(s) is not None for s in fmt.sentinels()):
            return fmt
    return None
