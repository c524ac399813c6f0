"""Training scripts: ``python -m pyvidfast.train {pretrain,finetune,eval} ...`` (single process or ``torchrun``).

See :mod:`pyvidfast.train.loop` for the loops, :mod:`pyvidfast.train.data` for the video list data and
:mod:`pyvidfast.train.optim` for the optimizer groups and schedule.
"""
