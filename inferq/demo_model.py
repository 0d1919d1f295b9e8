"""Where the shipped demo model is: ``models/demo.gguf``, a tiny Llama trained on Python's stdlib.

A checkout (or an editable install) finds it next to the packages; a wheel
install carries it as data under ``<prefix>/share/inferq``. The model card is
``models/README.md``; ``models/train_demo.py`` remakes it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NAME = "demo"
FILE = "demo.gguf"


def candidates() -> list[Path]:
    override = os.environ.get("INFERQ_DEMO_MODEL")
    if override:
        return [Path(override)]
    return [Path(__file__).resolve().parent.parent / "models" / FILE, Path(sys.prefix) / "share" / "inferq" / FILE]


def path() -> Path:
    """The demo model's file; FileNotFoundError names every place looked in."""
    places = candidates()
    for candidate in places:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in places)
    raise FileNotFoundError(f"the demo model is not in this install (looked in {looked}); "
                            "pass --model NAME=PATH or set INFERQ_DEMO_MODEL")
