"""Training scripts: ``python -m pyvidfast.train {pretrain,finetune,distill,eval} ...`` (single process or
``torchrun``).

See :mod:`pyvidfast.train.loop` for the loops, :mod:`pyvidfast.train.data` for the video list data,
:mod:`pyvidfast.train.optim` for the optimizer groups and schedule and :mod:`pyvidfast.train.flux` for the FluxViT
objectives (``finetune --flux``, ``distill``).
"""
