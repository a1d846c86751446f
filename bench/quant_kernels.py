"""Quantized linear kernels against bf16 nn.Linear, per layer shape of the default model.

    nice -n 5 python bench/quant_kernels.py            # ~1-2 min on 2 cores
    nice -n 5 python bench/quant_kernels.py --threads 1

1. Per layer shape (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, LM head 49152x576) and
   rows M in 1, 8, 32, 64, 128, µs per call of:
     bf16           F.linear on a bf16 weight (today's path)
     aten-int8      torch's _weight_int8pack_mm (int8 per channel)
     aten-int4      torch's _weight_int4pack_mm_for_cpu (int4, groups of 32)
     native-int8    csrc/quant_linear.cpp's kernel (int8 per channel)
     native-int4    the same kernel, int4 groups of 32 (fp16 scale + offset)
     dequant-int4   the native dequantize to bf16 W^T + torch's bf16 GEMM
     QuantLinear    what radixrt.model.quant.QuantLinear (int4) picks for that M
   Each layer is called back to back ("hot": its weights sit in L2/L3, as MEASURED.md measured), the
   contenders interleaved round by round; best round. GB/s at M=1 = weight bytes / time.
2. One decode step's GEMMs "cold": all 30 layers + the LM head with distinct weights, in order, so
   the weights stream from DRAM as in a real step (the int4 model is 84 MB, L3 32 MB).

Table to stdout, JSON to bench/results/quant_kernels.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

from radixrt import _native  # noqa: E402
from radixrt.model.quant import QuantLinear, _TorchWeight, pack, quantize_int4, quantize_int8  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
PER_STEP = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "lm_head": 1}
ROWS = (1, 8, 32, 64, 128, 256, 384, 512)
NEVER = 2**62  # dequantize_min_rows that keeps the native kernel at every M (0: always dequantize)
WEIGHT_FORM = {"bf16": "bf16", "aten-int8": "int8", "aten-int4": "int4", "native-int8": "int8",
               "native-int4": "int4", "dequant-int4": "int4", "QuantLinear": "int4"}  # fmt: skip


def best_of(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Best µs per call over `rounds` rounds, every contender once per round in turn."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / inner * 1e6)
    return best


class Contenders:
    """One layer shape in every form."""

    def __init__(self, n: int, k: int, ops) -> None:
        w = torch.randn(n, k) * 0.05
        self.bf16 = w.to(torch.bfloat16)
        self.q4, self.q8 = quantize_int4(w, 32), quantize_int8(w)
        self.aten8, self.aten4 = _TorchWeight(self.q8, torch.bfloat16), _TorchWeight(self.q4, torch.bfloat16)
        self.p4, self.p8 = pack(self.q4), pack(self.q8)
        self.module = QuantLinear(self.q4, dtype=torch.bfloat16)
        self.n, self.k, self.ops = n, k, ops
        self.bytes = {
            "bf16": w.numel() * 2,
            "int8": self.q8.q.numel() + self.q8.scales.numel() * 4,
            "int4": self.q4.q.numel() // 2 + self.q4.scales.numel() * 4,
        }

    def calls(self, x: torch.Tensor) -> dict:
        n, k, ops = self.n, self.k, self.ops
        fns = {
            "bf16": lambda: F.linear(x, self.bf16),
            "aten-int8": lambda: self.aten8.matmul(x),
            "aten-int4": lambda: self.aten4.matmul(x),
        }
        if ops is not None:
            fns["native-int8"] = lambda: ops.quant_linear(x, *self.p8, None, n, 8, k, NEVER)
            fns["native-int4"] = lambda: ops.quant_linear(x, *self.p4, None, n, 4, 32, NEVER)
            fns["dequant-int4"] = lambda: ops.quant_linear(x, *self.p4, None, n, 4, 32, 0)
            fns["QuantLinear"] = lambda: self.module(x)
        return fns


def per_layer(ops, quick: bool) -> list[dict]:
    rows_out = []
    for name, (n, k) in SHAPES.items():
        layer = Contenders(n, k, ops)
        for m in ROWS:
            x = torch.randn(m, k).to(torch.bfloat16)
            big = n * k * max(m, 8) > 100_000_000
            times = best_of(layer.calls(x), rounds=3 if big or quick else 7, inner=1 if big else 5)
            row = {"layer": name, "M": m, **{c: round(t, 1) for c, t in times.items()}}
            if m == 1:
                for c, t in times.items():
                    row[f"GB/s {c}"] = round(layer.bytes[WEIGHT_FORM[c]] / t / 1e3, 1)
            rows_out.append(row)
            print(f"  {name} M={m}: " + ", ".join(f"{c} {t:.0f}" for c, t in times.items()), flush=True)
    return rows_out


def step_totals(rows: list[dict]) -> list[dict]:
    """All GEMMs of one decode step (hot per-layer times x layers), ms."""
    contenders = [c for c in rows[0] if c not in ("layer", "M") and not c.startswith("GB/s")]
    out = []
    for m in ROWS:
        at_m = [r for r in rows if r["M"] == m]
        total = {c: sum(r[c] * PER_STEP[r["layer"]] for r in at_m) / 1000 for c in contenders}
        fastest = min(total, key=total.get)
        out.append({"M": m, **{c: round(v, 2) for c, v in total.items()}, "fastest": fastest})
    return out


def cold_step(ops, rounds: int) -> list[dict]:
    """One decode step's GEMMs through distinct weights, in model order, M = 1 and 8 (ms)."""
    layers = [(n, k) for _ in range(30) for name, (n, k) in SHAPES.items() if name != "lm_head"]
    layers.append(SHAPES["lm_head"])
    forms: dict[str, list] = {"bf16": [], "native-int4": [], "native-int8": []}
    for n, k in layers:
        w = torch.randn(n, k) * 0.05
        forms["bf16"].append(w.to(torch.bfloat16))
        if ops is not None:
            forms["native-int4"].append(QuantLinear(quantize_int4(w), dtype=torch.bfloat16))
            forms["native-int8"].append(QuantLinear(quantize_int8(w), dtype=torch.bfloat16))
    weight_bytes = {
        "bf16": sum(n * k * 2 for n, k in layers),
        "native-int4": sum(n * k // 2 + n * k // 32 * 4 for n, k in layers),
        "native-int8": sum(n * k + n * 4 for n, k in layers),
    }
    out = []
    for m in (1, 8):
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (576, 1536)}

        def run(form: str) -> None:
            for (n, k), weight in zip(layers, forms[form]):
                F.linear(xs[k], weight) if form == "bf16" else weight(xs[k])

        fns = {form: (lambda form=form: run(form)) for form in forms if forms[form]}
        times = best_of(fns, rounds=rounds, inner=1)
        for form, t in times.items():
            gbps = round(weight_bytes[form] / t / 1e3, 1)
            out.append({"M": m, "kernel": form, "ms": round(t / 1000, 2), "GB/s": gbps})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops = _native.load()
    ops = ops if ops is not None and hasattr(ops, "quant_linear") else None
    print(f"torch threads {torch.get_num_threads()}, native kernels: {ops is not None}", flush=True)
    rows = per_layer(ops, args.quick)
    totals = step_totals(rows)
    cold = cold_step(ops, rounds=3 if args.quick else 7)
    times = [c for c in rows[0] if c not in ("layer", "M") and not c.startswith("GB/s")]
    print("\nPer layer, µs per call (hot):")
    print(table(rows, ["layer", "M", *times]))
    print("\nGB/s at M=1 (weight bytes / time):")
    print(table([r for r in rows if r["M"] == 1], ["layer", *[f"GB/s {c}" for c in times]]))
    print("\nAll GEMMs of one decode step (hot per-layer times x 30 layers + LM head), ms:")
    print(table(totals, ["M", *times, "fastest"]))
    print("\nOne decode step's GEMMs, cold (distinct weights, model order), ms:")
    print(table(cold, ["M", "kernel", "ms", "GB/s"]))
    path = save("quant_kernels", {"per_layer": rows, "step_hot": totals, "step_cold": cold})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
