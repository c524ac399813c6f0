"""Recipe defaults: a setting left out on the command line comes from the model's published recipe
(``model.recipe``, e.g. UniFormerV2's ``RECIPES``) when it has one, else from the command's own default. The flags
this covers default to None in the parser, which lists its own defaults in ``args.fallbacks``."""

import json

import torch

from pyvidfast.train.tasks.base import MODEL_FLAGS, build_model, model_options

# ``args`` attribute -> its value from a recipe (None: the recipe does not say).
FROM_RECIPE = {
    "lr": lambda recipe, args: recipe.get("lr"),
    "min_lr": lambda recipe, args: recipe.get("end_lr"),
    "weight_decay": lambda recipe, args: recipe.get("weight_decay"),
    "betas": lambda recipe, args: list(recipe["betas"]) if "betas" in recipe else None,
    # The recipe counts epochs; the schedule here counts steps: the same share of the run warms up.
    "warmup_steps": lambda recipe, args: (round(args.steps * recipe["warmup_epochs"] / recipe["epochs"])
                                          if "warmup_epochs" in recipe and "epochs" in recipe else None),
    "sampling": lambda recipe, args: ({"segment": "segments", "dense": "dense"}[recipe["sampling"]]
                                      if "sampling" in recipe else None),
    "drop_path": lambda recipe, args: recipe.get("drop_path_rate"),
    "backbone_drop_path": lambda recipe, args: recipe.get("backbone_drop_path_rate"),
    "num_crops": lambda recipe, args: recipe.get("test_crops"),
    "num_clips": lambda recipe, args: recipe.get("test_clips"),
}


def model_recipe(args) -> dict:
    """``model.recipe`` of the command's model (built on the meta device, without weights), or {}."""
    options = {k: v for k, v in model_options(args).items() if k != "clip_weights"}
    with torch.device("meta"):
        model = build_model(args.model, options)
    return dict(getattr(model, "recipe", None) or {})


def apply_recipe(args) -> dict:
    """Fills every setting of :data:`FROM_RECIPE` that ``args`` has and the user left at None: from the model's
    recipe, else from ``args.fallbacks``. Returns ``{setting: {"value": ..., "from": ...}}`` for all of them."""
    recipe = model_recipe(args)
    given = json.loads(args.model_kwargs) if args.model_kwargs else {}
    keywords = {attr: keyword for attr, (keyword, _) in MODEL_FLAGS.items()}
    used = {}
    for attr, read in FROM_RECIPE.items():
        if not hasattr(args, attr):
            continue
        source = "command line"
        if getattr(args, attr) is None:
            if keywords.get(attr) in given:  # set through --model-kwargs: the model gets it from there
                used[attr] = {"value": given[keywords[attr]], "from": "--model-kwargs"}
                continue
            value = read(recipe, args)
            source = "model.recipe" if value is not None else "default"
            setattr(args, attr, value if value is not None else args.fallbacks.get(attr))
        used[attr] = {"value": getattr(args, attr), "from": source}
    return used


def describe(settings: dict) -> str:
    """One line for the user: ``setting=value (from)`` of every setting."""
    return "settings: " + ", ".join(f"{k}={v['value']} ({v['from']})" for k, v in settings.items())
