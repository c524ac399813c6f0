"""Training objectives, one per recipe, behind one interface (:class:`Task`): ``Task.build(args)`` makes the task
(its model and its data) from the command line, ``task(batch) -> (loss, metrics)`` computes the loss.

Every module of this package is a task file; its tasks register themselves with :func:`register_task` and are
found by name (``python -m pyvidfast.train <command>``): ``pretrain`` (:mod:`.videomae`), ``finetune``
(:mod:`.classification`), ``flux_finetune`` and ``distill`` (:mod:`.fluxvit`). A new family adds a task file.
"""

from pyvidfast.train.tasks.base import TASKS, Task, eval_task, get_task, register_task

__all__ = ["TASKS", "Task", "eval_task", "get_task", "register_task"]
