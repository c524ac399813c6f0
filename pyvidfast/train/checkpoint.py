"""Training checkpoints: what they hold, how they are written so a crash never leaves a broken one in place, how a
run finds the one to resume, and ``export`` to a single weights file.

Two formats, the same content (the task's model, optimizer, scheduler, step, every rank's RNG states, the
command line):

- ``OUT/checkpoint.pth`` (DDP and single-process runs): rank 0 writes ``checkpoint.pth.tmp`` and renames it.
- ``OUT/checkpoints/step_NNNNNNNN/`` (``--fsdp``): a ``torch.distributed.checkpoint`` (DCP) folder, each rank
  writing its own shards of the parameters and optimizer states. All ranks write into
  ``OUT/checkpoints/.step_NNNNNNNN.partial/``; once DCP has written its ``.metadata`` (after every rank's shards),
  rank 0 renames the folder into place and removes the older ones. DCP reshards on load, so a run resumes at
  another world size (the RNG states are then not restored: see :func:`load_checkpoint`).

A folder without ``.metadata`` or a name starting with ``.`` is never resumed from, so a rank killed mid-write,
a full disk or a power cut leaves the previous checkpoint as the one ``--resume auto`` finds.
"""

import io
import json
import os
import pickle
import random
import shutil
import signal
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pyvidfast.train.distributed import Context

CHECKPOINT_NAME = "checkpoint.pth"
SHARDED_DIR = "checkpoints"
METADATA = ".metadata"  # written by DCP last: a folder that has it is complete
DCP_ERRORS = (Exception, CheckpointException)  # DCP's CheckpointException derives from BaseException
FAULT_ENV = "PYVIDFAST_FAULT"  # tests only: "kill-in-save:STEP:RANK" SIGKILLs that rank after writing its shards


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    """RNG states as tensors and plain values, so checkpoints load with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx: Context) -> list[dict]:
    states = [None] * ctx.world
    if ctx.grouped and ctx.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


# ----------------------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume


def sharded_step(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def latest_sharded(out: Path) -> Path | None:
    """The newest complete DCP folder of run folder ``out`` (partial ones are skipped), else None."""
    root = out / SHARDED_DIR
    if not root.is_dir():
        return None
    complete = [f for f in root.glob("step_*") if f.is_dir() and (f / METADATA).exists()]
    return max(complete, key=sharded_step, default=None)


def resume_path(out: Path, resume: str, sharded: bool) -> Path | None:
    """The checkpoint ``--resume`` names: a ``.pth`` file, a DCP folder or a run folder (its newest checkpoint);
    ``auto``: the newest checkpoint of ``out`` in this run's format (``sharded``), else in the other one, else None
    (a fresh start)."""
    if not resume:
        return None
    if resume == "auto":
        pth = out / CHECKPOINT_NAME
        found = [latest_sharded(out), pth if pth.exists() else None]
        found = [p for p in (found if sharded else found[::-1]) if p is not None]
        return found[0] if found else None
    path = Path(resume)
    if path.is_dir() and not path.name.startswith("step_") and not (path / METADATA).exists():  # a run folder
        found = latest_sharded(path) or (path / CHECKPOINT_NAME if (path / CHECKPOINT_NAME).exists() else None)
        if found is None:
            raise FileNotFoundError(f"resume: {path} holds no complete checkpoint ({SHARDED_DIR}/step_*/ with "
                                    f"{METADATA}, or {CHECKPOINT_NAME})")
        return found
    if not path.exists():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path


def is_sharded(path: Path) -> bool:
    return path.is_dir()


# ----------------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(out: Path, ctx: Context, model, optimizer, scheduler, step: int, args: dict,
                    sharded: bool = False) -> Path:
    """Writes the checkpoint of ``step`` (every rank calls this); returns its path. A write that fails (a full
    disk, a rank lost) raises :class:`CheckpointError` on every rank and leaves nothing partial in place."""
    extra = {"scheduler": scheduler.state_dict(), "step": step, "rng": gather_rng_states(ctx), "args": args}
    if sharded:
        return _save_sharded(out, ctx, model, optimizer, step, extra)
    path = out / CHECKPOINT_NAME
    error = ""
    if ctx.main:
        partial = path.with_name(path.name + ".tmp")
        try:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, partial)
            _fsync(partial)
            os.replace(partial, path)  # atomic on POSIX: readers see the old or the new checkpoint, never half
        except (OSError, RuntimeError) as caught:  # torch.save reports ENOSPC as a zip writer RuntimeError
            error = write_failure(caught, path.parent, state_bytes(model.state_dict(), optimizer.state_dict()))
            partial.unlink(missing_ok=True)
    _agree_on_failure(ctx, error, path)
    return path


def _save_sharded(out: Path, ctx: Context, model, optimizer, step: int, extra: dict) -> Path:

    root = out / SHARDED_DIR
    final = root / f"step_{step:08d}"
    if (final / METADATA).exists():  # this step is saved already (e.g. a SIGTERM right after a save)
        return final
    partial = root / f".{final.name}.partial"
    if ctx.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash
    ctx.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "extra": _to_bytes(extra)}
    error = ""
    try:
        dcp.save(state, storage_writer=ShardWriter(partial, step, ctx.rank))
    except DCP_ERRORS as caught:  # DCP raises the failure of any rank on every rank
        error = write_failure(caught, root, state_bytes(state))
    if ctx.main:
        if error:
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, final)
            _fsync(root)
            for older in root.glob("step_*"):
                if older != final and sharded_step(older) < step:
                    shutil.rmtree(older, ignore_errors=True)
    _agree_on_failure(ctx, error, final)
    return final


def state_bytes(*states) -> int:
    """Bytes of the tensors (this rank's shards of sharded ones) in nested state dicts."""
    total = 0
    for state in states:
        for value in state.values():
            if isinstance(value, dict):
                total += state_bytes(value)
            elif isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def write_failure(error: Exception, folder: Path, needed: int) -> str:
    """What went wrong in a checkpoint write, saying so when the disk is full (torch.save and DCP report ENOSPC
    as a zip-writer error, 'unexpected pos'); read before the partial files are removed."""
    free = shutil.disk_usage(folder).free
    reason = f"{type(error).__name__}: {error}".strip()
    if free < needed:
        reason = (f"the disk is full: {free} bytes free on the file system of {folder}, this rank writes {needed}; "
                  f"{reason}")
    return reason


def _agree_on_failure(ctx: Context, error: str, path: Path) -> None:
    """Every rank learns whether the write failed (instead of a barrier, so no rank waits forever)."""
    failed = ctx.sum(torch.tensor([1.0 if error else 0.0]))
    if float(failed[0]) > 0:
        reason = error or "another rank failed"
        raise CheckpointError(f"checkpoint: writing {path} failed ({reason}); nothing partial is left in place and "
                              "the previous checkpoint, if any, is still the one --resume auto finds")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class ShardWriter(FileSystemWriter):
    """DCP's file writer (files fsynced), plus the fault the tests inject: ``PYVIDFAST_FAULT=kill-in-save:STEP:RANK``
    SIGKILLs that rank once its shards are written and before the checkpoint is complete, in the first attempt of
    a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` 0), so an elastic restart gets past it."""

    def __init__(self, path: Path, step: int, rank: int):
        super().__init__(path, sync_files=True)
        self.step, self.rank = step, rank

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        if (os.environ.get(FAULT_ENV) == f"kill-in-save:{self.step}:{self.rank}"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            written.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return written


# ----------------------------------------------------------------------------------------------------------------
# Reading
# DCP reads its ``.metadata`` with plain ``pickle.load`` and its non-tensor items with
# ``torch.load(weights_only=False)``, so a crafted checkpoint folder could run code when it is loaded. The reader
# and planner below check each pickle with a restricted unpickler first, then let DCP read it as it does.

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Allows only what DCP writes into ``.metadata``: the classes of its metadata module, its file entries, torch
    dtypes, ``torch.Size``, layouts by name and paths."""

    def find_class(self, module, name):
        if module in (_DCP_METADATA_MODULE, "torch") or (module, name) in _DCP_METADATA_GLOBALS:
            found = super().find_class(module, name)
            if ((module, name) in _DCP_METADATA_GLOBALS or isinstance(found, torch.dtype)
                    or (module == _DCP_METADATA_MODULE and isinstance(found, type) and found.__module__ == module)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")


class ShardReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` checked by :class:`_DcpMetadataUnpickler` before DCP unpickles it."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / METADATA, "rb") as f:
            _DcpMetadataUnpickler(f).load()
        return super().read_metadata(*args, **kwargs)


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, with each non-tensor item (``extra``) checked by ``torch.load(weights_only=True)`` first."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def load_checkpoint(path: Path, ctx: Context, model, optimizer, scheduler) -> int:
    """Restores a training checkpoint (a ``.pth`` file or a DCP folder); returns the number of steps done. A DCP
    checkpoint loads at any world size; each rank's RNG states come back only at the world size that wrote them
    (random draws outside the sample seeds, e.g. dropout, then differ from an uninterrupted run)."""
    if is_sharded(path):
        return _load_sharded(path, ctx, model, optimizer, scheduler)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model_state, optimizer_state = payload["model"], payload["optimizer"]
    except Exception as error:  # truncated or corrupt: the zip reader or the unpickler fails
        raise CheckpointError(f"checkpoint: cannot read {path}: it is truncated or corrupt "
                              f"({type(error).__name__}: {error})") from error
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(payload["scheduler"])
    states = payload["rng"]
    if len(states) != ctx.world:
        raise ValueError(f"resume: {path} was written by {len(states)} ranks; this run has {ctx.world} (only "
                         f"--fsdp checkpoints reshard)")
    set_rng_state(states[ctx.rank])
    return int(payload["step"])


def check_sharded(folder: Path):
    """The DCP metadata of ``folder`` after checking that every file it refers to is there and long enough;
    :class:`CheckpointError` naming the file otherwise."""

    if not (folder / METADATA).exists():
        raise CheckpointError(f"checkpoint: {folder / METADATA} is missing: {folder} is not a complete checkpoint")
    try:
        metadata = ShardReader(folder).read_metadata()
    except Exception as error:
        raise CheckpointError(f"checkpoint: cannot read {folder / METADATA}: it is truncated or corrupt "
                              f"({type(error).__name__}: {error})") from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.exists():
            raise CheckpointError(f"checkpoint: {file} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"checkpoint: {file} is truncated ({file.stat().st_size} bytes; the metadata "
                                  f"needs {size})")
    return metadata


def _load_sharded(folder: Path, ctx: Context, model, optimizer, scheduler) -> int:

    check_sharded(folder)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "extra": b""}
    try:
        dcp.load(state, storage_reader=ShardReader(folder), planner=WeightsOnlyLoadPlanner())
    except DCP_ERRORS as error:
        raise CheckpointError(f"checkpoint: cannot load {folder} into {type(model).__name__}: "
                              f"{type(error).__name__}: {error}") from error
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = _from_bytes(state["extra"])
    scheduler.load_state_dict(extra["scheduler"])
    if len(extra["rng"]) == ctx.world:
        set_rng_state(extra["rng"][ctx.rank])
    elif ctx.main:
        print(f"resume: {folder} was written by {len(extra['rng'])} ranks and this run has {ctx.world}: the "
              "parameters and optimizer states are resharded; the RNG states are not restored", flush=True)
    return int(extra["step"])


def read_sharded(folder: Path, prefix: str = "model.") -> tuple[dict[str, torch.Tensor], dict]:
    """The whole tensors under ``prefix`` of a DCP folder (prefix removed) and its ``extra`` record, read in this
    process without a process group or the model."""

    metadata = check_sharded(folder)
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    state = {**tensors, "extra": b""}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=ShardReader(folder), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    return {key.removeprefix(prefix): state[key] for key in tensors}, _from_bytes(state["extra"])


# ----------------------------------------------------------------------------------------------------------------
# Export


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """A training checkpoint (DCP folder, run folder or ``.pth``) -> one ``.safetensors`` or ``.pth`` file in the
    layout of the run's model family: the run's model is built from its saved command line, loaded strict through
    the family's checkpoint filter (a Flux run's ``backbone.*`` keys, projectors dropped) and saved with its own
    ``state_dict`` names, which ``create_model(name, pretrained=file, ...)`` loads strict. Returns ``out``."""
    from pyvidfast.models.registry import load_checkpoint as load_weights
    from pyvidfast.train.tasks.base import build_model, model_options

    out = Path(out)
    if out.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"--out: expected a .safetensors or .pth file; got {out}")
    path = resume_path(Path(checkpoint), str(checkpoint), sharded=True)
    if is_sharded(path):
        weights, extra = read_sharded(path)
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"checkpoint: cannot read {path}: it is truncated or corrupt ({error})") from error
        weights, extra = payload["model"], payload
    args = Namespace(**extra["args"])
    options = {k: v for k, v in model_options(args).items() if k != "clip_weights"}  # the weights are all here
    model = build_model(args.model, options)
    load_weights(model, weights)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    partial = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(partial), metadata={"model": args.model, "model_kwargs": json.dumps(options)})
    else:
        torch.save(state, partial)
    os.replace(partial, out)
    return out
