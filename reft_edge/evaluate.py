"""Evaluation, above training and the runtime: a bundle through the runtime's backend (torch-free,
reft_edge.runtime.evaluate), a torch model through training's (reft_edge.train.evaluate, imported only
for ``model=``). The report, the facts and the judges are the runtime's; only the backend differs.

Example::

    from reft_edge.evaluate import evaluate
    report = evaluate("bundle-int8", data="heldout.jsonl", patches=["emoji.reft"], judge="no-letters")
    evaluate(model="default", data="prompts.txt", patches=["emoji.reft"])   # the torch model instead
"""

from __future__ import annotations

from typing import Any


def evaluate(bundle: Any = None, **options: Any) -> Any:
    """runtime.evaluate.evaluate (same arguments, same EvalReport), with a torch ``model=`` opened by
    the training stage."""
    from reft_edge.runtime.evaluate import evaluate as evaluate_backend

    if options.get("model") is not None and options.get("open_model") is None:
        from reft_edge.train.evaluate import open_model  # torch loads only here

        options["open_model"] = open_model
    return evaluate_backend(bundle, **options)
