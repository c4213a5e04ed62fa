"""Run one stage in several processes, while the run itself (manifests, evaluation, gates) stays in one.

A stage asks for processes through its config's `launch_options()` (today: distill's `launch:`).
`processes: N` starts N local processes with torchrun (DDP: gloo on CPU, NCCL on GPUs); `config: FILE`
hands an accelerate config (FSDP, DeepSpeed ZeRO-3, multi-node) to `accelerate launch`. Each process
runs `python -m slimlm.launch`, rebuilds the stage from its config and the recipe's data specs, and
trains its share of every global batch; the main process saves the model and writes the result the
parent reads back. A crash leaves the checkpoints in the work folder, so running the same command
again resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from slimlm import errors
from slimlm.artifacts import atomic_write
from slimlm.errors import StageFailed
from slimlm.progress import status
from slimlm.stage import StageConfig, StageContext, StageResult

RESULT, ERROR, JOB = "launch-result.json", "launch-error.json", "launch-job.json"


def launch_command(options: Any, job: Path) -> list[str]:
    module = ["-m", "slimlm.launch", str(job)]
    if options.config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", options.config, *module]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={options.processes}",
        *module,
    ]


def run_launched(config: StageConfig, context: StageContext, data_specs: dict[str, Any]) -> StageResult:
    """The parent's side: start the processes, wait, and return the main process's result (or its error)."""
    options = config.launch_options()
    for data in config.data_references().values():  # teacher-generated data is sampled once, here, not in every process
        context.data.documents(data)
    for name in (RESULT, ERROR):
        (context.work_dir / name).unlink(missing_ok=True)
    job = {
        "kind": config.kind,
        "config": config.model_dump(mode="json"),
        "data": {name: spec.model_dump(mode="json") for name, spec in data_specs.items()},
        "input_dir": str(context.input_dir),
        "teacher_dir": str(context.teacher_dir),
        "output_dir": str(context.output_dir),
        "work_dir": str(context.work_dir),
        "cache_dir": str(context.data.cache_dir) if context.data.cache_dir else None,
        "device": context.device,
        "seed": context.seed,
        "dtype": context.dtype,
        "trust_remote_code": context.trust_remote_code,
    }
    (context.work_dir / JOB).write_text(json.dumps(job))
    how = f"accelerate launch --config_file {options.config}" if options.config else "torchrun"
    status(f"training in {options.processes if not options.config else 'the configured'} processes ({how})")
    # torchrun would pin every process to one thread (and say so); share the cores instead.
    threads = max(1, (os.cpu_count() or 1) // options.processes)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(launch_command(options, context.work_dir / JOB), env=env)
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


def _worker(job: dict) -> None:
    """One launched process: rebuild the stage from its config and data specs, and run it."""
    from accelerate import PartialState

    from slimlm.progress import console, quiet_libraries
    from slimlm.sources.specs import DataSpec
    from slimlm.sources.text import DataStore
    from slimlm.stages import STAGES

    quiet_libraries()
    state = PartialState(cpu=job["device"] == "cpu")  # on CPU, accelerate forms a gloo group only when told
    if state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):  # would train N unsynchronised copies
        raise SystemExit(
            f"accelerate sees {state.num_processes} process(es), but WORLD_SIZE is {os.environ['WORLD_SIZE']}"
        )
    console.quiet = not state.is_main_process  # one progress bar and one set of messages, from the main process
    kind = STAGES[job["kind"]]
    work_dir = Path(job["work_dir"])
    context = StageContext(
        input_dir=Path(job["input_dir"]),
        teacher_dir=Path(job["teacher_dir"]),
        output_dir=Path(job["output_dir"]),
        work_dir=work_dir,
        data=DataStore(
            {name: DataSpec.model_validate(spec) for name, spec in job["data"].items()},
            teacher_dir=Path(job["teacher_dir"]),
            cache_dir=Path(job["cache_dir"]) if job["cache_dir"] else None,
        ),
        device=job["device"],
        seed=job["seed"],
        dtype=job["dtype"],
        trust_remote_code=job["trust_remote_code"],
    )
    try:
        result = kind.run(kind.config.model_validate(job["config"]), context)
    except errors.SlimlmError as e:
        if state.is_main_process:
            (work_dir / ERROR).write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise SystemExit(e.exit_code) from None
    if state.is_main_process:
        with atomic_write(work_dir / RESULT) as tmp:
            tmp.write_text(json.dumps({"artifact": result.artifact, "metrics": result.metrics}))


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
