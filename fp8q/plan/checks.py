"""What would make a planned output unservable (refused), and what a user should know about it (noted).

Imports: plan (planner, selection), layouts (each codec says what is its own), models (architectures, linear),
source.checkpoint. Pure: everything is decided from the plan, before any data is read, so `quantize` refuses before
writing, and `inspect` / `--dry-run` can exit 1 for CI to gate on.
"""

from __future__ import annotations

import math
from typing import Any

from fp8q.layouts.base import Layout
from fp8q.layouts.clients import TRANSFORMERS_MEASURED, UNSERVABLE, Outcome, is_moe
from fp8q.models.architectures import model_types
from fp8q.models.linear import is_linear_weight
from fp8q.plan.planner import Action, Plan
from fp8q.plan.selection import unknown_architecture_note
from fp8q.source.checkpoint import CONFIG_FILE


def plan_problems(plan: Plan, tp: int | None, load_check: bool) -> list[str]:
    """One line per reason the planned output could not be served as it is; empty when it can.

    Args:
        tp: the vLLM tensor-parallel size block layouts must shard at; None checks at 1.
        load_check: False skips the engine load check (the user's explicit choice), never the others.
    """
    problems: list[str] = []
    layout = plan.layout
    if layout is None:
        return problems  # dequantize: a plain checkpoint, which needs no config to say how it is quantized
    if plan.config is None:
        root = plan.checkpoint.root
        problems.append(
            f"{root / CONFIG_FILE}: missing; engines read the quantization_config from it, so the FP8 weights "
            "would load as plain ones: add the model's config.json to the source folder, or pass --config FILE"
        )
    if plan.n_quantized + plan.n_copied == 0:
        linear = sum(1 for meta in plan.checkpoint.tensors.values() if is_linear_weight(meta))
        problems.append(
            f"{plan.checkpoint.root}: nothing to quantize: none of its {linear} Linear weight(s) is left after "
            "--targets, --ignore and the layers always kept (lm_head, routers, encoders), and a config that "
            "declares FP8 with no FP8 weight misleads engines; check the patterns (`fp8q inspect` lists the layers)"
        )
    quantized = _weights(plan, requantized=True)
    problems += [problem for module, (rows, cols) in quantized if (problem := layout.shape_problem(module, rows, cols))]
    problems += layout.size_problems([shape for _, shape in quantized])
    if load_check:
        problems += load_refusals(plan, tp)
    return problems


def load_refusals(plan: Plan, tp: int | None) -> list[str]:
    """What an engine would refuse to load: the output no engine loads at all first, then each layer vLLM cannot
    load at --tp. The one check behind both the problems (a run refuses) and, with --no-load-check, the notes (a
    run writes them anyway, and says so)."""
    assert plan.layout is not None
    found = _engine_refusals(plan)
    found += plan.layout.tp_problems([(module, *shape) for module, shape in _weights(plan)], tp or 1)
    return found


def _weights(plan: Plan, requantized: bool = False) -> list[tuple[str, tuple[int, int]]]:
    """(module, shape) of each weight the plan quantizes (and, with `requantized`, each FP8 one it quantizes again)."""
    return [
        (piece.out.name.removesuffix(".weight"), (piece.out.shape[0], piece.out.shape[1]))
        for job in plan.jobs
        if job.action is Action.QUANTIZE or (requantized and job.action.quantizes)
        for piece in job.pieces
    ]


def plan_notes(plan: Plan, load_check: bool = True, tp: int | None = None) -> list[str]:
    """One line per thing worth knowing about the output that does not stop the run."""
    notes = list(plan.checkpoint.notes)
    layout = plan.layout
    if layout is None:
        return notes
    unknown = unknown_architecture_note(plan.config, plan.architecture)
    if unknown:
        notes.append(unknown)
    refused = [] if load_check else load_refusals(plan, tp)
    notes += _client_notes(plan, layout, vllm_refuses_some=bool(refused))
    suffix = " (--no-load-check writes it anyway)"
    notes += [f"written anyway (--no-load-check): {line.removesuffix(suffix)}" for line in refused]
    odd = layout.dims_note([(f"{module}.weight", shape) for module, shape in _weights(plan)], bool(refused))
    if odd:
        notes.append(odd)
    return notes


def is_moe_plan(plan: Plan) -> bool:
    """Whether the output holds MoE experts (what the engines treat apart: each layout's MoE cells)."""
    return is_moe([p.out.name for job in plan.jobs if job.action.quantizes for p in job.pieces])


def unservable_reason(plan: Plan) -> str | None:
    """Why no engine loads the FP8 output of this architecture, where none does (layouts/clients.py); else None."""
    if plan.layout is None:
        return None
    found = [t for t in model_types(plan.config) if t in UNSERVABLE]
    return f"{found[0]}: {UNSERVABLE[found[0]]}" if found else None


def _engine_refusals(plan: Plan) -> list[str]:
    """Outputs no engine would load: a layout vLLM refuses for this kind of model, an architecture whose FP8 form
    no engine loads."""
    assert plan.layout is not None
    found = []
    unservable = unservable_reason(plan)
    if unservable:
        found.append(f"{unservable} (--no-load-check writes it anyway)")
    moe = is_moe_plan(plan)
    cell = plan.layout.vllm[moe]
    if cell.outcome is Outcome.REFUSES:
        kind = "a MoE model" if moe else "a dense model"
        found.append(
            f"{plan.layout.option_words()} on {kind}: vLLM refuses it ({cell.why}); use --format fp8 or another "
            "--scheme (--no-load-check writes it anyway)"
        )
    return found


def _client_notes(plan: Plan, layout: Layout, vllm_refuses_some: bool = False) -> list[str]:
    """What transformers does with the output where it does not run it (the layout's cells: measured by tests);
    `vllm_refuses_some`: the run writes what vLLM refuses (--no-load-check), so the layout's cell is not said."""
    moe = is_moe_plan(plan)
    cell = layout.transformers[moe]
    if cell.outcome is Outcome.GARBAGE:
        return [
            f"{layout.option_words()} is vLLM's and SGLang's layout: transformers {cell.why} without an error and "
            "computes garbage (use --format compressed-tensors for transformers)"
        ]
    if cell.outcome is Outcome.REFUSES:
        kind = "MoE" if moe else "dense"
        return [
            f"{layout.option_words()} on a {kind} model: transformers {TRANSFORMERS_MEASURED} cannot load it "
            f"({cell.why}); "
            + ("vLLM refuses parts of this output too (below)" if vllm_refuses_some else
               f"vLLM and SGLang {_vllm_words(layout, moe)}")
        ]  # fmt: skip
    return []


def _vllm_words(layout: Layout, moe: bool) -> str:
    cell = layout.vllm[moe]
    if cell.outcome is Outcome.RUNS:
        return "load it" + (f" ({cell.why})" if cell.why else "")
    if cell.outcome is Outcome.NOT_CHECKED:
        return f"were not checked with it ({cell.why})"
    return f"{cell.outcome.value} it ({cell.why})"


# A dequantized weight this far from its source is broken whatever its neighbours do (`verify` flags it too). FP8
# e4m3 keeps 3 mantissa bits: about 2-4 % relative error for sane weights in any layout.
MAX_REL_ERROR = 0.1


def exactness(stats: dict[str, dict[str, Any]], copied: int = 0) -> str | None:
    """A conversion's weights compared value by value with their source (fp8q.json's `exact`), in a line: how many
    came through bit for bit (`copied`: those already in the layout, copied), and the bound on the rest's relative
    error; None where none was compared or copied (quantize)."""
    checked = {name: s for name, s in stats.items() if "exact" in s}
    if not checked and not copied:
        return None
    inexact = sorted(((float(s["rel_error"]), name) for name, s in checked.items() if not s["exact"]), reverse=True)
    total = len(checked) + copied
    line = f"exact: {total - len(inexact):,} of {total:,} weights came through bit for bit"
    if copied:
        line += f" ({copied:,} already in the layout, copied)"
    if inexact:
        worst, name = inexact[0]
        bound = f"2^{math.ceil(math.log2(worst))}" if worst > 0 else "0"
        line += (
            f"; {len(inexact):,} within {bound} relative error (worst {name}, {worst:.3g}): "
            "each listed in fp8q.json (`exact`, `inexact_values`)"
        )
    return line


def run_findings(stats: dict[str, dict[str, Any]], copied: int = 0) -> list[str]:
    """What the quantized values tell that the plan could not, from the statistics fp8q.json records: weights far
    from their source (values too small for FP8 at their scales, say: all of them zero), and weights whose client
    overflows to inf (written only with --no-load-check)."""
    found = [line] if (line := exactness(stats, copied)) else []
    far = sorted(
        ((float(s["rel_error"]), name) for name, s in stats.items() if float(s.get("rel_error", 0)) > MAX_REL_ERROR),
        reverse=True,
    )
    if far:
        error, name = far[0]
        found.append(
            f"{len(far)} quantized weight(s) far from their source (relative error above {MAX_REL_ERROR} in the rows "
            f"fp8q.json samples), worst: {name} ({error:.4f}); `fp8q verify OUT --source SRC` checks every row: keep "
            f"such weights in high precision with --ignore"
        )
    overflow = sorted(name for name, s in stats.items() if s.get("client_overflow"))
    if overflow:
        found.append(
            f"{len(overflow)} quantized weight(s) overflow to inf in the dtype their client computes in, written "
            f"anyway (--no-load-check), first: {overflow[0]}: engines compute garbage there"
        )
    return found
