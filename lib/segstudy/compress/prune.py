"""Pruning (notebook 04): unstructured with torch.nn.utils.prune, structured with Torch-Pruning.

- Unstructured zeroes single weights: `layerwise` gives every conv the same sparsity (L1 per
  layer), `global` ranks all conv weights together (one magnitude threshold), `lamp` ranks them
  together by LAMP scores (one threshold, but scale-free per layer). The tensors stay dense, so
  dense kernels run exactly as slowly; only a compressed file gets smaller.
- Structured removes whole channels along Torch-Pruning's dependency graph (residual additions,
  DeepLabV3's ASPP concatenation, the head), leaving a smaller dense model that is really faster.
  The classifiers' output channels (the 19 classes) are never pruned.

A structurally pruned model no longer matches the architecture `build_model` makes, so its
checkpoint carries the pruned shapes: `models.checkpoint.load_trained` rebuilds the model and `reshape_to`
resizes it to the checkpoint's tensors before loading (plain tensors, loadable with weights_only).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as nn_prune

from segstudy.config import IMPORTANCES
from segstudy.data.labels import NUM_CLASSES
from segstudy.errors import UserError


def _check_amount(amount: float, key: str) -> None:
    if not 0.0 <= amount < 1.0:
        raise UserError(f"{key} = {amount}; it must be in [0, 1) (0.55 removes 55%)")


def classifiers(model: nn.Module) -> list[nn.Module]:
    """The convs that produce class scores: their outputs are the classes and are never pruned."""
    found = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES
             and name.split(".")[0] in ("classifier", "aux_classifier")]
    if not found:
        raise UserError(f"{type(model).__name__} has no classifier conv with {NUM_CLASSES} outputs; "
                        f"it is not a segstudy model")
    return found


def prunable_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    keep = {id(m) for m in classifiers(model)}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in keep]


# --- unstructured -------------------------------------------------------------------------------

def unstructured(model: nn.Module, amount: float, scope: str = "global", permanent: bool = True,
                 scores: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Zero `amount` of the conv weights by L1 magnitude, per layer or globally, in place. With
    `permanent`, the masks are folded in (prune.remove) so the model saves and loads like any
    other; without, they stay as hooks so a fine-tune keeps the zeros (then call make_permanent).
    `scores` ({conv name: LAMP scores}, from model_lamp_scores) spares recomputing them when the
    same weights are pruned to several levels."""
    _check_amount(amount, "prune.sparsity")
    if scope not in ("layerwise", "global", "lamp"):
        raise UserError(f"prune scope = '{scope}'; choose layerwise, global or lamp")
    convs = prunable_convs(model)
    if scope == "lamp":
        scores = scores or model_lamp_scores(model)
    else:  # L1: the weights' own magnitudes
        scores = {n: c.weight.detach().abs() for n, c in convs}
    keep = _keep_masks(scores, amount, per_layer=scope == "layerwise")
    for name, conv in convs:
        nn_prune.custom_from_mask(conv, "weight", keep[name])
    return make_permanent(model) if permanent else model


def _keep_masks(scores: dict[str, torch.Tensor], amount: float, per_layer: bool) -> dict[str, torch.Tensor]:
    """True where a weight's score is above the k-th smallest (k = amount of the weights, per layer
    or over all layers). torch's L1Unstructured ranks with a full topk instead: 3.3 s over the custom
    model's 27 M weights against 0.7 s for kthvalue, once per sweep point; the masks are the same."""
    def threshold(values: torch.Tensor) -> float:
        k = round(amount * values.numel())
        return values.float().kthvalue(k).values.item() if k else float("-inf")

    if per_layer:
        return {n: s > threshold(s.flatten()) for n, s in scores.items()}
    cut = threshold(torch.cat([s.flatten() for s in scores.values()]))
    return {n: s > cut for n, s in scores.items()}


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): w_u^2 / sum of w_v^2 over the layer's weights v with |w_v| >= |w_u|.
    Plain global magnitude compares raw weights across layers, but a conv followed by BatchNorm can
    have any scale, so it empties whole layers (measured in notebook 04); LAMP scores are comparable
    across layers while one global threshold still chooses how sparse each layer gets."""
    sq = weight.detach().flatten().float().pow(2)
    order = sq.argsort()
    ranked = sq[order]
    scores = torch.empty_like(sq)
    scores[order] = ranked / ranked.flip(0).cumsum(0).flip(0)
    return scores.view_as(weight)


def model_lamp_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: lamp_scores(conv.weight) for name, conv in prunable_convs(model)}


def make_permanent(model: nn.Module) -> nn.Module:
    for _, conv in prunable_convs(model):
        if nn_prune.is_pruned(conv):
            nn_prune.remove(conv, "weight")
    return model


def sparsity(model: nn.Module) -> dict:
    """Counted zeros: {"overall": fraction over prunable conv weights, "layers": {name: fraction}}."""
    layers, zeros, total = {}, 0, 0
    for name, conv in prunable_convs(model):
        z, n = int((conv.weight == 0).sum()), conv.weight.numel()
        layers[name] = z / n
        zeros, total = zeros + z, total + n
    return {"overall": zeros / max(total, 1), "layers": layers}


def compressed_size(saved: bytes | memoryview, threads: int = 2) -> int:
    """Bytes of a saved state_dict (measure.saved_state) gzip-compressed (level 1) as `threads`
    gzip members compressed in parallel (one valid .gz file, as pigz writes): how much the zeros of
    unstructured pruning are worth on disk (the dense kernels do not care). libdeflate (imagecodecs),
    not zlib: two to three times faster at level 1 (docs/results.md, "How long does the demo take")."""
    step = -(-len(saved) // threads)
    with ThreadPoolExecutor(threads) as pool:  # libdeflate releases the GIL
        parts = pool.map(lambda i: len(imagecodecs.gzip_encode(saved[i:i + step], level=1)),
                         range(0, len(saved), step))
        return sum(parts)


# --- structured ---------------------------------------------------------------------------------

def _importance(name: str):
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "group_norm":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise UserError(f"prune.importance = '{name}'; choose one of {', '.join(IMPORTANCES)}")


def structured_pruner(model: nn.Module, ratio: float, importance: str = "group_norm", steps: int = 1,
                      global_pruning: bool = False, layer_ratios: dict[str, float] | None = None,
                      example_size: tuple[int, int] = (64, 128), round_to: int = 16) -> tp.pruner.MetaPruner:
    """A Torch-Pruning MetaPruner removing `ratio` of each layer's channels in `steps` calls to
    .step() (iterative pruning, fine-tune in between). Channel counts are rounded to multiples of
    `round_to` (16: one AVX-512 register of fp32; odd counts such as 152 sent dilated convs down a
    path measured 4x slower than the unpruned model)."""
    _check_amount(ratio, "prune.ratio")
    modules = dict(model.named_modules())
    ratio_dict = {}
    for name, r in (layer_ratios or {}).items():
        _check_amount(r, f"prune.layer_ratios.{name}")
        if name not in modules:
            raise UserError(f"prune.layer_ratios names '{name}', which {type(model).__name__} does not have; "
                            f"use module names such as backbone.layer4 or head")
        ratio_dict[modules[name]] = r
    model.eval()
    example = torch.randn(1, 3, *example_size, **_parameters_of(model))
    return tp.pruner.MetaPruner(
        model, example, importance=_importance(importance), pruning_ratio=ratio, iterative_steps=steps,
        global_pruning=global_pruning, pruning_ratio_dict=ratio_dict or None, ignored_layers=classifiers(model),
        round_to=round_to,
        # the models return {"out"[, "aux"]}: the graph is traced through every output
        output_transform=lambda out: sum(out.values()))


def _parameters_of(model: nn.Module) -> dict:
    """The device and dtype of the model's weights: where its inputs must be (a fine-tune between
    pruning steps may have moved it to the GPU)."""
    weight = next(model.parameters())
    return {"device": weight.device, "dtype": weight.dtype}


def taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The loss gradients Taylor importance reads (|weight x gradient|), summed over (image, target)
    `batches` moved to the model's device and dtype. Eval mode rather than saving and restoring the
    buffers: BatchNorm uses its running statistics and leaves them as they were (training-mode passes
    moved them, so the scored model was not the dense one the other criteria prune), dropout is off,
    and the scores are those of the model as deployed, not of batch statistics that nothing runs."""
    on = _parameters_of(model)
    model.eval()
    model.zero_grad()
    for image, target in batches:
        logits = model(image.to(**on))["out"]
        nn.functional.cross_entropy(logits, target.to(on["device"]), ignore_index=255).backward()


def structured_step(pruner: tp.pruner.MetaPruner, model: nn.Module, taylor_batches=None) -> nn.Module:
    """One pruning step. Taylor importance needs gradients: pass a few (image, target) batches."""
    if isinstance(pruner.importance, tp.importance.GroupTaylorImportance):
        if not taylor_batches:
            raise UserError("prune.importance = taylor needs training batches for its gradients")
        taylor_gradients(model, taylor_batches)
    pruner.step()
    model.zero_grad(set_to_none=True)
    for conv in classifiers(model):
        if conv.out_channels != NUM_CLASSES:  # Torch-Pruning must never reach them; check anyway
            raise UserError(f"structured pruning changed a classifier to {conv.out_channels} outputs; "
                            f"keep the classifiers in ignored_layers")
    return model.eval()


def structured(model: nn.Module, ratio: float, importance: str = "group_norm", **kwargs) -> nn.Module:
    """Prune channels in one step (no fine-tune in between); returns the same, now smaller, model."""
    pruner = structured_pruner(model, ratio, importance, steps=1, **kwargs)
    return structured_step(pruner, model, kwargs.get("taylor_batches"))
