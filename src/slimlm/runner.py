"""Walks a recipe's stages: resolves the teacher, runs or skips each stage, evaluates, checks gates.

A stage is skipped when its manifest records the same config digest and input digest and its
files still hash to the recorded output digest; otherwise it and everything after it re-run.
"""

from __future__ import annotations

import functools
import platform
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from slimlm import launch
from slimlm.artifacts import (
    MANIFEST,
    RunLayout,
    atomic_write,
    begin_partial,
    check_run_dir,
    commit_partial,
    config_digest,
    dir_digest,
    read_json,
    run_lock,
    write_json_atomic,
)
from slimlm.errors import GateFailed, RecipeError, RunDirectoryError, SlimlmError
from slimlm.evaluate.catalogue import headline_values, plain_number
from slimlm.evaluate.gates import check_gate, describe_verdict, failure_message
from slimlm.evaluate.suite import Evaluator, evaluation_digest
from slimlm.manifest import Manifest, manifest_problem, stage_manifest, write_manifest
from slimlm.model_card import card_text, write_card
from slimlm.progress import console, status
from slimlm.recipe import Recipe, recipe_to_yaml
from slimlm.sources.models import resolve_model, source_facts
from slimlm.sources.text import DataStore
from slimlm.stage import StageConfig, StageContext, describe_settings
from slimlm.stages import STAGES

TEACHER = "teacher"
LIBRARIES = ("slimlm", "torch", "transformers", "accelerate", "peft", "safetensors", "onnx", "onnxruntime")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            "the recipe asks for device: cuda, but no CUDA GPU is visible; use device: auto or cpu "
            "(or --set device=cpu)"
        )
    return requested


def run_recipe(recipe: Recipe, run_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage. Returns the run state; raises SlimlmError on a failure.

    `force` lets a run replace another recipe's run in `run_dir` (see `check_run_dir`)."""
    layout = RunLayout(Path(run_dir))
    replacing = check_run_dir(layout.root, recipe.name, recipe.model, force=force)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirectoryError(
            f"cannot create the run directory {layout.root}: {e.strerror}; choose another with --run-dir"
        ) from e
    with run_lock(layout.root):  # two runs writing one directory would corrupt each other's stages
        if replacing:
            status(f"[yellow]--force[/]: {replacing}")
        # run.json first: it is what marks the folder as a slimlm run
        state: dict[str, Any] = {"recipe": recipe.name, "status": "running", "started": now(), "stages": {}}
        write_json_atomic(layout.run_state, state)
        with atomic_write(layout.recipe) as tmp:
            tmp.write_text(recipe_to_yaml(recipe))
        try:
            _run_stages(recipe, layout, state)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                outcome, error = "interrupted", f"interrupted by {getattr(e, 'signal_name', 'SIGINT')}"
            else:
                outcome = "gate_failed" if isinstance(e, GateFailed) else "failed"
                error = str(e) if isinstance(e, SlimlmError) else f"{type(e).__name__}: {e}"
            state.update(status=outcome, finished=now(), error=error)
            write_json_atomic(layout.run_state, state)
            _write_report(layout.root)
            raise
        state.update(status="done", finished=now())
        write_json_atomic(layout.run_state, state)
        _write_report(layout.root)
        return state


def _write_report(root: Path) -> None:
    """The report is a convenience: failing to draw it must never hide the run's own outcome."""
    from slimlm.report import write_report

    try:
        md, page = write_report(root)
        status(f"report: {page}")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        status(f"[yellow]could not write the report[/]: {type(e).__name__}: {e}; try `slimlm report {root}`")


def _run_stages(recipe: Recipe, layout: RunLayout, state: dict[str, Any]) -> None:
    device = pick_device(recipe.device)
    eval_digest = evaluation_digest(recipe)

    console.rule(f"[bold]{recipe.name}[/] — teacher")
    teacher_dir = resolve_model(recipe.model, allow_pickle=recipe.allow_pickle, status=status)
    data = DataStore(dict(recipe.data), teacher_dir=teacher_dir, cache_dir=layout.root / "generated")
    evaluator = Evaluator(recipe, data, device, tasks_dir=layout.root / "tasks")
    teacher, reused = _teacher_manifest(recipe, layout, teacher_dir, evaluator, eval_digest)
    state["stages"][TEACHER] = "skipped" if reused else "done"
    _print_metrics(teacher.metrics)
    facts = source_facts(recipe.model, teacher_dir)  # what the model cards say of the original teacher

    lineage = {TEACHER: [teacher]}  # each artifact's chain of stages, teacher first
    previous = teacher
    for index, stage in enumerate(recipe.stages, start=1):
        previous = lineage[stage.input][-1] if stage.input else previous
        console.rule(f"[bold]{index:02d}-{stage.name}[/] ({stage.kind})")
        state["stages"][stage.name] = "running"
        write_json_atomic(layout.run_state, state)

        finish = functools.partial(_finish, recipe, stage, teacher, previous, lineage[previous.stage], facts)
        manifest, reused = _stage_manifest(
            recipe, layout, index, stage, previous, teacher, evaluator, eval_digest, finish
        )
        state["stages"][stage.name] = "skipped" if reused else "done"
        lineage[stage.name] = [*lineage[previous.stage], manifest]
        _print_metrics(manifest.metrics)
        for v in manifest.gates:
            status(f"gate {v.gate}: {'[green]pass[/]' if v.passed else '[red]FAIL[/]'} ({describe_verdict(v)})")
        if manifest.failed_gates:
            state["stages"][stage.name] = "gate_failed"
            raise GateFailed(failure_message(stage.name, manifest.failed_gates[0]))
        previous = manifest
        if stage.corrects_teacher:  # teacher correction: distill from the corrected model from here on
            status("this stage's output is the teacher for the stages that follow")
            teacher = manifest
    console.rule(f"done: {layout.root}")


def _finish(
    recipe: Recipe,
    stage: StageConfig,
    teacher: Manifest,
    previous: Manifest,
    chain: list[Manifest],
    facts: dict[str, str],
    manifest: Manifest,
    folder: Path,
) -> None:
    """A stage's gate verdicts (against the teacher and its input) and its model card, before its manifest is written;
    `chain` is the lineage of its input, the original teacher first."""
    manifest.gates = [check_gate(g, manifest.metrics, teacher.metrics, previous.metrics) for g in stage.gates]
    manifest.status = "gate_failed" if manifest.failed_gates else "done"
    settings = {s.name: describe_settings(s.settings()) for s in recipe.stages}
    text = card_text(recipe.name, manifest, [*chain, manifest], settings, facts)
    write_card(folder / (manifest.artifact or ""), text)


def _earlier_record(layout: RunLayout, index: int, name: str) -> Manifest | None:
    """The manifest an earlier run left for this stage, or None; one that is there but cannot be read (damaged, or
    written by a slimlm that recorded other fields) is said, and the stage runs again."""
    old = stage_manifest(layout, index, name)
    path = layout.stage_dir(index, name) / MANIFEST
    if old is None and path.exists():
        status(f"{path} is not a record this slimlm reads ({manifest_problem(read_json(path))}); running it again")
    return old


def _teacher_manifest(recipe, layout, teacher_dir: Path, evaluator: Evaluator, eval_digest) -> tuple[Manifest, bool]:
    """Evaluate the teacher once per run directory; reuse while the model and evaluation are unchanged.
    Returns its manifest and whether it was reused."""
    digest = dir_digest(teacher_dir)
    old = _earlier_record(layout, 0, TEACHER)
    if old and old.output_digest == digest and old.evaluation_digest == eval_digest and old.model == recipe.model:
        status("teacher already evaluated; reusing its metrics")
        return old, True
    started, t0 = now(), time.perf_counter()
    metrics = evaluator.evaluate(teacher_dir)
    manifest = Manifest(
        stage=TEACHER,
        kind=TEACHER,
        model=recipe.model,
        artifact_path=str(teacher_dir),
        input_digest=digest,
        output_digest=digest,
        evaluation_digest=eval_digest,
        metrics=metrics,
        started=started,
        finished=now(),
        seconds=round(time.perf_counter() - t0, 2),
        versions=library_versions(),
        seed=recipe.seed,
    )
    layout.stage_dir(0, TEACHER).mkdir(parents=True, exist_ok=True)
    write_manifest(layout.stage_dir(0, TEACHER), manifest)
    return manifest, False


def _stage_manifest(
    recipe: Recipe,
    layout: RunLayout,
    index: int,
    stage: StageConfig,
    previous: Manifest,
    teacher: Manifest,
    evaluator: Evaluator,
    eval_digest: str,
    finish: Callable[[Manifest, Path], None],
) -> tuple[Manifest, bool]:
    """Run one stage into a partial folder and commit it, or reuse a finished one that still matches;
    `finish` adds the gate verdicts and the model card to the folder first. Returns the manifest and whether
    it was reused."""
    # The teacher (which a corrected teacher replaces) and slimlm's version are part of the key too.
    cfg_digest = config_digest(
        {
            "stage": stage.digest_fields(),
            "seed": recipe.seed,
            "dtype": recipe.dtype,
            "teacher": teacher.output_digest,
            "slimlm": library_versions().get("slimlm"),
        }
    )
    teacher_dir = Path(teacher.artifact_path)
    input_digest = previous.output_digest
    final = layout.stage_dir(index, stage.name)
    old = _earlier_record(layout, index, stage.name)
    if old and old.config_digest == cfg_digest and old.input_digest == input_digest and old.artifact:
        artifact = final / old.artifact
        if artifact.exists() and dir_digest(final) == old.output_digest:
            if old.evaluation_digest != eval_digest:
                status("evaluation settings changed; re-evaluating the existing artifact")
                old.metrics = {**old.stage_metrics, **evaluator.evaluate(artifact, teacher_dir)}
                old.evaluation_digest = eval_digest
            status("unchanged since the last run; skipping")
            old.artifact_path = str(artifact)
            finish(old, final)
            write_manifest(final, old)
            return old, True
        status("files changed on disk since this stage finished; running it again")

    partial = begin_partial(layout, index, stage.name)
    # Checkpoints survive an interrupted attempt (the partial folder does not) and belong to this exact config and input.
    work_dir = layout.work_dir(index, stage.name, config_digest([cfg_digest, input_digest]))
    started, t0 = now(), time.perf_counter()
    torch.manual_seed(recipe.seed)
    context = StageContext(
        input_dir=Path(previous.artifact_path),
        teacher_dir=teacher_dir,
        output_dir=partial,
        work_dir=work_dir,
        data=evaluator.data,
        device=evaluator.device,
        seed=recipe.seed,
        dtype=recipe.dtype,
        trust_remote_code=recipe.trust_remote_code,
    )
    if stage.launch_options():  # the stage trains in several processes; this one waits for them
        result = launch.run_launched(stage, context, dict(recipe.data))
    else:
        result = STAGES[stage.kind].run(stage, context)
    seconds = round(time.perf_counter() - t0, 2)
    metrics = {**result.metrics, **evaluator.evaluate(partial / result.artifact, teacher_dir)}
    manifest = Manifest(
        stage=stage.name,
        kind=stage.kind,
        index=index,
        config=stage.model_dump(mode="json"),
        config_digest=cfg_digest,
        input_digest=input_digest,
        output_digest=dir_digest(partial),
        evaluation_digest=eval_digest,
        artifact=result.artifact,
        artifact_format=stage.produces,
        artifact_path=str(final / result.artifact),
        teacher_path=str(teacher_dir),
        stage_metrics=result.metrics,
        metrics=metrics,
        started=started,
        finished=now(),
        seconds=seconds,
        versions=library_versions(),
        seed=recipe.seed,
    )
    finish(manifest, partial)
    write_manifest(partial, manifest)
    kept = commit_partial(layout, index, stage.name)
    if kept:
        status(f"[yellow]the outdated {final.name}/ held files slimlm did not write; it is kept as {kept}[/]")
    shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoints are no longer needed once the stage is committed
    return manifest, False


def _print_metrics(metrics: dict[str, Any]) -> None:
    """The stage's own figures (train_loss, ...) and the run's headline metrics."""
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown |= headline_values(metrics)
    status("  ".join(f"{k}={plain_number(v)}" for k, v in shown.items()))
