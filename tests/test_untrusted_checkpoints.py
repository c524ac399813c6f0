"""Untrusted checkpoints: pickles are only ever read with `torch.load(weights_only=True)` or, for DCP's
`.metadata`, an unpickler that allows DCP's own classes only, so a checkpoint cannot run code when it is loaded."""

import ast
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pyvidfast
from pyvidfast.models.registry import read_state_dict
from pyvidfast.train import checkpoint

PACKAGE = Path(pyvidfast.__file__).parent


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{source.relative_to(PACKAGE.parent)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]


class RunsCode:
    """Unpickling this calls open(marker, "w"): what a hostile checkpoint would do with a worse function."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_checkpoint_that_runs_code_is_refused(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = tmp_path / ("model" + suffix)
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        read_state_dict(path)
    assert not marker.exists()


def sharded_checkpoint(folder, extra):
    """A DCP folder as training writes one: tensors under "model." and the `extra` record as bytes."""
    state = {"model.weight": torch.arange(6.0).reshape(2, 3), "extra": extra}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder


def test_sharded_checkpoint_reads_and_one_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    folder = sharded_checkpoint(tmp_path / "good", checkpoint._to_bytes({"step": 4, "args": {}}))
    weights, extra = checkpoint.read_sharded(folder)
    assert torch.equal(weights["weight"], torch.arange(6.0).reshape(2, 3)) and extra == {"step": 4, "args": {}}
    # DCP's own reader unpickles .metadata with pickle.load: a crafted one is refused before it runs.
    crafted = tmp_path / "crafted_metadata"
    shutil.copytree(folder, crafted)
    with open(crafted / ".metadata", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(checkpoint.CheckpointError, match="is not allowed in a DCP .metadata file"):
        checkpoint.read_sharded(crafted)
    # DCP's planner reads non-tensor items with torch.load(weights_only=False): a crafted one is refused.
    crafted = sharded_checkpoint(tmp_path / "crafted_item", RunsCode(marker))
    with pytest.raises(BaseException, match="Weights only load failed"):
        checkpoint.read_sharded(crafted)
    assert not marker.exists()
