"""The image's entrypoint: check the volumes a run writes to, say which device it will use, then become slimlm.

A run writes everything it produces under its run directory (runs/<recipe name> in /work by default), and
a model fetched from the hub goes to /cache. Without a host volume for the run directory, the outputs would
go down with the container; on a read-only one, the run would fail at its first write. Both are refused
here, before a model is loaded, with one message and exit 2. A missing cache volume is only said: the run
works, and downloads again next time.

slimlm replaces this process (exec), so `docker stop`'s SIGTERM reaches it directly: it stops at once,
keeps its checkpoints, exits 143, and the same `docker run` again resumes the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WORKDIR = Path("/work")
CACHE = Path("/cache")
WRITES = {"run", "report"}  # the commands that write into a run directory


def mounts() -> dict[Path, bool]:
    """Each mount point of this container and whether it is read-only (/proc/self/mountinfo)."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        out[Path(point)] = "ro" in fields[5].split(",")
    return out


def volume_of(path: Path, points: dict[Path, bool]) -> Path:
    """The mount point that holds `path` (the longest that is a parent of it)."""
    return max((p for p in points if path == p or p in path.parents), key=lambda p: len(p.parts))


def run_directory(args: list[str]) -> Path:
    """Where the command writes: --run-dir, `report`'s RUN_DIR, or the run default runs/<name> (in /work/runs)."""
    for i, arg in enumerate(args):
        if arg == "--run-dir" and i + 1 < len(args):
            return (WORKDIR / args[i + 1]).resolve()
        if arg.startswith("--run-dir="):
            return (WORKDIR / arg.split("=", 1)[1]).resolve()
    if args[0] == "report" and len(args) > 1:
        return (WORKDIR / args[1]).resolve()
    return WORKDIR / "runs"


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_volumes(args: list[str]) -> None:
    points = mounts()
    target = run_directory(args)
    volume = volume_of(target, points)
    if volume == Path("/"):
        refuse(
            f"the run directory {target} is not on a volume, so what the run makes would be lost with the container: "
            f"mount a host folder there, e.g. docker run -v $PWD/runs:{WORKDIR / 'runs'} ..."
        )
    if points[volume]:
        refuse(f"the run volume {volume} is mounted read-only: mount it read-write (drop :ro) so the run can write")
    if not os.access(volume, os.W_OK):
        refuse(
            f"the run volume {volume} is not writable by uid {os.getuid()}: run with --user matching the folder's owner "
            "(e.g. --user $(id -u):$(id -g)), or make the folder writable"
        )
    if volume_of(CACHE, points) == Path("/"):
        print(
            f"note: {CACHE} is not a volume, so a model fetched from the hub is fetched again by the next container "
            f"(-v $HOME/.cache/slimlm-docker:{CACHE})",
            file=sys.stderr,
        )


def say_device() -> None:
    """The device a run will use, as slimlm picks it (device: auto), and whether it computes bf16."""
    import torch

    from slimlm.distill.precision import cpu_computes_bf16

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
        print(f"slimlm container: {torch.cuda.device_count()} CUDA device(s), {', '.join(names)}; {bf16}", flush=True)
    else:
        bf16 = "bf16 (AVX512-BF16 or AMX)" if cpu_computes_bf16() else "no bf16"
        print(f"slimlm container: no CUDA device, CPU with {os.cpu_count()} cores; {bf16}", flush=True)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in WRITES:
        check_volumes(args)
    if args and args[0] == "run":
        say_device()
    os.execvp("slimlm", ["slimlm", *args])


if __name__ == "__main__":
    main()
