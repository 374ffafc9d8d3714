"""Convert a ``.gguf`` file once into a plain Hugging Face folder, and reuse it afterwards.

Loading a GGUF with transformers de-quantises every tensor (~40 s for SmolLM2-135M on a small CPU)
and gives a model that refuses ``save_pretrained``. So lorakit converts it once into

    <cache>/gguf/<stem>-<key>/   config.json, model.safetensors (fp32), tokenizer files,
                                 chat_template.jinja, generation_config.json, lorakit-source.json

where ``<key>`` hashes the file's name, size and modification time: replacing the file gives a new
entry. The folder is built in a temporary folder next to the target and renamed into place, so a
crash never leaves a half-written cache entry, and a file lock keeps concurrent processes (e.g. the
ranks of a torchrun job) from converting the same file twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.models.quiet import quiet_progress

CACHE_ENV = "LORAKIT_CACHE"
# Bump when the layout of a cache entry changes, so that old entries are not reused.
CACHE_FORMAT = 1
SOURCE_FILE = "lorakit-source.json"


def default_cache_dir() -> Path:
    """``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lorakit"


def cache_entry(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """The folder a GGUF file converts into (it may not exist yet)."""
    stat = gguf_path.stat()
    fingerprint = f"{CACHE_FORMAT}|{gguf_path.name}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{gguf_path.stem}-{key}"


def converted_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF folder for ``gguf_path``, converting the file first if it is not cached yet."""
    from filelock import FileLock  # a dependency of huggingface_hub, hence always there with transformers

    source = Path(gguf_path).expanduser().resolve()
    target = cache_entry(source, cache_dir)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / SOURCE_FILE).is_file():  # another process finished while we waited
            return target
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert_gguf(source, building)
            stat = source.stat()
            record = {"gguf": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            record["format"] = CACHE_FORMAT
            # Written last: its presence marks a complete entry.
            (building / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            if target.exists():  # a folder without SOURCE_FILE is incomplete (e.g. copied by hand)
                shutil.rmtree(target)
            os.replace(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Write ``gguf_path`` as a plain HF causal-LM folder into ``folder`` (which must exist).

    Weights are saved in fp32: that is what de-quantisation produces, so nothing is lost; the
    requested dtype is applied when the folder is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress(capture_stderr=True):
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
        )
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        # A GGUF-loaded model carries a "gguf" quantization_config and refuses save_pretrained;
        # rebuild a plain model of the same config and copy the (already de-quantised) weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        # Tied embeddings (SmolLM2 ties lm_head to embed_tokens) are tied by the model itself from
        # config.tie_word_embeddings; save_pretrained then stores the shared tensor once.
        plain.tie_weights()
        plain.save_pretrained(folder)
        if gguf_model.generation_config is not None:
            gguf_model.generation_config.save_pretrained(folder)
        # Saves chat_template.jinja alongside the tokenizer files.
        tokenizer.save_pretrained(folder)
