"""A Whisper-family model as the seq2seq runner drives it: encoder passes over 30 s windows, the
decoder's prompt prefilled per row, and one batched decoder step over many rows whose self-attention
caches are left-padded to one width (as ``batch.py`` does for causal LMs).

The decoding rules are those of ``transformers``' ``WhisperForConditionalGeneration.generate`` in
greedy short-form mode, so that a row decodes token for token what ``generate()`` gives for the same
window: the prompt ``[<|startofprev|> prompt...] <|startoftranscript|> <|lang|> <|task|>
[<|notimestamps|>]``, language detection as ``detect_language`` does it (the decoder on
``<|startoftranscript|>`` alone, the most likely language token), ``suppress_tokens`` always,
``begin_suppress_tokens`` at the first step, and with timestamps the rules of
``WhisperTimeStampLogitsProcessor`` (pairs, never decreasing, an initial one within 1 s, and a
timestamp whenever their total probability beats every text token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model_host.errors import ModelLoadError
from model_host.whisper_quality import Fallback, token_start_times


@dataclass
class Rules:
    """The token ids decoding needs, from the model's generation config."""

    sot: int  # <|startoftranscript|>
    eot: int  # <|endoftext|>: the end of a window's text
    prev: int  # <|startofprev|>
    no_timestamps: int
    timestamp_begin: int  # <|0.00|>; every id from here is a timestamp, 0.02 s apart
    tasks: dict[str, int]
    languages: dict[str, int]  # ISO-639-1 code -> language token id
    suppress: list[int]
    begin_suppress: list[int]
    max_initial_timestamp: int | None
    max_target_positions: int
    fallback: Fallback
    alignment_heads: list[tuple[int, int]]  # (decoder layer, head) pairs whose attention follows the words

    @classmethod
    def of(cls, generation: Any, config: Any) -> Rules:
        lang_to_id = getattr(generation, "lang_to_id", None) or {}
        no_ts = getattr(generation, "no_timestamps_token_id", None)
        if not lang_to_id or no_ts is None or not getattr(generation, "task_to_id", None):
            raise ModelLoadError("the Whisper generation config lacks lang_to_id, task_to_id or timestamps")
        eos = generation.eos_token_id
        return cls(
            sot=int(generation.decoder_start_token_id),
            eot=int(eos[0] if isinstance(eos, list) else eos),
            prev=int(generation.prev_sot_token_id),
            no_timestamps=int(no_ts),
            timestamp_begin=int(no_ts) + 1,
            tasks={str(k): int(v) for k, v in generation.task_to_id.items()},
            languages={str(k).strip("<|>"): int(v) for k, v in lang_to_id.items()},
            suppress=list(getattr(generation, "suppress_tokens", None) or []),
            begin_suppress=list(getattr(generation, "begin_suppress_tokens", None) or []),
            max_initial_timestamp=getattr(generation, "max_initial_timestamp_index", None),
            max_target_positions=int(config.max_target_positions),
            fallback=Fallback.of(generation),
            alignment_heads=[(int(a), int(h)) for a, h in getattr(generation, "alignment_heads", None) or []],
        )

    @property
    def no_speech(self) -> int:
        """``<|nospeech|>`` (``<|nocaptions|>`` in older vocabularies): just below no-timestamps."""
        return self.no_timestamps - 1

    def prefix(self, language: int, task: str, prompt_ids: tuple[int, ...], timestamps: bool) -> list[int]:
        """A window's decoder prompt; the previous-text prompt keeps its last half-context of ids,
        as ``generate`` cuts it."""
        previous = [self.prev, *prompt_ids[-(self.max_target_positions // 2 - 1) :]] if prompt_ids else []
        tail = [] if timestamps else [self.no_timestamps]
        return [*previous, self.sot, language, self.tasks[task], *tail]

    def apply(self, logits: torch.Tensor, histories: list[list[int]], timestamps: list[bool]) -> None:
        """Mask, in place, what each row may not sample next; ``histories[i]`` is what row ``i``
        has generated in its window so far. The order is ``generate``'s: begin-suppression,
        suppression, then the timestamp rules (whose probability check sees the others' masks)."""
        inf = float("-inf")
        first = [i for i, h in enumerate(histories) if not h]
        if first and self.begin_suppress:
            logits[torch.tensor(first)[:, None], torch.tensor(self.begin_suppress)[None, :]] = inf
        if self.suppress:
            logits[:, self.suppress] = inf
        for i, history in enumerate(histories):
            if timestamps[i]:
                self._timestamp_rules(logits[i], history)

    def _timestamp_rules(self, row: torch.Tensor, seq: list[int]) -> None:
        begin, inf = self.timestamp_begin, float("-inf")
        row[self.no_timestamps] = inf
        last_ts = len(seq) >= 1 and seq[-1] >= begin
        penultimate_ts = len(seq) < 2 or seq[-2] >= begin
        if last_ts:
            if penultimate_ts:
                row[begin:] = inf  # a pair is closed: text (or the end) comes next
            else:
                row[: self.eot] = inf  # an open pair: another timestamp or the end
        stamps = [t for t in seq if t >= begin]
        if stamps:
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            row[begin:floor] = inf  # timestamps never decrease
        if not seq:
            row[:begin] = inf  # the window opens with a timestamp, within the first second
            if self.max_initial_timestamp is not None:
                row[begin + self.max_initial_timestamp + 1 :] = inf
        logprobs = F.log_softmax(row.float(), dim=-1)
        if logprobs[begin:].logsumexp(dim=-1) > logprobs[:begin].max():
            row[:begin] = inf


@dataclass
class RowCache:
    """One row's decoder state: self-attention keys/values per layer ``(1, heads, length, dim)``
    and cross-attention ones ``(1, heads, frames, dim)``."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]


class WhisperModel:
    def __init__(self, model: Any, rules: Rules) -> None:
        self.model = model
        self.rules = rules
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        self.n_mels = int(model.config.num_mel_bins)

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype) -> WhisperModel:
        from transformers import AutoModelForSpeechSeq2Seq, GenerationConfig

        try:
            model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=dtype).to(device).eval()
            generation = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load speech model from {path}: {exc}") from exc
        return cls(model, Rules.of(generation, model.config))

    @torch.inference_mode()
    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """Encoder states ``(n, frames, d_model)`` of ``n`` windows of features ``(n, mels, 3000)``."""
        features = windows.to(self.device, self.dtype)
        return self.model.model.encoder(features).last_hidden_state  # type: ignore[no-any-return]

    def encoder_pass(self, windows: torch.Tensor) -> EncoderPass:
        """An encoder pass over ``windows`` that runs a few layers at a time (see ``EncoderPass``)."""
        return EncoderPass(self.model.model.encoder, windows.to(self.device, self.dtype))

    @torch.inference_mode()
    def detect_language(self, encoded: torch.Tensor) -> list[int]:
        """The most likely language token of each window (``generate``'s ``detect_language``)."""
        start = torch.full((encoded.shape[0], 1), self.rules.sot, device=self.device)
        hidden = self.model.model.decoder(input_ids=start, encoder_hidden_states=encoded, use_cache=False)
        logits = self.model.proj_out(hidden.last_hidden_state[:, -1]).float()
        ids = torch.tensor(list(self.rules.languages.values()), device=self.device)
        return [int(ids[i]) for i in logits[:, ids].argmax(-1).tolist()]

    @torch.inference_mode()
    def prefill(self, encoded: torch.Tensor, prefix: list[int]) -> tuple[torch.Tensor, RowCache, float]:
        """Run one row's prompt (``encoded``: its window's states ``(1, frames, d)``); the logits of
        the prompt's last position, the row's cache, and the probability of ``<|nospeech|>`` at the
        start-of-transcript position (Whisper's no-speech signal, from the unprocessed logits)."""
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        ids = torch.tensor([prefix], device=self.device)
        out = self.model.model.decoder(
            input_ids=ids, encoder_hidden_states=encoded, cache=cache, use_cache=True
        )
        logits = self.model.proj_out(out.last_hidden_state[:, -1]).float()
        at_sot = self.model.proj_out(out.last_hidden_state[0, prefix.index(self.rules.sot)]).float()
        no_speech = float(torch.softmax(at_sot, dim=-1)[self.rules.no_speech])
        cache_out = RowCache(_layers_kv(cache.self_attention_cache), _layers_kv(cache.cross_attention_cache))
        return logits, cache_out, no_speech

    @torch.inference_mode()
    def token_times(
        self, encoded: torch.Tensor, prefix: list[int], tokens: list[int], ended: bool, frames: int
    ) -> list[float]:
        """Each of a finished window's ``tokens`` (its decoded tokens, end-of-text not included)
        start time in seconds into the window, as ``generate(return_token_timestamps=True)`` gives
        them: one more decoder pass over the window's sequence with attention weights, whose
        alignment heads' rows of the generated tokens (each token as input; the last one only when
        end-of-text followed it, else it repeats the time before) are warped onto the ``frames``
        feature frames that hold audio."""
        if not tokens or not self.rules.alignment_heads:
            return [0.0] * len(tokens)
        inputs = prefix + (tokens if ended else tokens[:-1])
        weights = self._alignment_weights(encoded, inputs)
        positions = max(1, min(frames, 3000) // 2)
        width = int(self.model.config.median_filter_width)
        times = token_start_times(weights[:, len(prefix) :, :positions], width)
        if not times:
            times = [0.0]
        return (times + [times[-1]] * len(tokens))[: len(tokens)]

    def _alignment_weights(self, encoded: torch.Tensor, inputs: list[int]) -> torch.Tensor:
        """The alignment heads' cross-attention weights ``(heads, len(inputs), frames)`` over one
        decoder pass of ``inputs``. The SDPA kernels return no weights, so each head's softmax is
        computed again from its layer's query input (caught by a hook) and the encoder states, as
        the eager attention computes it."""
        layers = self.model.model.decoder.layers
        queries: dict[int, torch.Tensor] = {}

        def catch(layer: int) -> Any:
            def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                queries[layer] = args[0] if args else kwargs["hidden_states"]

            return hook

        needed = sorted({layer for layer, _ in self.rules.alignment_heads})
        hooks = [layers[i].encoder_attn.register_forward_pre_hook(catch(i), with_kwargs=True) for i in needed]
        try:
            self.model.model.decoder(
                input_ids=torch.tensor([inputs], device=self.device),
                encoder_hidden_states=encoded,
                use_cache=False,
            )
        finally:
            for handle in hooks:
                handle.remove()
        heads = []
        for layer, head in self.rules.alignment_heads:
            attention = layers[layer].encoder_attn
            dim = attention.head_dim
            query = attention.q_proj(queries[layer][0]) * attention.scaling
            query = query.view(len(inputs), -1, dim)[:, head]
            key = attention.k_proj(encoded[0]).view(encoded.shape[1], -1, dim)[:, head]
            heads.append(torch.softmax((query @ key.T).float(), dim=-1))
        return torch.stack(heads)

    @torch.inference_mode()
    def step(self, batch: DecoderBatch) -> torch.Tensor:
        """One decoder step of every row; logits ``(rows, vocab)``. The batch's caches grow by one."""
        from transformers import DynamicCache, EncoderDecoderCache

        rows = len(batch.lengths)
        self_cache = DynamicCache(batch.self_kv)
        cross_cache = DynamicCache(batch.cross_kv)
        cache = EncoderDecoderCache(self_cache, cross_cache)  # cross states present: never recomputed
        mask = torch.cat([batch.mask, batch.mask.new_ones(rows, 1)], dim=1)
        positions = torch.tensor(batch.lengths, device=self.device)[:, None]
        # The layers take the cross-attention path only when encoder states are passed; with the
        # cross cache filled they read the cache and never look at these.
        placeholder = torch.zeros(rows, 1, self.model.config.d_model, device=self.device, dtype=self.dtype)
        out = self.model.model.decoder(
            input_ids=batch.last[:, None],
            attention_mask=mask,
            encoder_hidden_states=placeholder,
            cache=cache,
            position_ids=positions,
            use_cache=True,
        )
        batch.self_kv = _layers_kv(self_cache)
        batch.mask = mask
        batch.lengths = [n + 1 for n in batch.lengths]
        return self.model.proj_out(out.last_hidden_state[:, -1]).float()  # type: ignore[no-any-return]


class EncoderPass:
    """``WhisperEncoder.forward`` cut into stages (the convolutions and positions, then one stage
    per layer, the final norm with the last), so that the seq2seq runner can spread a window's
    encoding over several engine steps: on a CPU a whole pass takes long enough to stall every
    chat stream of the host. The same operations in the same order: the states equal one
    ``forward``."""

    def __init__(self, encoder: Any, features: torch.Tensor) -> None:
        self.encoder = encoder
        self.features: torch.Tensor | None = features
        self.hidden: torch.Tensor | None = None
        self.next_layer = 0

    @property
    def stages(self) -> int:
        """Stages left."""
        return len(self.encoder.layers) - self.next_layer + (self.features is not None)

    @property
    def done(self) -> bool:
        return self.stages == 0

    @torch.inference_mode()
    def advance(self, stages: int) -> None:
        encoder = self.encoder
        for _ in range(stages):
            if self.features is not None:
                embeds = F.gelu(encoder.conv1(self.features))
                embeds = F.gelu(encoder.conv2(embeds)).permute(0, 2, 1)
                positions = torch.arange(encoder.embed_positions.num_embeddings, device=embeds.device)
                self.hidden, self.features = embeds + encoder.embed_positions(positions), None
            elif self.next_layer < len(encoder.layers):
                self.hidden = encoder.layers[self.next_layer](self.hidden, None)
                self.next_layer += 1
                if self.next_layer == len(encoder.layers):
                    self.hidden = encoder.layer_norm(self.hidden)
            else:
                return

    def keep(self, rows: list[int]) -> None:
        """Go on with only these windows (the others' requests were aborted)."""
        index = torch.tensor(rows, dtype=torch.long)
        if self.features is not None:
            self.features = self.features[index.to(self.features.device)]
        if self.hidden is not None:
            self.hidden = self.hidden[index.to(self.hidden.device)]


def _layers_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


class DecoderBatch:
    """Rows decoding together: self-attention caches left-padded to one width (``mask`` marks the
    real positions), cross-attention caches stacked, each row's next position its own length."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.lengths: list[int] = []
        self.last = torch.zeros(0, dtype=torch.long, device=device)  # each row's newest token

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, row: RowCache, length: int, token: int) -> None:
        """Join a prefilled row (its cache holds ``length`` positions; ``token`` goes in next)."""
        width = max(self.mask.shape[1], length)
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if not self.lengths:
            self.self_kv, self.cross_kv = row.self_kv, row.cross_kv
            self.mask = row_mask
        else:
            self.self_kv = [
                (
                    torch.cat([_pad_left(k, width), _pad_left(rk, width)]),
                    torch.cat([_pad_left(v, width), _pad_left(rv, width)]),
                )
                for (k, v), (rk, rv) in zip(self.self_kv, row.self_kv, strict=True)
            ]
            self.cross_kv = [
                (torch.cat([k, rk]), torch.cat([v, rv]))
                for (k, v), (rk, rv) in zip(self.cross_kv, row.cross_kv, strict=True)
            ]
            self.mask = torch.cat(
                [F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(row_mask, (width - length, 0))]
            )
        self.lengths.append(length)
        self.last = torch.cat([self.last, torch.tensor([token], device=self.device)])

    def set_last(self, tokens: list[int]) -> None:
        self.last = torch.tensor(tokens, device=self.device)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), and drop padding columns no kept row needs."""
        if len(rows) == len(self.lengths):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.lengths = [self.lengths[i] for i in rows]
        self.last = self.last[index]
        width = max(self.lengths, default=0)
        cut = self.mask.shape[1] - width
        self.mask = self.mask[index, cut:]
        self.self_kv = [(k[index, :, cut:], v[index, :, cut:]) for k, v in self.self_kv]
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]
