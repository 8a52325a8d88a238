"""The command line's options, in groups each command takes only where they apply: what to
load, what to calibrate on, how to choose heads, how to remove them, how to evaluate, where
to write. Every option has help text with its default; choices come from the library."""

from __future__ import annotations

import argparse

from ..ranking import ALLOCATIONS, DEFAULT_GQA, DEFAULT_STEPS, GQA_MODES, ORDERS, SCORES
from ..ranking.units import MAX_LR
from ..stats.moments import DEFAULT_DAMPING
from .load import DTYPES
from .locate import BUNDLED_MODELS
from .commands import DEFAULTS
from .sweep_table import RANDOM_SCOPES
from .texts import BUNDLED_TEXTS, DEFAULT_REFERENCE, DEFAULT_TEXT
from .argtypes import (Given, device, fraction, kv_fraction, layers, nonnegative, nonnegative_int, positive,
                       positive_float, ratio, ratios, seed, shapes, steps)

#: headprune.hf.recover's learning rates by kind (not imported before parsing; test_recover_cli.py checks they agree)
RECOVER_LR = {"causal": 1e-4, "encoder": 3e-5}
#: calibration batches kept out of recovery training by default, to keep the best step
RECOVER_VALIDATION = 0.1
_LR_HELP = f"default {RECOVER_LR['causal']:g} for causal LMs, {RECOVER_LR['encoder']:g} for encoders"
_VALIDATION_HELP = ("a fraction of the calibration batches, spread over them, kept out of training: the "
                    "distillation loss on them is measured every few steps and the model keeps the parameters "
                    "of the best measurement (the pruned ones if no step beat them); 0 trains on every batch "
                    f"and keeps the last step (default {RECOVER_VALIDATION:g})")

#: --learn-steps default (headprune.hf.learned.learn_gates's own default)
LEARN_STEPS = 200

#: --save-dtype choices: "auto" keeps the input checkpoint's own float type
SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")


# ---- groups -----------------------------------------------------------------------------------


def model_args(p: argparse.ArgumentParser, *, saves: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", metavar="MODEL",
                   help=f"a bundled name ({', '.join(BUNDLED_MODELS)}; pip packages that ship the weights), a .gguf "
                        "file (or a folder holding one), a Hugging Face model directory, the id of a model repository (owner/name) "
                        "in the local Hugging Face cache (nothing is downloaded), or a directory written by headprune prune")
    g.add_argument("--device", type=device, default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute in this float type (default: float32" + (
                       "; the checkpoint's own type is kept for saving, see --save-dtype)" if saves else ")"))
    g.add_argument("--quiet", action="store_true", help="no progress bars or stage messages (errors still print)")


def data_args(p: argparse.ArgumentParser, *, calibrates: bool, refits: bool = False,
              evaluates: bool = True) -> None:
    g = p.add_argument_group("text")
    what = "calibrate on its first 70%% of paragraphs and evaluate on the last 30%%" if calibrates else \
        "evaluate on its last 30%% of paragraphs"
    if calibrates and not evaluates:
        what = "calibrate on its first 70%% of paragraphs"
    g.add_argument("--data", default=None, metavar="TEXT",
                   help=f"{what}: a text file (paragraphs separated by blank lines, lines kept), a JSONL or .json file of "
                        f"records with a 'text' field, a local datasets directory (one split), or bundled texts ({', '.join(BUNDLED_TEXTS)}), several "
                        f"joined by + to mix them in equal shares (default {DEFAULT_TEXT}"
                        + ("" if calibrates else "; for a directory written by prune or recover, its calibration text") + ")")
    if calibrates:
        g.add_argument("--samples", type=positive, default=None,
                       help=f"calibration sequences (default {DEFAULTS['causal']['samples']} for causal LMs, "
                            f"{DEFAULTS['encoder']['samples']} for encoders)")
        g.add_argument("--seq-len", type=positive, default=None,
                       help=f"calibration sequence length in tokens (default {DEFAULTS['causal']['seq_len']} for causal LMs, "
                            f"{DEFAULTS['encoder']['seq_len']} for encoders)")
        g.add_argument("--batch-size", type=positive, default=8, help="calibration sequences per forward (default 8)")
        g.add_argument("--generated", type=nonnegative_int, default=0, metavar="N",
                       help="causal LMs: add N sequences of --seq-len tokens sampled from the model itself "
                            "(temperature 1, from its start token, seeded) to the calibration text: less loss on "
                            "text of other kinds than the calibration text, a little more on its own kind "
                            "(docs/quality.md; default 0)")
        g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="on CPU, serve sdpa attention calls during collection by the fused "
                            "attention-with-statistics op (default; outputs equal SDPA's to float rounding); "
                            "--no-fused runs the model's own attention, then the statistics in a second pass")
    if refits:
        g.add_argument("--reference", type=fraction, default=DEFAULT_REFERENCE, metavar="SHARE",
                       help="share of the calibration sequences (--samples) taken from the bundled texts --data does "
                            f"not name ({', '.join(BUNDLED_TEXTS)}: prose, technical documentation, code), so that the "
                            "refit does not fit one kind of text alone: calibrated on one kind only, the pruned model "
                            "lost much more on text of other kinds (docs/quality.md); 0 calibrates on --data alone "
                            f"(default {DEFAULT_REFERENCE:g})")


def eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-windows", type=positive, default=48,
                   help="held-out perplexity windows of 256 tokens, or of the model's positions if fewer (causal LMs; "
                        "default 48)")


def output_args(p: argparse.ArgumentParser, command: str, *, distributed: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help=f"output directory, new or empty unless --force (default headprune-out/{command}-<model name>)")
    g.add_argument("--force", action="store_true",
                   help="replace a non-empty output directory (in one step: it holds the old or the new result)")
    if distributed:
        g.add_argument("--distributed", action="store_true",
                       help="data-parallel calibration under torchrun (gloo on CPU, NCCL on GPU); rank 0 writes")


def selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which heads (default: the measured default recipe, see the description)")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=ratio, help="fraction of all the model's query heads to remove, layers kept "
                                                 "whole included, in (0, 1) (of its KV groups under --gqa group)")
    how.add_argument("--count", type=positive, help="number of query heads to remove (KV groups under --gqa group)")
    g.add_argument("--score", default=None, choices=(*SCORES, "learned"),
                   help="the statistic that ranks heads (default: the default recipe's); reconstruction: what the "
                        "least-squares refit cannot recover; entropy: the mean attention entropy (nats); learned: "
                        "hard-concrete gates trained on the calibration text to keep the outputs under the budget "
                        "(see --learn-steps)")
    g.add_argument("--order", choices=ORDERS, default=None,
                   help="prune the highest or the lowest scores first, or a seeded random order (default: the "
                        "score's natural order: highest first for entropies, lowest for costs)")
    g.add_argument("--scope", choices=ALLOCATIONS, default=None,
                   help="spread the budget evenly over the layers (per_layer), rank the whole model (global), or "
                        "give each layer the share whose removal, measured on the calibration text, costs the "
                        "model least (measured: one forward of a few sequences per layer and layout; needs the "
                        "refit; without --score or --order, on models without grouped queries, each layer's "
                        "heads are also chosen one at a time by that measured cost, a forward per head left and "
                        "count: about 460 forwards on all-MiniLM-L6-v2, minutes on a CPU); default measured for "
                        "encoders, per_layer for the rest")
    g.add_argument("--gqa", choices=GQA_MODES, default=DEFAULT_GQA,
                   help="grouped-query models: prune query heads in layouts where every KV group kept keeps the "
                        "same number of them, so the KV cache never grows (even), query heads freely (query; a "
                        "partly pruned KV group repeats its KV head, so the KV cache can grow), or whole KV "
                        f"groups, which shrinks it most (group); default {DEFAULT_GQA}")
    g.add_argument("--uniform", action="store_true",
                   help="the same head layout in every layer (the count nearest the request), so the saved "
                        "directory has a standard config that plain from_pretrained loads where the family's "
                        "config can describe it, and a .gguf input's model.gguf keeps llama.cpp's llama "
                        "architecture (without it, per-layer counts are written as its deci architecture); no layer "
                        "is protected, and the heads of a causal LM's first layer, or of every layer of an encoder, "
                        "are chosen by measurement, as the default chooses them there")
    g.add_argument("--kv-ratio", type=kv_fraction, default=None, metavar="R",
                   help="with --gqa even: remove at least this fraction of the KV heads (the KV cache shrinks "
                        "at least as much), preferring layouts that remove whole groups just enough to reach it "
                        "(quality falls towards --gqa group's; docs/quality.md)")
    g.add_argument("--min-heads-per-layer", type=nonnegative_int, default=None,
                   help="units every layer keeps (default 1; 0 allows emptying a layer)")
    g.add_argument("--protect-layers", type=layers, default=None, metavar="I,J,...",
                   help="layers never pruned (default: each causal stack's first with the default recipe or --score learned, not --uniform; else none)")
    g.add_argument("--seed", type=seed, default=0, action=Given, help="seed of --order random and of --score learned's gates (default 0)")
    g.add_argument("--learn-steps", type=positive, default=None,
                   help=f"--score learned: training steps, one calibration batch each (default {LEARN_STEPS})")
    g.add_argument("--learn-seconds", type=positive_float, default=None,
                   help="--score learned: stop training before a step that would end past this many seconds (default: none)")
    g.add_argument("--learn-checkpoint", default=None, metavar="FILE",
                   help="--score learned: keep the gates' training state in FILE and resume from it when it exists "
                        "(refused when it was written for another model, text or settings)")
    g.add_argument("--steps", type=steps, default=DEFAULT_STEPS,
                   help="iterative pruning: reach the budget in this many rounds, re-collecting the statistics with "
                        "the heads chosen so far removed before each round; 'auto': a round per 10%% of the heads "
                        f"(a round's share rounds to whole heads or layouts; default {DEFAULT_STEPS})")


def removal_args(p: argparse.ArgumentParser, *, sequential: bool = True) -> None:
    g = p.add_argument_group("how removed heads are replaced")
    g.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="refit the kept heads' output-projection columns and bias by least squares to what the full "
                        "projection computed on the calibration data (default; its second moments are gathered in "
                        "the same pass); --no-reconstruct keeps the kept columns as they are")
    g.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,  # None: on, not given
                   help="with --no-reconstruct: replace each removed head by its mean output, folded into the output "
                        "projection's bias (default); --no-compensate removes heads outright")
    g.add_argument("--refit-values", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the kept heads' value rows together with their output-projection columns (one more "
                        "forward pass over the calibration text after the heads are chosen, one per selection in a "
                        "sweep; default: on for encoders whose every head has its own value projection, off otherwise)")
    g.add_argument("--damping", type=nonnegative, default=DEFAULT_DAMPING, action=Given,
                   help=f"ridge damping of the refit towards the original weights, relative to the mean squared "
                        f"input; the reconstruction score ranks heads by the same refit (default {DEFAULT_DAMPING:g})")
    g.add_argument("--moments-dtype", choices=("float64", "float32"), default="float64",
                   help="float type the refit's second moments are summed in, in every collection of the run (the "
                        "--steps rounds, a measured allocation's, --sequential's): (heads x head size + 1)^2 numbers "
                        "per layer, their size said before the collection; float32 takes half their memory; the value "
                        "refit's own moments stay float64 (default float64)")
    if sequential:
        g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=False,
                       help="calibrate the refit layer by layer, each layer's statistics taken with the earlier layers "
                            "already pruned and refit (about one more forward pass; default off)")


def prune_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the pruned model")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--mask", dest="mode", action="store_const", const="mask",
                      help="keep the shapes and zero the heads in the weights (reversible with the Python API); "
                           "a masked directory is pruned further without --mask, its masked heads removed first")
    mode.add_argument("--physical", dest="mode", action="store_const", const="physical",
                      help="remove the heads: a smaller, faster model (default)")
    g.add_argument("--save-dtype", choices=SAVE_DTYPES, default="auto",
                   help="float type of the saved weights; the pruned model is evaluated with its weights rounded to it "
                        "(computing in --dtype), so the report describes what is saved (default auto: the checkpoint's own type as its config or, failing "
                        "that, its weights say; bfloat16 for a quantised GGUF; float32 when unknown)")
    g.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the pruned model's speed against the unpruned one, interleaved, with the unpruned "
                        "one timed against itself as a control (default on; needs a second copy of the model in "
                        "memory)")
    g.add_argument("--speed-prefill", type=shapes, default=None, metavar="BxN[,BxN...]",  # None: 1x512, not given
                   help="prefill shapes --speed times: batch x prompt tokens, capped at the model's positions "
                        "(default 1x512; none to skip)")
    g.add_argument("--speed-decode", type=shapes, default=None, metavar="BxN[,BxN...]",  # None: 1x2048, not given
                   help="decode shapes --speed times for causal LMs: batch x tokens of context already in the KV "
                        "cache, where head pruning pays most (default 1x2048; none to skip)")


def sweep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--ratios", type=ratios, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="fractions of heads to prune, comma-separated (default 0.1,0.2,0.3,0.4,0.5)")
    g.add_argument("--seeds", type=positive, default=3, help="random-baseline draws per fraction (default 3)")
    g.add_argument("--random-scope", choices=list(RANDOM_SCOPES), default="per_layer",
                   help="random baseline: " + "; ".join(f"{k}: heads {v}" for k, v in RANDOM_SCOPES.items())
                        + " (default per_layer)")
    g.add_argument("--gqa", choices=GQA_MODES, default=DEFAULT_GQA,
                   help="grouped-query models: query heads in even layouts (the KV cache never grows), query heads "
                        f"freely, or whole KV groups (default {DEFAULT_GQA})")
    g.add_argument("--eval-paragraphs", type=positive, default=None,
                   help="the first N held-out paragraphs are evaluated: encoders' fidelity, and the text a causal "
                        "LM's perplexity windows come from (default: all)")
    g.add_argument("--learn-steps", type=nonnegative_int, default=0,
                   help="add learned hard-concrete gates to the recipes, trained this many steps at each ratio "
                        "(default 0: not compared; a step is a forward and a backward pass on one batch)")


def learning_rate(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    if x > MAX_LR:  # the optimizers' float32 state (recover refuses it after the work otherwise)
        raise argparse.ArgumentTypeError(f"expected at most float32's largest number, {MAX_LR:.3g}, got {text}")
    return x


def recover_args(p: argparse.ArgumentParser) -> None:
    """``headprune recover DIR``: what to recover, toward what, on which text, how long."""
    g = p.add_argument_group("what to recover")
    g.add_argument("model", metavar="DIR", help="a directory written by headprune prune (model/ and report.json)")
    g.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the unpruned model to distil toward (default: the model named in DIR/report.json)")
    g.add_argument("--device", type=device, default="cpu", help="where the models run: cpu, cuda, ... (default cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="evaluate in this float type, not narrower than DIR's saved type (default float32; DIR's "
                        "weights keep their saved type's values; training always runs in float32 or wider)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or stage messages (errors still print)")
    g = p.add_argument_group("distillation")
    g.add_argument("--steps", type=positive, default=None,
                   help="optimizer steps, one calibration batch each (--steps, --seconds or both: whichever ends first)")
    g.add_argument("--seconds", type=positive_float, default=None,
                   help="stop before a step that would end the recovery past this many seconds, the closing validation "
                        "included (default: none)")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="keep the training state in FILE (every 10 steps and at the end) and resume from it when it "
                        "exists: a run stopped by --seconds or interrupted goes on where it stopped (refused when FILE "
                        "was written for another pruned model, text or settings)")
    g.add_argument("--lr", type=learning_rate, default=None,
                   help=f"AdamW learning rate of the attention projections, q/k/v/o ({_LR_HELP})")
    g.add_argument("--validation", type=fraction, default=RECOVER_VALIDATION, metavar="FRACTION",
                   help=_VALIDATION_HELP)
    g = p.add_argument_group("text")
    g.add_argument("--data", default=None, metavar="TEXT",
                   help="train on its first 70%% of paragraphs, evaluate on the last 30%%; same forms as for prune "
                        "(default: the text DIR was pruned with)")
    g.add_argument("--samples", type=positive, default=None,
                   help="calibration sequences to train on (default: every one of the text's calibration part, "
                        "paragraphs for encoders, windows of --seq-len tokens for causal LMs)")
    g.add_argument("--seq-len", type=positive, default=None, help="calibration sequence length (default: DIR's)")
    g.add_argument("--batch-size", type=positive, default=None,
                   help="calibration sequences per step (default 1 for causal LMs, 2 for encoders: on SmolLM2 and "
                        "MiniLM more, smaller steps won back more in the same minutes; docs/quality.md)")


def prune_recover_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery after pruning")
    g.add_argument("--recover-steps", type=nonnegative_int, default=0,
                   help="distil the pruned model toward the unpruned one for this many steps on the calibration "
                        "text before the evaluation, one sequence per step for causal LMs and two for encoders "
                        "(every calibration sequence of the text), as headprune recover (default 0: none)")
    g.add_argument("--recover-seconds", type=positive_float, default=None,
                   help="as headprune recover --seconds: recover for at most this many seconds (alone, or with "
                        "--recover-steps: whichever ends first)")
    g.add_argument("--recover-lr", type=learning_rate, default=None, help=f"its AdamW learning rate ({_LR_HELP})")
    g.add_argument("--recover-validation", type=fraction, default=None, metavar="FRACTION",
                   help="as headprune recover --validation: " + _VALIDATION_HELP)
