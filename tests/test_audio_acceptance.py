"""Speech acceptance runs too long for the default suite (``slow``): ten English sentences through
the OpenAI SDK equal in-process ``generate()`` with a mean word error rate under 0.30 (acceptance
1), and 8 transcriptions with 8 chat streams at once on one server, each equal to its run alone
(acceptance 5). The fast variants are in ``test_audio_e2e``."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.server import ServerProcess, stream_chat_text
from tests.speech_helpers import SENTENCES, Reference, espeak, word_error_rate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]
CHAT_PROMPTS = [f"Tell me about the number {i}." for i in range(8)]


@pytest.fixture(scope="module")
def speech_server(cache_dir: Path, whisper_base_model: Path, demo_model: Path) -> Iterator[ServerProcess]:
    # The demo model preloaded and pinned; whisper-base loads on its first request, by its folder.
    with ServerProcess.start(cache_dir, workers=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("sentences")
    return [espeak(s, "en", folder / f"{i}.wav") for i, s in enumerate(SENTENCES)]


def test_ten_sentences_equal_generate_with_a_low_word_error_rate(
    speech_server: ServerProcess, whisper_base_model: Path, clips: list[bytes]
) -> None:
    client = OpenAI(base_url=f"{speech_server.base_url}/v1", api_key="unused", timeout=600, max_retries=0)
    reference = Reference(whisper_base_model)
    rates = []
    for wav, sentence in zip(clips, SENTENCES, strict=True):
        heard = client.audio.transcriptions.create(
            model=str(whisper_base_model), file=("s.wav", wav), language="en"
        ).text
        assert heard == reference.text(wav, language="en"), sentence
        rates.append(word_error_rate(heard, sentence))
    assert sum(rates) / len(rates) < 0.30, rates


def test_eight_transcriptions_and_eight_chat_streams_at_once(
    speech_server: ServerProcess, whisper_base_model: Path, demo_model: Path, clips: list[bytes]
) -> None:
    async def transcribe(client: AsyncOpenAI, wav: bytes) -> str:
        result = await client.audio.transcriptions.create(
            model=str(whisper_base_model), file=("s.wav", wav), language="en"
        )
        return result.text

    async def chat(client: AsyncOpenAI, prompt: str) -> str:
        return await stream_chat_text(client, prompt, model="hfserve-demo", temperature=0, max_tokens=32)

    async def run() -> tuple[list[str], list[str], list[str], list[str]]:
        client = AsyncOpenAI(base_url=f"{speech_server.base_url}/v1", api_key="u", timeout=900, max_retries=0)
        alone_chat = [await chat(client, p) for p in CHAT_PROMPTS]
        alone_text = [await transcribe(client, wav) for wav in clips[:8]]
        together = await asyncio.gather(
            *(transcribe(client, wav) for wav in clips[:8]), *(chat(client, p) for p in CHAT_PROMPTS)
        )
        return alone_text, alone_chat, list(together[:8]), list(together[8:])

    alone_text, alone_chat, texts, chats = asyncio.run(run())
    assert texts == alone_text
    assert chats == alone_chat and all(chats)
