"""``--model vtprune`` in lmms-eval's own CLI, registered through its ``lmms_eval.models`` entry point.

    lmms-eval --model vtprune --model_args pretrained=PATH,policy=idpruner,keep=64 --tasks ...

The same model as ``vtprune eval`` builds (lmms-eval's wrapper for the
checkpoint's family, its HF model wrapped by vtprune), without the runner's
result checks and report: lmms-eval's CLI exits 0 even when the evaluation
failed, so prefer ``vtprune eval``. Network settings are the environment's
(lmms-eval's own CLI has no ``--offline``: export ``HF_HUB_OFFLINE=1`` etc.).
"""

from __future__ import annotations

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    """The entry point's payload (see setup.py)."""
    return ModelManifest(model_id="vtprune", simple_class_path="vtprune.eval.lmms_plugin.Vtprune")


class Vtprune(lmms):
    """A factory, not a model class: ``create_from_arg_string`` returns the family's own lmms-eval wrapper, pruned.

    ``is_simple`` only satisfies lmms-eval's registry check; the evaluator
    reads the flag of the returned instance (the chat wrapper, as lmms-eval
    picks by default).
    """

    is_simple = True

    def __init__(self, **kwargs) -> None:
        raise TypeError("Vtprune is built by create_from_arg_string (lmms-eval --model vtprune --model_args ...)")

    @classmethod
    def create_from_arg_string(cls, arg_string: str | dict, additional_config: dict | None = None):
        import torch

        from .. import api
        from .lmms import load_model, processor_of, split_policy

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        device = extra.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        lm, prune = load_model(arg_string, batch_size=int(extra.get("batch_size") or 1), device=device)
        policy, keep, options = split_policy(prune)
        if policy != "none":
            api.wrap(lm.model, policy, keep, tokenizer=processor_of(lm), **options)
        return lm

    @classmethod
    def create_from_arg_object(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls.create_from_arg_string(arg_dict, additional_config)
