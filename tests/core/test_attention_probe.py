"""The attention probe against the model's own eager attention weights, and FastV built on it."""

from __future__ import annotations

import torch
from helpers import inputs, mixed_specs, model_for, patch_positions

import vtprune
from vtprune.ops.select import topk_indices
from vtprune.patches import adapter_for
from vtprune.patches.attention import attention_rows
from vtprune.policies import FastV


def _layer_inputs_and_eager_weights(family, layer_idx):
    model = model_for(family, "eager")
    batch = inputs(model, mixed_specs(family))
    seen = {}
    layer = model.model.language_model.layers[layer_idx]
    handle = layer.register_forward_pre_hook(
        lambda _m, args, kw: seen.update(h=args[0], pe=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    handle.remove()
    # only softmax-attention layers return weights (Qwen3.5's linear-attention layers have none)
    attention_layers = list(adapter_for(model).attention_layers())
    return model, batch, layer, seen, out.attentions[attention_layers.index(layer_idx)]


def test_probe_rows_equal_eager_attention_weights(family):
    model, batch, layer, seen, weights = _layer_inputs_and_eager_weights(family, 1)
    mask = batch["attention_mask"].bool()
    for b in range(mask.shape[0]):
        valid = torch.nonzero(mask[b]).flatten()
        queries = torch.stack([valid[-1], valid[len(valid) // 2], valid[0]])
        pe = tuple(t[b if t.shape[0] > 1 else 0] for t in seen["pe"])
        got = attention_rows(layer, seen["h"][b], pe, queries, mask[b])
        want = weights[b].mean(0)[queries]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_fastv_keeps_what_the_last_token_attends_to(family):
    model, batch, _layer, _seen, weights = _layer_inputs_and_eager_weights(family, 1)
    row = weights[0].mean(0)[-1]  # sample 0 is left-padded: its last token is the last column
    visual = patch_positions(model, batch)
    vtprune.wrap(model, FastV(keep=4, at_layer=2))
    model(**batch)
    image = vtprune.report(model).to_dict()["samples"][0]["images"][0]
    n = image["tokens"]
    assert image["stages"]["llm@2"]["kept"] == topk_indices(row[visual[:n]], 4).tolist()
