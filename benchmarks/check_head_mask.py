"""Check: headprune's head gates compute what transformers 4's ``head_mask`` computed.

    python benchmarks/check_head_mask.py [--tf4 DIR]

transformers 4's BERT and GPT-2 multiplied the attention probabilities by ``head_mask``,
head by head (transformers 5 dropped the argument); :func:`headprune.gates` multiplies each
head's output instead, which is the same function. This script builds tiny random BERT and
GPT-2 models with transformers 5, saves their weights with safetensors, and runs a
subprocess with transformers 4 first on its path (``DIR``, default ``$HEADPRUNE_TF4`` or
build/transformers4, made by ``pip install --target build/transformers4 "transformers<5"``) that loads the same weights and computes the output and d(readout)/d(head_mask)
for three masks: ``binary`` (per layer, 0/1), ``soft`` (per layer, in [0, 1.5)) and
``per_example`` (one row per example, transformers 4's 5-D ``[layers, batch, heads, 1, 1]``).
headprune computes the same with ``gates`` (``sdpa`` and ``eager`` backends). Both run in
float64, where they must agree to float64 rounding, and in float32, where each one's error
against the float64 gates is reported (they round differently, neither is exact).

Writes benchmarks/results/gates_head_mask.json: per family and mask, max abs differences of
the outputs and the gradients. Make DIR with
``pip install --target DIR "transformers==4.46.3" "huggingface-hub<1.0" "tokenizers<0.21" --no-deps``
(its other dependencies are transformers 5's too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FAMILIES = {
    "bert": ("BertConfig", dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=2, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", dict(vocab_size=100, n_embd=32, n_head=4, n_layer=2, n_positions=64)),
}
MASKS = ("binary", "soft", "per_example")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
BATCH, SEQ, LAYERS, HEADS = 3, 9, 2, 4
DEFAULT_TF4 = os.environ.get("HEADPRUNE_TF4", str(Path(__file__).resolve().parent.parent / "build" / "transformers4"))


def readout(out: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every output value (its gradient reaches every gate)."""
    w = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)
    return (out * w).sin().sum()


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    mask[2, -4:] = 0
    binary = torch.ones(LAYERS, HEADS)
    binary[0, [0, 2]] = 0
    binary[1, 3] = 0
    return {
        "input_ids": torch.randint(3, 100, (BATCH, SEQ), generator=g),
        "attention_mask": mask,
        "binary": binary.double(),
        "soft": 1.5 * torch.rand(LAYERS, HEADS, generator=g, dtype=torch.float64),
        "per_example": 1.5 * torch.rand(BATCH, LAYERS, HEADS, generator=g, dtype=torch.float64),
    }


def build(family: str, transformers, attn: str, weights: Path):
    """The base model of ``family`` with the saved weights (same config kwargs in both versions)."""
    config_cls, kwargs = FAMILIES[family]
    model = transformers.AutoModel.from_config(getattr(transformers, config_cls)(**kwargs), attn_implementation=attn)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{family}: weights missing {missing}, unexpected {unexpected}")
    return model.eval()


def worker(folder: Path) -> None:
    """The transformers 4 side: ``head_mask`` on the saved weights, for every dtype and mask."""
    import transformers

    x = load_file(folder / "inputs.safetensors")
    result = {}
    for family in FAMILIES:
        model = build(family, transformers, "eager", folder / f"{family}.safetensors")  # head_mask needs eager
        for dname, dtype in DTYPES.items():
            model = model.to(dtype)
            for kind in MASKS:
                hm = x[kind].to(dtype)
                hm = hm.permute(1, 0, 2)[..., None, None] if kind == "per_example" else hm  # [L, B, H, 1, 1]
                hm.requires_grad_()
                out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], head_mask=hm)
                out = out.last_hidden_state
                (grad,) = torch.autograd.grad(readout(out), hm)
                grad = grad[..., 0, 0].permute(1, 0, 2) if kind == "per_example" else grad
                result[f"{family}.{dname}.{kind}.output"] = out.detach().contiguous()
                result[f"{family}.{dname}.{kind}.grad"] = grad.contiguous()
    save_file(result, str(folder / "tf4.safetensors"), metadata={"transformers": transformers.__version__})


def _spread_weights(model) -> None:
    """Random init gives near-uniform attention at this size; larger weights make heads differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(1.0 + 2.0 * torch.rand(p.shape[0], 1, generator=g))


def _gated(model, x: dict, kind: str, dtype) -> tuple:
    from headprune import gates

    values = x[kind].to(dtype).clone().requires_grad_()
    with gates(model, values=values, per_example=kind == "per_example"):
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    (grad,) = torch.autograd.grad(readout(out), values)
    return out.detach(), grad


def compute(tf4: str) -> tuple:
    """``(tensors, transformers 4 version)``: tensors[f"{family}.{dtype}.{mask}.{output|grad}.{source}"],
    sources ``tf4``, ``sdpa`` and ``eager`` (headprune's gates on transformers 5); mask ``none``:
    the ungated float64 output."""
    import transformers

    x = inputs()
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file(x, str(folder / "inputs.safetensors"))
        for family in FAMILIES:
            torch.manual_seed(0)
            config_cls, kwargs = FAMILIES[family]
            model = transformers.AutoModel.from_config(getattr(transformers, config_cls)(**kwargs))
            _spread_weights(model)
            weights = folder / f"{family}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            for attn in ("sdpa", "eager"):
                model = build(family, transformers, attn, weights)
                if attn == "sdpa":  # what the masks change, for scale
                    with torch.no_grad():
                        plain = model.double()(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
                    tensors[f"{family}.float64.none.output.sdpa"] = plain.last_hidden_state
                for dname, dtype in DTYPES.items():
                    model = model.to(dtype)
                    for kind in MASKS:
                        out, grad = _gated(model, x, kind, dtype)
                        tensors[f"{family}.{dname}.{kind}.output.{attn}"] = out
                        tensors[f"{family}.{dname}.{kind}.grad.{attn}"] = grad
        env = {**os.environ, "PYTHONPATH": tf4}
        proc = subprocess.run([sys.executable, __file__, "--worker", tmp], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the transformers 4 worker failed:\n{proc.stderr[-4000:]}")
        with safe_open(str(folder / "tf4.safetensors"), "pt") as f:
            version = f.metadata()["transformers"]
        for k, v in load_file(folder / "tf4.safetensors").items():
            tensors[f"{k}.tf4"] = v
    return tensors, version


def summary(tensors: dict) -> dict:
    """Per family, mask and what: max |tf4 - gates| in float64 and float32 (sdpa and eager
    gates), each float32 path's max error against the float64 gates, the reference's scale and,
    for outputs, how much the mask changes them."""
    out = {}
    for family in FAMILIES:
        for kind in MASKS:
            for what in ("output", "grad"):
                t = lambda d, s: tensors[f"{family}.{d}.{kind}.{what}.{s}"].double()  # noqa: E731
                ref = t("float64", "sdpa")
                out[f"{family}.{kind}.{what}"] = {
                    "float64_tf4_vs_sdpa": (t("float64", "tf4") - ref).abs().max().item(),
                    "float64_tf4_vs_eager": (t("float64", "tf4") - t("float64", "eager")).abs().max().item(),
                    "float32_tf4_vs_sdpa": (t("float32", "tf4") - t("float32", "sdpa")).abs().max().item(),
                    "float32_tf4_vs_eager": (t("float32", "tf4") - t("float32", "eager")).abs().max().item(),
                    **{f"float32_{s}_error": (t("float32", s) - ref).abs().max().item()
                       for s in ("tf4", "sdpa", "eager")},
                    "reference_max_abs": ref.abs().max().item(),
                }
                if what == "output":  # how far the mask moves the output: what a wrong gate would miss by
                    plain = tensors[f"{family}.float64.none.output.sdpa"]
                    out[f"{family}.{kind}.{what}"]["mask_effect"] = (ref - plain).abs().max().item()

    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tf4", default=DEFAULT_TF4, help="folder with transformers 4 installed (--target)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    if not Path(args.tf4, "transformers").is_dir():
        raise SystemExit(f"--tf4: no transformers in {args.tf4}; see this script's docstring")
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_results

    import transformers

    tensors, version = compute(args.tf4)
    rows = summary(tensors)
    worst = max(v["float64_tf4_vs_sdpa"] / max(1.0, v["reference_max_abs"]) for v in rows.values())
    for name, v in rows.items():
        print(f"{name:28s} float64 |tf4 - gates| {v['float64_tf4_vs_sdpa']:.2e}   float32 errors: "
              f"tf4 {v['float32_tf4_error']:.2e}, gates sdpa {v['float32_sdpa_error']:.2e}, "
              f"eager {v['float32_eager_error']:.2e}")
    path = write_results("gates_head_mask.json", {
        "transformers_4": version, "transformers_5": transformers.__version__,
        "inputs": {"batch": BATCH, "seq": SEQ, "layers": LAYERS, "heads": HEADS, "masks": list(MASKS)},
        "worst_float64_relative": worst, "cases": rows,
    })
    print(f"worst float64 difference relative to the output scale: {worst:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
