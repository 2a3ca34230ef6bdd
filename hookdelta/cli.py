"""The `hookdelta` command line: inspect a model with a delta, merge a delta into a
transformers checkpoint, convert between hookdelta's and PEFT's formats, report where it learned,
pick the layers to adapt in a browser page.

Bad paths and files that do not fit give one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never reach for a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # (loading a GGUF file draws a progress bar on stderr otherwise)
# stderr is for our one-line errors: quiet what optional libraries log while transformers imports them
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch  # noqa: E402  (after the environment above: transformers reads it when imported)
import transformers  # noqa: E402
from rich.progress import Progress  # noqa: E402

import hookdelta as hd  # noqa: E402

from .errors import HookdeltaError  # noqa: E402
from .quantized import is_quantized  # noqa: E402


class CLIError(Exception):
    """A user mistake: reported in one line."""


def load_model(model_dir: str) -> Any:
    """A transformers model from a local directory, as the class its config names, or from a
    GGUF file (or a directory holding one GGUF file and no config.json), dequantized."""
    transformers.utils.logging.disable_progress_bar()  # stderr is for errors only
    path = Path(model_dir)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").is_file() else []
    if path.suffix == ".gguf" and path.is_file() or len(ggufs) == 1:
        gguf = path if path.is_file() else ggufs[0]
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
    if not (path / "config.json").is_file():
        several = f"; it holds {len(ggufs)} GGUF files: name one" if ggufs else ""
        raise CLIError(f"{model_dir} is not a transformers model directory (no config.json){several}")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(model_dir, local_files_only=True)


def is_peft_dir(directory: str) -> bool:
    return (Path(directory) / "adapter_config.json").is_file()


def check_dir(directory: str) -> None:
    if not Path(directory).is_dir():
        raise CLIError(f"{directory} is not a directory")


def load_any(model: Any, directory: str) -> Any:
    """A hookdelta or PEFT delta directory, whichever it is."""
    check_dir(directory)
    return hd.load_peft(model, directory) if is_peft_dir(directory) else hd.load(model, directory)


def inspect(args: argparse.Namespace) -> None:
    if args.delta:
        check_dir(args.delta)
    model = load_model(args.model_dir)
    if args.delta:
        load_any(model, args.delta)
    hd.visualize(model, depth=args.depth, show_params=not args.no_params)


def merge(args: argparse.Namespace) -> None:
    check_dir(args.delta_dir)
    with Progress(transient=False) as progress:
        task = progress.add_task("loading the model", total=4)
        model = load_model(args.model_dir)
        progress.update(task, advance=1, description="loading the delta")
        delta = load_any(model, args.delta_dir)
        progress.update(task, advance=1, description="merging")
        if args.dtype or any(is_quantized(m) for m in model.modules()):
            # a quantized base (QLoRA) is written dequantized, in full precision, with the delta baked in
            model = delta.merged_copy(getattr(torch, args.dtype or "bfloat16"))
        else:
            delta.merge_and_detach()
        progress.update(task, advance=1, description=f"writing {args.out_dir}")
        model.save_pretrained(args.out_dir)
        copy_side_files(args.model_dir, args.out_dir)
        progress.update(task, advance=1, description="done")
    print(f"merged {args.delta_dir} into {args.model_dir} -> {args.out_dir}")


# what a serving stack (vLLM, TGI, transformers' pipeline) reads beside the weights and config
SIDE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer, chat template and generation files of `src` into `dst` (not over
    what save_pretrained just wrote), so the merged folder serves as the original did."""
    import fnmatch
    import shutil

    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (
            os.path.isfile(path)
            and any(fnmatch.fnmatch(name, p) for p in SIDE_FILES)
            and not os.path.exists(os.path.join(dst, name))
        ):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def convert(args: argparse.Namespace) -> None:
    check_dir(args.src)
    if args.to != "lora" and (args.to == "peft") == is_peft_dir(args.src):
        raise CLIError(f"{args.src} is already in {args.to} format")
    if args.to != "lora" and (args.rank is not None or args.tolerance is not None):
        raise CLIError("--rank and --tolerance are for --to lora")
    model = load_model(args.base)
    delta = load_any(model, args.src)
    if args.to == "lora":  # any mergeable delta as a plain LoRA, written in PEFT's format
        tolerance = args.tolerance if args.tolerance is not None or args.rank is not None else 1e-3
        lora = delta.as_lora(rank=args.rank, tolerance=tolerance)
        lora.save_peft(args.dst, overwrite=args.overwrite)
        worst = max(lora.conversion.items(), key=lambda kv: kv[1][1])
        ranks = sorted({r for r, _ in lora.conversion.values()})
        print(
            f"converted {args.src} -> {args.dst} (a LoRA in PEFT's format; ranks {ranks[0]}..{ranks[-1]}, largest "
            f"relative error {worst[1][1]:.2e} at {worst[0]})"
        )
        return
    if args.to == "peft":
        delta.save_peft(args.dst, overwrite=args.overwrite)
    else:
        delta.save(args.dst, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.dst} ({args.to})")


def report(args: argparse.Namespace) -> None:
    from .reporting import report as write

    model = load_model(args.base)
    delta = load_any(model, args.delta_dir)
    print(f"wrote {write(delta, args.out)}")


def pick(args: argparse.Namespace) -> None:
    import json

    from .picker import pick as run
    from .picker import python_text

    model = load_model(args.model)
    config = run(model, args.method, args.r, port=args.port, open_browser=not args.no_browser)
    if config is None:
        print("nothing was picked")
        return
    print(f"import hookdelta as hd\nconfig = {python_text(config)}")
    print(json.dumps(config.to_dict()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hookdelta", description="Inspect, merge and convert hookdelta deltas.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="print the model's tree with the delta on it")
    i.add_argument("model_dir")
    i.add_argument("--delta", help="a hookdelta or PEFT delta directory")
    i.add_argument("--depth", type=int, default=None)
    i.add_argument("--no-params", action="store_true", help="hide the parameter shapes")
    i.set_defaults(run=inspect)
    m = sub.add_parser("merge", help="bake a delta into the weights and write a transformers checkpoint")
    m.add_argument("model_dir")
    m.add_argument("delta_dir")
    m.add_argument("out_dir")
    m.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="write the merged model in this dtype (default: the model's own; bfloat16 for a quantized base)",
    )
    m.set_defaults(run=merge)
    c = sub.add_parser("convert", help="convert a delta between hookdelta's and PEFT's formats, or into a LoRA")
    c.add_argument("--to", choices=["peft", "hookdelta", "lora"], required=True)
    c.add_argument("--rank", type=int, default=None, help="--to lora: the LoRA's rank (default: --tolerance 1e-3)")
    c.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="--to lora: the largest relative error per layer (the smallest rank within it)",
    )
    c.add_argument("--base", required=True, help="the base model directory (to check the delta fits)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(run=convert)
    r = sub.add_parser("report", help="write an HTML page of where a delta learned (update norms by layer and role)")
    r.add_argument("delta_dir")
    r.add_argument("--base", required=True, help="the base model directory")
    r.add_argument("-o", "--out", default="report.html")
    r.set_defaults(run=report)
    k = sub.add_parser("pick", help="choose the layers to adapt in a browser page; prints the config")
    k.add_argument("model", help="a transformers model directory or a GGUF file")
    k.add_argument("--method", default="lora", help="the delta method (default lora)")
    k.add_argument("-r", type=int, default=8, help="the rank (default 8)")
    k.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default: a free one)")
    k.add_argument("--no-browser", action="store_true", help="only print the page's address")
    k.set_defaults(run=pick)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (CLIError, HookdeltaError, OSError, ValueError) as exc:
        print(f"hookdelta {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
