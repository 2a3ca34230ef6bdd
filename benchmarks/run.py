"""hookdelta's benchmark suite: hookdelta against PEFT and the bare model, in the same process,
contenders interleaved, medians and ratios reported.

    python -m benchmarks.run            # full run (RESULTS.md), under 15 minutes on 2 cores
    python -m benchmarks.run --quick    # smaller shapes, fewer repeats (~2 minutes)
    python -m benchmarks.run --only B1,B7
    python -m benchmarks.run --device cuda --dtype bfloat16   # one GPU: a 1.1B Llama, the GPU rows

Writes benchmarks/results/latest.json and latest.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py` works as well as `python -m benchmarks.run`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import fused, inference, lifecycle, quantized, training  # noqa: E402
from benchmarks.common import PROFILES, TARGET, Profile, Row, configure  # noqa: E402

ROWS = {
    f.__name__.split("_")[0].upper(): f
    for f in inference.ROWS + training.ROWS + lifecycle.ROWS + quantized.ROWS + fused.ROWS
}
ORDER = sorted(ROWS, key=lambda k: int(k[1:]))
# the rest are CPU / bitsandbytes rows; B16 (three models compiled with CUDA graphs) runs on a GPU
# with --only B16, outside the default set, which must finish in under 5 minutes
GPU_ROWS = ["B1", "B2", "B3", "B4", "B8", "B10", "B11", "B13", "B14", "B15"]


def machine() -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = TARGET["device"]
    if device.type == "cuda":
        cpu = f"{torch.cuda.get_device_name(device)} (host {cpu})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "dtype": str(TARGET["dtype"]).removeprefix("torch."),
        "device": device.type,
    }


def verdict(met: bool | None) -> str:
    return {True: "[green]met[/]", False: "[red]missed[/]", None: "report"}[met]


def cell_times(row: Row) -> str:
    return "\n".join(
        f"{k}: {v.median * 1e3:.3g} ms ({v.low * 1e3:.3g}-{v.high * 1e3:.3g})" for k, v in row.times.items()
    )


def cell_ratios(row: Row) -> str:
    lines = []
    for r in row.ratios:
        target = f" (target <= {r.target:.2f}x)" if r.target is not None else ""
        lines.append(f"{r.name} = {r.value:.3f}x{target}")
    lines += [f"{k}: {'yes' if v else 'NO'}" for k, v in row.checks.items()]
    lines += [f"{k}: {v}" for k, v in row.extra.items()]
    return "\n".join(lines)


def table(rows: list[Row]) -> Table:
    t = Table(title="hookdelta benchmarks (median ms per call, min-max over interleaved rounds)", show_lines=True)
    for col in ("id", "what / setup", "median (min-max)", "ratios and checks", "target"):
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(row.id, f"{row.what}\n[dim]{row.setup}[/]", cell_times(row), cell_ratios(row), verdict(row.met))
    return t


def markdown(rows: list[Row], info: dict[str, Any], profile: Profile, seconds: float) -> str:
    out = [
        f"Profile `{profile.name}`, {seconds:.0f} s in all. Machine: {info['cpu']}, {info['cores']} cores, "
        f"torch.set_num_threads({info['torch_threads']}); Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}; {info['dtype']} on {info['device']}.",
        "",
        "| id | what | setup | median ms (min-max) | ratios and checks | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        times = "<br>".join(
            f"{k}: {v.median * 1e3:.3g} ({v.low * 1e3:.3g}-{v.high * 1e3:.3g})" for k, v in row.times.items()
        )
        ratios = cell_ratios(row).replace("\n", "<br>").replace("|", "/")
        met = {True: "met", False: "**missed**", None: "report"}[row.met]
        out.append(f"| {row.id} | {row.what} | {row.setup} | {times} | {ratios} | {met} |")
    return "\n".join(out) + "\n"


def save(out: str, rows: list[Row], info: dict[str, Any], profile: Profile, seconds: float, failed: list[str]) -> None:
    """Write latest.json and latest.md under `out`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(
            {
                "profile": profile.name,
                "machine": info,
                "seconds": seconds,
                "failed": failed,
                "rows": [r.as_dict() for r in rows],
            },
            f,
            indent=1,
        )
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(markdown(rows, info, profile, seconds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hookdelta vs PEFT vs the bare model")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (~2 minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: only checks that every row runs")
    ap.add_argument("--only", default="", help="comma-separated row ids, e.g. B1,B7")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU profile, a 1.1B Llama")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    configure(args.device, args.dtype)
    gpu = TARGET["device"].type == "cuda"
    profile = PROFILES[
        "smoke" if args.smoke else ("gpu-quick" if gpu else "quick") if args.quick else "gpu" if gpu else "full"
    ]
    wanted = [x.strip().upper() for x in args.only.split(",") if x.strip()] or (GPU_ROWS if gpu else ORDER)
    unknown = [x for x in wanted if x not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {ORDER}")
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 170)
    info = machine()
    console.print(f"profile {profile.name}: {info}")
    start, rows, failed = time.time(), [], []
    for row_id in wanted:
        t0 = time.time()
        try:
            row = ROWS[row_id](profile)
        except Exception:  # noqa: BLE001 (one broken row must not hide the others' numbers)
            failed.append(row_id)
            console.print(f"[red]{row_id} failed:[/]\n{traceback.format_exc()}")
            continue
        row.extra["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        console.print(f"{row_id} done in {time.time() - t0:.0f} s")
        save(args.out, rows, info, profile, time.time() - start, failed)  # after each row: a cut-off run keeps its rows
    seconds = time.time() - start
    console.print(table(rows))
    save(args.out, rows, info, profile, seconds, failed)
    missed = [r.id for r in rows if r.met is False]
    console.print(
        f"{len(rows)} rows in {seconds:.0f} s; targets missed: {missed or 'none'}; failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
