"""The task interface and the registry of tasks by name."""

import importlib
import json
import pkgutil
from typing import ClassVar

from torch import Tensor, nn
from torch.utils.data import Dataset

from pyvidfast.io import VideoDataset
from pyvidfast.models import create_model
from pyvidfast.train.data import Batch, TrainingClips

TASKS: dict[str, type["Task"]] = {}


class Task(nn.Module):
    """One training recipe: ``Task.build(args)`` makes it from the command line; ``task(batch) -> (loss,
    metrics)`` owns everything between a batch of normalized clips and the loss (masks, targets, input
    preparation, the loss itself).

    ``task.model`` is what is trained, handed to the optimizer and checkpointed (its ``state_dict`` is a
    checkpoint's ``model``); ``task.dataset`` yields ``(clip, label, seed)`` for ``(index, seed)`` items of the
    step sampler. A frozen helper (a teacher) stays outside the module tree, so neither DDP nor the checkpoint
    sees it. The loop wraps the task itself in DDP, so every parameter that gets a gradient runs in ``forward``.
    """

    name: ClassVar[str]  # the registry key (``python -m pyvidfast.train <command>`` maps onto it)
    find_unused_parameters: ClassVar[bool] = False  # DDP: parameters some steps leave without a gradient

    def __init__(self, model: nn.Module, dataset: Dataset):
        super().__init__()
        self.model = model
        self.dataset = dataset

    @classmethod
    def build(cls, args) -> "Task":
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[Tensor, dict]:
        raise NotImplementedError

    # Evaluation (``python -m pyvidfast.train eval``): the classification task of a model's family says how its
    # model classifies views. Family tasks claim their models; the plain classification task takes the rest.

    @classmethod
    def evaluates(cls, model: nn.Module) -> bool:
        return False

    @classmethod
    def eval_shape(cls, model: nn.Module, args) -> tuple[int, int]:
        """(frames, crop side) of the evaluation views."""
        config = model.data_config
        return args.frames or config.num_frames, args.size or config.img_size

    @classmethod
    def predict(cls, model: nn.Module, video: Tensor, args) -> Tensor:
        """Logits [V, classes] of normalized views [V, 3, T, H, W]."""
        raise NotImplementedError


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: registers a task under its ``name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def _import_task_files() -> None:
    """Imports every module of this package, so a new family's task file registers itself."""
    package = importlib.import_module("pyvidfast.train.tasks")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"pyvidfast.train.tasks.{module.name}")


def get_task(name: str) -> type[Task]:
    _import_task_files()
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]


def eval_task(model: nn.Module) -> type[Task]:
    """The task that evaluates ``model``: the one of its family, else plain classification."""
    _import_task_files()
    claimed = [task for task in TASKS.values() if task.evaluates(model)]
    return claimed[0] if claimed else TASKS["finetune"]


# Shared by the tasks' ``build``


# Command-line flags that are model constructor arguments: ``args`` attribute -> (keyword, flag).
MODEL_FLAGS = {"clip_weights": ("clip_weights", "--clip-weights"), "frozen": ("frozen", "--frozen"),
               "drop_path": ("drop_path_rate", "--drop-path"),
               "backbone_drop_path": ("backbone_drop_path_rate", "--backbone-drop-path")}


def model_options(args) -> dict:
    """Constructor overrides of the command line: ``--model-kwargs`` plus the model flags that are set."""
    options = json.loads(args.model_kwargs) if args.model_kwargs else {}
    for attr, (keyword, flag) in MODEL_FLAGS.items():
        value = getattr(args, attr, None)
        if value is None or value is False:
            continue
        if keyword in options and options[keyword] != value:
            raise ValueError(f"{flag}: {value!r} contradicts {keyword}={options[keyword]!r} of --model-kwargs")
        options[keyword] = value
    return options


def build_model(name: str, options: str | dict = "", checkpoint: str | None = None) -> nn.Module:
    """A registered model with constructor overrides (a dict, or JSON as ``--model-kwargs`` holds it), loaded
    (strict) from ``checkpoint`` when given. An override the model does not take is reported by its flag."""
    if isinstance(options, str):
        options = json.loads(options) if options else {}
    try:
        return create_model(name, pretrained=checkpoint or None, **options)
    except TypeError as error:
        flags = {keyword: flag for keyword, flag in MODEL_FLAGS.values()}
        for keyword in options:
            if f"unexpected keyword argument '{keyword}'" in str(error):
                flag = flags.get(keyword, f"--model-kwargs {keyword}")
                raise ValueError(f"{flag}: model {name} does not take {keyword!r}") from error
        raise


def videos(args, model: nn.Module) -> VideoDataset:
    """The list file's videos, normalized with the model's own mean and std."""
    config = model.data_config
    return VideoDataset(args.list, mean=config.mean, std=config.std)


def model_clips(args, model: nn.Module) -> TrainingClips:
    """Clips of the model's own frame count and size: every ``--stride``-th frame, or one frame per segment with
    ``--sampling segments``."""
    config = model.data_config
    return TrainingClips(videos(args, model), args.stride, (config.num_frames, config.img_size),
                         getattr(args, "sampling", None) or "dense")
