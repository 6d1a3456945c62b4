"""``generation_config`` on chat and text completions, as ``transformers serve`` takes it: the fields
of a ``transformers.GenerationConfig``, as a JSON string (what ``transformers chat`` sends) or as an
object.

Precedence, as in transformers serve: the request's own fields (``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, and our extensions ``top_k``,
``min_p``, ``repetition_penalty``) win over the config's; the config's win over the model's own
defaults (its ``generation_config.json``). One exception, also as there: ``do_sample: false``
decodes greedily whatever the temperature (transformers ignores the temperature of a greedy
config, and the peer never turns sampling back on from a request's ``temperature``).
``do_sample: true`` samples even where the model's default is greedy: at the request's or the
config's temperature, else the model's sampling default, else 1 (transformers' default).

Each GenerationConfig field is mapped, accepted as a no-op (it cannot change the text here: ids
used only for padding or by encoder-decoders, cache and speed settings, the shape of
``generate()``'s return value, speculative-decoding knobs), or refused with a 400 naming
``generation_config.<field>`` unless it is at its "off" value. Names GenerationConfig does not have
are refused too: a typo must not pass for a setting.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from sanic_serve.errors import InvalidRequest

if TYPE_CHECKING:
    from sanic_serve.models import ModelBundle
    from sanic_serve.protocol import GenerationFields

MAX_STOP_STRINGS = 16  # transformers sets no limit; each one costs the stop matcher a little

# Mapped onto the request's own fields (or, for the last two, onto its sampling settings).
_MAPPED = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop_strings"}
    | {"do_sample", "eos_token_id"}
)

_NO_OPS = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "low_memory",
        "prefill_chunk_size",
        "continuous_batching_config",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "output_attentions",
        "output_hidden_states",
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "assistant_early_exit",
        "assistant_ensemble_weight",
        "prompt_lookup_num_tokens",
        "max_matching_ngram_size",
        "speculation_type",
        "use_mtp",
    }
)

# Not implemented here; accepted only at the value that turns them off (None always does).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "max_length": (),  # with max_new_tokens it is ignored, as transformers does
    "min_length": (0,),
    "min_new_tokens": (0,),
    "early_stopping": (False,),
    "max_time": (),
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "num_return_sequences": (1,),
    "penalty_alpha": (),
    "dola_layers": (),
    "diversity_penalty": (0.0,),
    "top_h": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "encoder_repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "bad_words_ids": (),
    "force_words_ids": (),
    "constraints": (),
    "renormalize_logits": (False,),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "remove_invalid_values": (False,),
    "exponential_decay_length_penalty": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "sequence_bias": (),
    "token_healing": (False,),
    "guidance_scale": (1.0,),
    "watermarking_config": (),
}


def _refuse(name: str, message: str, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(
        f"generation_config.{name}: {message}", param=f"generation_config.{name}", code=code
    )


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (low_open and value == low):
        if high == math.inf:
            wanted = f"a number {'above' if low_open else 'of at least'} {low}"
        else:
            wanted = f"a number within {'(' if low_open else '['}{low}, {high}]"
        raise _refuse(name, f"expected {wanted}, got {value!r}.")
    return float(value)


def _integer(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _refuse(name, f"expected an integer of at least {low}, got {value!r}.")
    return value


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    return tuple(_integer(name, v, 0) for v in ids)


def _stop_strings(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _refuse("stop_strings", "expected a non-empty string or a list of them.")
    if len(stops) > MAX_STOP_STRINGS:
        raise _refuse("stop_strings", f"at most {MAX_STOP_STRINGS} stop strings are allowed.")
    return stops


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    # Booleans only equal booleans: ``num_beams: true`` is not ``num_beams: 1``.
    return any(
        value is off if isinstance(off, bool) or isinstance(value, bool) else value == off for off in offs
    )


def parse_generation_config(raw: str | dict[str, Any]) -> dict[str, Any]:
    """The config as an object, its fields checked against GenerationConfig's; None values
    dropped (None is "unset" there)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(
                f"generation_config is not valid JSON: {exc}", param="generation_config"
            ) from exc
    if not isinstance(raw, dict):
        raise InvalidRequest("generation_config must be a JSON object.", param="generation_config")
    config = {k: v for k, v in raw.items() if v is not None}
    for name, value in config.items():
        if name in _NO_OPS or name in _MAPPED:
            continue
        if name not in _OFF_VALUES:
            raise _refuse(name, "not a GenerationConfig field.", "unknown_parameter")
        if name == "max_length" and "max_new_tokens" in config:
            continue
        if not _is_off(value, _OFF_VALUES[name]):
            offs = " or ".join(json.dumps(off) for off in (None, *_OFF_VALUES[name]))
            hint = "; use max_new_tokens" if name == "max_length" else ""
            message = f"not supported by this server; accepted only when off ({offs}){hint}."
            raise _refuse(name, message, "unsupported_parameter")
    return config


def apply_generation_config(req: GenerationFields) -> None:
    """Fold the request's ``generation_config`` into its own fields (those it did not set itself).
    Leaves the parsed config in ``req.generation_config`` for what needs the model (below)."""
    if req.generation_config is None:
        return
    config = parse_generation_config(req.generation_config)
    req.generation_config = config
    explicit = set(req.model_fields_set)

    def put(field: str, value: Any) -> None:
        if field not in explicit:
            setattr(req, field, value)

    if "max_new_tokens" in config and not {"max_tokens", "max_completion_tokens"} & explicit:
        req.max_tokens = _integer("max_new_tokens", config["max_new_tokens"], 1)
    if "temperature" in config:
        put("temperature", _number("temperature", config["temperature"], 0.0))
    if "top_p" in config:
        put("top_p", _number("top_p", config["top_p"], 0.0, 1.0, low_open=True))
    if "top_k" in config:
        put("top_k", _integer("top_k", config["top_k"], 0))
    if "min_p" in config:
        put("min_p", _number("min_p", config["min_p"], 0.0, 1.0))
    if "repetition_penalty" in config:
        penalty = _number("repetition_penalty", config["repetition_penalty"], 0.0, 10.0, low_open=True)
        put("repetition_penalty", penalty)
    if "stop_strings" in config:
        put("stop", _stop_strings(config["stop_strings"]))
    if "eos_token_id" in config:
        config["eos_token_id"] = _token_ids("eos_token_id", config["eos_token_id"])
    sample = config.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise _refuse("do_sample", f"expected a boolean, got {sample!r}.")
    if sample is False:
        req.temperature = 0.0  # greedy, whatever the temperature (see the module's note)


def config_temperature(req: GenerationFields, bundle: ModelBundle) -> float:
    """The request's temperature, else the model's default; but ``do_sample: true`` asked of a
    model that decodes greedily by default samples at transformers' default temperature, 1."""
    if req.temperature is not None:
        return req.temperature
    if bundle.default_temperature == 0.0 and _config(req).get("do_sample") is True:
        return 1.0
    return bundle.default_temperature


def config_stop_token_ids(req: GenerationFields, bundle: ModelBundle) -> tuple[int, ...]:
    """The model's end-of-sequence ids, or the config's ``eos_token_id``, which replace them (as in
    transformers); none with ``ignore_eos``."""
    if req.ignore_eos:
        return ()
    eos = _config(req).get("eos_token_id")
    if eos is None:
        return bundle.stop_token_ids
    vocab = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
    if any(t >= vocab for t in eos):
        raise _refuse("eos_token_id", f"token ids must be below the vocabulary size of {vocab}.")
    return tuple(eos)


def _config(req: GenerationFields) -> dict[str, Any]:
    """The config as :func:`apply_generation_config` left it (parsed), or an empty one."""
    return req.generation_config if isinstance(req.generation_config, dict) else {}
