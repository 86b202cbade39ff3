"""`melo preset`: show the MELO preset derived for a backbone, as TOML a user can review and pin.

The output is the ``[melo]`` table the daemon would use (key module, target modules, rank, edits per
block and the calibrated radius), with comments saying how the layout was found and what the
radius was calibrated on. Pasting it into the settings file pins it: a later transformers version
or a changed calibration can then no longer move it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from daemon.settings import Settings

# What a scope-keyed preset adds (docs/generality.md).
SCOPE_FIELDS = ("key_source", "key_encoder", "train_chat_form")
PINNED_FIELDS = ("key_module", "target_modules", "rank_per_block", "r_init", "edits_per_block")


def register_cli(sub: Any) -> None:
    """Add `melo preset` to the `melo` CLI."""
    parser = sub.add_parser(
        "preset",
        help="print the MELO preset derived for a backbone (TOML)",
        description="Load a backbone (shipped name, checkpoint directory, .gguf file or hf:<org>/<name>) and print "
        "the [melo] table the daemon would derive for it.",
    )
    parser.add_argument("--config", help="TOML settings file: its backbone, task, labels, dtype and device are the defaults")
    parser.add_argument("--backbone", help="backbone to inspect (default: the settings' backbone)")
    parser.add_argument("--task", choices=("generate", "classify"), help="default: what the checkpoint is")
    parser.add_argument("--labels", help="comma-separated class names (classifiers without labels of their own)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: cpu)")
    parser.set_defaults(func=cmd_preset)


def cmd_preset(args: argparse.Namespace) -> int:
    """Print the derived preset; exit 2 with the reason when the backbone cannot load or has no preset."""
    from melo_runtime.backbones import load_backbone
    from melo_runtime.presets import derive_preset

    settings = Settings.load(Path(args.config)) if args.config else None
    backbone = args.backbone or (settings.backbone if settings else None)
    if not backbone:
        print("melo preset: give --backbone PATH (or --config with a backbone)")
        return 2
    labels = [part.strip() for part in args.labels.split(",")] if args.labels else (settings.labels if settings else None)
    task = args.task or (settings.task if settings and (args.backbone is None) else None)
    try:
        model, _ = load_backbone(
            backbone,
            task=task,
            labels=labels or None,
            dtype=args.dtype or (settings.dtype if settings else "auto"),
            device=args.device or (settings.device if settings else "cpu"),
            trust_remote_code=bool(settings and settings.trust_remote_code),
        )
        preset = derive_preset(model, task)
    except (ValueError, OSError) as error:
        print(f"melo preset: {error}")
        return 2
    print(preset_toml(backbone, model, preset))
    return 0


def preset_toml(backbone: str, model: Any, preset: Any) -> str:
    """The preset as commented TOML (a ``[melo]`` table)."""
    config = preset.config.to_dict()
    dtype = str(model.dtype).removeprefix("torch.")
    lines = [
        f"# MELO preset for {backbone}: {type(model).__name__}, {dtype}, task {config['task']}",
        f"# layout {preset.layout}: layer stack {preset.stack} ({preset.depth} layers)",
        f"# r_init = {preset.calibration()}",
        "# Paste this table into the settings file to pin the preset.",
        "[melo]",
    ]
    pinned = PINNED_FIELDS + (SCOPE_FIELDS if config.get("key_source") == "scope" else ())
    lines += [f"{name} = {_toml_value(config[name])}" for name in pinned]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    # JSON strings, numbers and lists of strings are valid TOML values.
    return json.dumps(value)
