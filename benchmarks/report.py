"""Run the CPU benchmarks and write ``benchmarks/results/<machine>-<date>.md`` plus PNG plots.

``python -m benchmarks.report`` (small and SmolLM2-like shapes, every routing; about 25 minutes on 2 cores);
``--shapes qwen3 --rounds 1 --backends cpu --no-curves`` for the Qwen3-like shape (about 25 minutes), ``--quick``
for one round and no memory. Variants run interleaved in one process, round after round after one warm-up each,
so a slow spell of the machine hits them all alike; times are medians. Peak memory comes from a fresh process per
variant.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import statistics
import time

import torch

from benchmarks.arguments import positive_int
from benchmarks.memory import measure as peak_memory
from benchmarks.variants import DTYPES, ROUTINGS, SHAPES, make_inputs, steps

CURVE_N = (512, 1024, 2048, 4096, 8192)
CURVE_SHAPE = (256, 32_000)  # H, V of the memory/time-vs-N curves


def median_seconds(fns: dict, rounds: int) -> dict:
    """name -> median seconds, the variants interleaved round by round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_table(shapes, routings, rounds, backends, memory=True, dtypes=("fp32",)):
    """One row per (dtype, shape, routing, variant); ratios are within the same dtype (bf16 against bf16's own
    GEMM floor, peers fed bf16 inputs too)."""
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            rows += _case_rows(dtype, shape, routings, rounds, backends, memory)
    return rows


def _case_rows(dtype, shape, routings, rounds, backends, memory):
    rows = []
    n, h, v = SHAPES[shape]
    for routing in routings:
        runs = steps(make_inputs(n, h, v, ROUTINGS[routing], dtype=DTYPES[dtype]), backends=backends)
        timed = median_seconds(runs, rounds)
        mem = {name: peak_memory(name, n, h, v, routing, dtype) for name in runs} if memory else {}
        for name, secs in timed.items():
            rows.append(dict(dtype=dtype, shape=shape, routing=routing, variant=name, seconds=secs,
                             floor_ratio=secs / timed["gemm floor"], vs_fused=secs / timed["fused cpu"],
                             peak_mb=mem.get(name, float("nan")) / 2 ** 20,
                             mem_vs_ref=mem.get(name, float("nan")) / max(mem.get("reference", 1), 1)))
        print(f"  {dtype} {shape} {routing}: " + ", ".join(f"{k} {t:.3f}s" for k, t in timed.items()), flush=True)
    return rows


def markdown(rows, command, date) -> str:
    head = ["| dtype | shape (N, H, V) | routing | variant | median s | / GEMM floor | / fused cpu | peak extra MB "
            "| memory / reference |", "|---|---|---|---|---|---|---|---|---|"]
    body = [f"| {r['dtype']} | {r['shape']} {SHAPES[r['shape']]} | {r['routing']} | {r['variant']} | "
            f"{r['seconds']:.3f} | {r['floor_ratio']:.2f} | {r['vs_fused']:.2f} | {r['peak_mb']:.0f} | {r['mem_vs_ref']:.3f} |"
            for r in rows]
    return "\n".join([f"Machine: {machine()}; date: {date}; command: `{command}`", ""] + head + body) + "\n"


def curves(out_dir: pathlib.Path, stem: str, rounds: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, v = CURVE_SHAPE
    data = {name: {"time": [], "mem": []} for name in ("fused cpu", "reference", "gemm floor")}
    for n in CURVE_N:
        runs = steps(make_inputs(n, h, v, ROUTINGS["half"]), backends=("cpu",))
        timed = median_seconds({name: runs[name] for name in data}, rounds)
        for name in data:
            data[name]["time"].append(timed[name])
            data[name]["mem"].append(peak_memory(name, n, h, v, "half") / 2 ** 20)
        print(f"  curve N={n} done", flush=True)
    paths = []
    for key, ylabel, title in (("mem", "peak extra MB", "Peak memory vs N"), ("time", "seconds", "Time vs N")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name in ("fused cpu", "reference") if key == "mem" else data:
            ax.plot(CURVE_N, data[name][key], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel=ylabel,
               title=f"{title} (H={h}, V={v}, half SDPO, fwd+bwd)")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / f"{stem}-{key}-vs-n.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(CURVE_N, [f / g for f, g in zip(data["fused cpu"]["time"], data["gemm floor"]["time"])], marker="o")
    ax.axhline(1.15, ls="--", c="gray", label="target 1.15")
    ax.set(xscale="log", xlabel="N (tokens)", ylabel="fused / GEMM floor", title="Ratio to the GEMM floor")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-floor-ratio.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    table = ["| N | fused cpu MB | reference MB | fused / floor |", "|---|---|---|---|"]
    table += [f"| {n} | {data['fused cpu']['mem'][i]:.0f} | {data['reference']['mem'][i]:.0f} | "
              f"{data['fused cpu']['time'][i] / data['gemm floor']['time'][i]:.2f} |" for i, n in enumerate(CURVE_N)]
    return paths, "\n".join(table) + "\n"


def output_place(out: pathlib.Path, shapes, date: str):
    """(folder, file stem) of the report: `out` itself where it names a .md file, else <machine>-<date>[-shapes]
    inside the folder `out`."""
    if out.suffix == ".md":
        return out.parent, out.stem
    suffix = "" if list(shapes) == ["small", "smollm2"] else "-" + "-".join(shapes)
    return out, f"{platform.node() or 'machine'}-{date}{suffix}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["small", "smollm2"], choices=list(SHAPES))
    p.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=list(ROUTINGS))
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--backends", nargs="+", default=["cpu", "torch"], choices=["cpu", "torch"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="input dtypes; each is compared with its own GEMM floor")
    p.add_argument("--no-curves", action="store_true", help="skip the memory/time-vs-N curves")
    p.add_argument("--quick", action="store_true", help="one round, no memory, no curves")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results",
                   help="a folder (the table is named <machine>-<date>.md there) or a .md file; plots go beside it")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    rounds = 1 if a.quick else a.rounds
    date = datetime.date.today().isoformat()
    command = "python -m benchmarks.report " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    out_dir, stem = output_place(a.out, a.shapes, date)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(run_table(a.shapes, a.routings, rounds, tuple(a.backends), memory=not a.quick,
                              dtypes=tuple(a.dtypes)), command.strip(), date)
    if not (a.quick or a.no_curves):
        paths, curve_table = curves(out_dir, stem, rounds)
        text += "\nMemory and time vs N:\n\n" + curve_table + "\n" + "\n".join(f"![]({p.name})" for p in paths) + "\n"
    path = out_dir / f"{stem}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
