"""Untrusted checkpoints: pickles are only ever read with `torch.load(weights_only=True)`, so a checkpoint file
cannot run code when it is loaded."""

import ast
from pathlib import Path

import pytest
import torch

import pyvidfast
from pyvidfast.models.registry import read_state_dict

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
