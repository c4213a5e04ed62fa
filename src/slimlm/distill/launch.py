"""Run one distill stage in several processes, while the run itself (manifests, evaluation, gates) stays in one.

`launch: {processes: N}` starts N local processes with torchrun (DDP: gloo on CPU, NCCL on GPUs);
`launch: {config: FILE}` hands an accelerate config (FSDP, DeepSpeed ZeRO-3, multi-node) to
`accelerate launch`. Each process runs `python -m slimlm.distill.launch`, rebuilds the stage from
the resolved recipe, and trains its share of every global batch; the main
process saves the model and writes the result the parent reads back. A crash leaves the
checkpoints in the work folder, so running the same command again resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm import errors
from slimlm.errors import StageFailed
from slimlm.progress import status
from slimlm.stage import StageContext, StageResult

if TYPE_CHECKING:
    from slimlm.distill.stage import DistillConfig

RESULT, ERROR = "launch-result.json", "launch-error.json"


def in_launched_process() -> bool:
    return "LOCAL_RANK" in os.environ  # set by torchrun and accelerate launch in every process they start


def launch_command(config: DistillConfig, worker_args: str) -> list[str]:
    module = ["-m", "slimlm.distill.launch", worker_args]
    if config.launch.config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config.launch.config, *module]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={config.launch.processes}",
        *module,
    ]


def run_launched(config: DistillConfig, context: StageContext) -> StageResult:
    """The parent's side: start the processes, wait, and return the main process's result (or its error)."""
    from slimlm.recipe import recipe_to_yaml

    context.data.documents(config.data)  # teacher-generated data is sampled once, here, not in every process
    for name in (RESULT, ERROR):
        (context.work_dir / name).unlink(missing_ok=True)
    (context.work_dir / "recipe.yaml").write_text(recipe_to_yaml(context.recipe))
    args = {
        "recipe": str(context.work_dir / "recipe.yaml"),
        "stage": config.name,
        "input_dir": str(context.input_dir),
        "teacher_dir": str(context.teacher_dir),
        "output_dir": str(context.output_dir),
        "work_dir": str(context.work_dir),
        "cache_dir": str(context.data.cache_dir) if context.data.cache_dir else None,
        "device": context.device,
        "seed": context.seed,
    }
    command = launch_command(config, json.dumps(args))
    how = f"accelerate launch --config_file {config.launch.config}" if config.launch.config else "torchrun"
    status(f"training in {config.launch.processes if not config.launch.config else 'the configured'} processes ({how})")
    # torchrun would pin every process to one thread (and say so); share the cores instead.
    threads = max(1, (os.cpu_count() or 1) // config.launch.processes)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env)
    try:
        code = proc.wait()
    except BaseException:  # SIGTERM or Ctrl-C: stop the workers too (torchrun and accelerate pass SIGTERM on)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    error = context.work_dir / ERROR
    if error.is_file():
        saved = json.loads(error.read_text())
        raise getattr(errors, saved["type"], StageFailed)(saved["message"])
    if code != 0 or not (context.work_dir / RESULT).is_file():
        raise StageFailed(
            f"stage '{config.name}': the launched training processes exited with status {code} (their output is "
            f"above); checkpoints are kept in {context.work_dir}, so running the same command again resumes"
        )
    return StageResult(**json.loads((context.work_dir / RESULT).read_text()))


def _worker(args: dict) -> None:
    """One launched process: rebuild the stage from the run's resolved recipe and train."""
    import yaml
    from accelerate import PartialState

    from slimlm.cli import _quiet_libraries
    from slimlm.distill.stage import run
    from slimlm.progress import console
    from slimlm.recipe import Recipe
    from slimlm.sources.text import DataStore

    _quiet_libraries()
    state = PartialState(cpu=args["device"] == "cpu")  # on CPU, accelerate forms a gloo group only when told
    if state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):  # would train N unsynchronised copies
        raise SystemExit(
            f"accelerate sees {state.num_processes} process(es), but WORLD_SIZE is {os.environ['WORLD_SIZE']}"
        )
    console.quiet = not state.is_main_process  # one progress bar and one set of messages, from the main process
    recipe = Recipe.model_validate(yaml.safe_load(Path(args["recipe"]).read_text()))
    work_dir = Path(args["work_dir"])
    context = StageContext(
        recipe=recipe,
        input_dir=Path(args["input_dir"]),
        teacher_dir=Path(args["teacher_dir"]),
        output_dir=Path(args["output_dir"]),
        work_dir=work_dir,
        data=DataStore(
            dict(recipe.data),
            teacher_dir=Path(args["teacher_dir"]),
            cache_dir=Path(args["cache_dir"]) if args["cache_dir"] else None,
        ),
        device=args["device"],
        seed=args["seed"],
    )
    try:
        result = run(recipe.stage(args["stage"]), context)
    except errors.SlimlmError as e:
        if state.is_main_process:
            (work_dir / ERROR).write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise SystemExit(e.exit_code) from None
    if state.is_main_process:
        tmp = work_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps({"artifact": result.artifact, "metrics": result.metrics}))
        shutil.move(tmp, work_dir / RESULT)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
