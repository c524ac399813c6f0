"""Training scripts: ``python -m pyvidfast.train {pretrain,finetune,distill,eval} ...`` (single process or
``torchrun``).

See :mod:`pyvidfast.train.tasks` for the objectives (one per recipe), :mod:`pyvidfast.train.loop` for the loop,
:mod:`pyvidfast.train.evaluate` for multi-view evaluation, :mod:`pyvidfast.train.data` for the step sampler and
batches and :mod:`pyvidfast.train.optim` for the optimizer groups and schedule; docs/training.md for all of it.
"""
