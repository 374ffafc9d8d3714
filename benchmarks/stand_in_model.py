"""A stand-in for a built-in model on a machine its package cannot reach: the same architecture, config and
tokenizer, seeded random weights. The device machine takes 64 MiB of files per call and has no package
index, while SmolLM2's GGUF alone is 94 MB; timings, memory and agreement with peft depend on the shapes,
not on what the weights learnt.

    .venv/bin/python benchmarks/stand_in_model.py pack smollm2-135m-instruct .gpu/smollm2   # here: ~4 MB
    python benchmarks/stand_in_model.py build .gpu/smollm2 /tmp/smollm2-stand-in             # there

``pack`` copies everything of the model folder but its weights; ``build`` writes a loadable folder
(``load_causal_lm(folder)``) with weights drawn by the model's own initialiser under seed 0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def pack(name: str, target: Path) -> list[str]:
    """Copy the config and tokenizer files of built-in model ``name`` into ``target``; their names."""
    from lorakit.models import model_folder
    from lorakit.models.gguf_cache import SOURCE_FILE  # which GGUF the weights came from: not these

    source = model_folder(name)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != SOURCE_FILE:
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    if "config.json" not in copied:
        raise FileNotFoundError(f"{source} has no config.json")
    return copied


def build(packed: Path, target: Path, seed: int = 0) -> Path:
    """A model folder at ``target``: ``packed``'s files plus random weights (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new folder")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(packed))
    shutil.copytree(packed, target)
    model.save_pretrained(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="config + tokenizer of a built-in model, no weights")
    packing.add_argument("name")
    packing.add_argument("target", type=Path)
    building = commands.add_parser("build", help="a loadable folder with seeded random weights")
    building.add_argument("packed", type=Path)
    building.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(", ".join(pack(args.name, args.target)))
    else:
        print(build(args.packed, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
