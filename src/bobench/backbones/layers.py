"""Depth structure of a backbone for fine-tuning: layer ids for layer-wise lr decay, and stochastic depth.

Fine-tuning in Battle of the Backbones uses timm's recipe: ``create_optimizer_v2(..., layer_decay=0.75)``
scales each parameter's learning rate by ``layer_decay ** (n_layers - 1 - layer_id)``, and drop path
(stochastic depth) regularises the residual blocks. Both need to know where each parameter sits in the
network, for every source alike.

* :func:`layer_ids` - ``{parameter name of backbone.model: layer id}``, 0 = stem / embeddings, growing
  toward the output. An adapter's own :meth:`~bobench.backbones.base.Backbone.layer_ids` wins; then a
  model's timm ``group_matcher`` (timm models, and timm models returned by a ``module:callable``), giving
  exactly timm's ids; otherwise :func:`generic_layer_ids`.
* :func:`group_matcher_for` / :func:`no_weight_decay_for` - what a fine-tuning wrapper (``backbone`` +
  ``head``) exposes so that timm's optimizer factory groups it correctly.
* :func:`set_drop_path` - turns on the drop-path slots a model was built without (timm builds them as
  ``nn.Identity`` or ``None`` at rate 0), with timm's own per-block rates.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from bobench.backbones.base import Backbone

#: a block container needs at least this many blocks (two would pick pairs like a block's two norms)
MIN_BLOCKS = 3
# names of embedding-like tensors held directly by a module (cls/class/mask/register tokens, position
# embeddings): they feed the first block, so they sit in layer 0 and get no weight decay
_EMBEDDING = re.compile(r"token|pos(ition(al)?)?_?embed|class_embed|(^|_)cls($|_)")
# timm's (and Hugging Face's) attribute names for the drop-path module of a residual block
_SLOT = re.compile(r"drop_path\d*")


def is_embedding_name(name: str) -> bool:
    """Whether a parameter name's last component names a token or position embedding.

    Example:
        >>> [is_embedding_name(n) for n in ("cls_token", "encoder.pos_embedding", "proj", "head.weight")]
        [True, True, False, False]
    """
    return bool(_EMBEDDING.search(name.rsplit(".", 1)[-1]))


# -- layer ids -----------------------------------------------------------------------------------------


def layer_ids(backbone: Backbone) -> dict[str, int]:
    """Layer id of every parameter of ``backbone.model``: 0 = stem/embeddings, ``max`` = final norm etc.

    Ids are contiguous (``0..n-1``). The adapter's own :meth:`Backbone.layer_ids` is used when it returns
    a map; a model with a timm ``group_matcher`` gets timm's ids
    (``group_parameters(model, model.group_matcher(coarse=False), reverse=True)``, so a timm classifier
    is its own last layer); any other model gets :func:`generic_layer_ids`.

    Example:
        >>> ids = layer_ids(create_backbone("timm:vit_tiny_patch16_224", pretrained=False))
        >>> ids["patch_embed.proj.weight"], ids["blocks.0.attn.qkv.weight"], ids["norm.weight"], ids["head.weight"]
        (0, 1, 12, 13)
    """
    own = backbone.layer_ids()
    if own is not None:
        ids = dict(own)
    elif hasattr(backbone.model, "group_matcher"):
        from timm.models import group_parameters

        model = backbone.model
        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        ids = generic_layer_ids(backbone.model)
    names = [n for n, _ in backbone.model.named_parameters()]
    missing = [n for n in names if n not in ids]
    if missing:
        raise ValueError(
            f"{backbone.card.name}: the layer map has no id for {len(missing)} parameter(s), e.g. "
            f"{missing[:3]}; a Backbone.layer_ids() override must cover every name of named_parameters()"
        )
    return _compact({n: int(ids[n]) for n in names})


def _compact(ids: dict[str, int]) -> dict[str, int]:
    """Renumber ids to their ranks ``0..k-1`` (a block without parameters leaves no gap)."""
    rank = {v: i for i, v in enumerate(sorted(set(ids.values())))}
    return {n: rank[v] for n, v in ids.items()}


def _param_counts(model: nn.Module) -> dict[str, int]:
    """Number of parameters under each module name ("" = the model), from one pass over the parameters."""
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            counts[".".join(parts[:i])] += p.numel()
    return counts


def find_blocks(model: nn.Module) -> tuple[str, list[str]] | None:
    """The run of repeated blocks that holds the most parameters: ``(container name, block child names)``.

    Candidates, each of at least :data:`MIN_BLOCKS` children that hold parameters: all such children of an
    ``nn.ModuleList`` / ``nn.Sequential`` (transformer layers, UNet down blocks, ``features`` of
    MobileNet), and the composite children of one class of any other module (ResNet's ``layer1..layer4``,
    which are attributes, not a list; leaf layers such as an attention's q/k/v projections are not
    blocks). Ties go to the outermost. None when the model has no such run.

    Example:
        >>> find_blocks(torchvision.models.resnet18())
        ('', ['layer1', 'layer2', 'layer3', 'layer4'])
    """
    counts = _param_counts(model)
    best: tuple[str, list[str]] | None = None
    best_size = 0
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        kids = [(n, c) for n, c in module.named_children() if counts.get(prefix + n, 0) > 0]
        if isinstance(module, nn.ModuleList | nn.Sequential):
            groups = [[n for n, _ in kids]]
        else:
            by_class: dict[type, list[str]] = defaultdict(list)
            for n, c in kids:
                if next(c.children(), None) is not None:  # blocks, not a q/k/v trio of Linears
                    by_class[type(c)].append(n)
            groups = list(by_class.values())
        for group in groups:
            size = sum(counts[prefix + n] for n in group)
            if len(group) >= MIN_BLOCKS and size > best_size:
                best, best_size = (name, group), size
    return best


def generic_layer_ids(model: nn.Module) -> dict[str, int]:
    """The layer map of a model without a timm ``group_matcher``, from its module tree alone.

    With ``(container, blocks) = find_blocks(model)``, block ``i`` is layer ``i + 1``; everything
    registered before the block run (in the container and in each module above it) is layer 0, everything
    after it is layer ``n + 1``, and a non-block child between two blocks (a DenseNet transition, a Swin
    patch merging) joins the block before it. A tensor held directly by a module on the way (not inside
    a child) is placed by name: token and position embeddings in 0, anything else (an output
    ``proj``) last. A model with no block run gets one layer per top-level child. Ids are compacted to
    ``0..k-1``.

    Example:
        >>> ids = generic_layer_ids(torchvision.models.resnet18())
        >>> ids["conv1.weight"], ids["layer1.0.conv1.weight"], ids["layer4.1.bn2.bias"], ids["fc.weight"]
        (0, 1, 4, 5)
    """
    found = find_blocks(model)
    if found is None:
        counts = _param_counts(model)
        found = ("", [n for n, _ in model.named_children() if counts.get(n, 0) > 0])
    container, blocks = found
    path = container.split(".") if container else []
    last = len(blocks) + 1
    children = {}  # module name on the path → its child names, in registration order
    for depth in range(len(path) + 1):
        name = ".".join(path[:depth])
        children[name] = [n for n, _ in model.get_submodule(name).named_children()]
    inside = {n: i + 1 for i, n in enumerate(blocks)}

    def layer_of(param: str) -> int:
        parts = param.split(".")
        for depth in range(len(path) + 1):
            if len(parts) == depth + 1:  # held directly by a module on the path
                return 0 if is_embedding_name(param) else last
            head, kids = parts[depth], children[".".join(path[:depth])]
            if depth < len(path) and head == path[depth]:
                continue
            if depth < len(path):  # beside the path: before or after the branch holding the blocks
                return 0 if kids.index(head) < kids.index(path[depth]) else last
            if head in inside:
                return inside[head]
            # a non-block child of the container: the id of the block before it (0 before the first)
            before = [inside[k] for k in kids[: kids.index(head)] if k in inside]
            return (last if len(before) == len(blocks) else before[-1]) if before else 0
        raise AssertionError(param)  # pragma: no cover - the loop always returns

    return _compact({n: layer_of(n) for n, _ in model.named_parameters()})


# -- optimizer wiring ----------------------------------------------------------------------------------


def group_matcher_for(
    backbone: Backbone, prefix: str = "backbone.model.", head_prefix: str | tuple[str, ...] = "head."
) -> Callable[[str], int]:
    """A timm ``group_matcher`` for a fine-tuning wrapper that holds ``backbone`` and a new head.

    Parameter names of the wrapper that start with ``prefix`` get the backbone's :func:`layer_ids`; those
    starting with ``head_prefix`` (several prefixes for several new modules, e.g. a neck) get one layer
    after them, so their lr scale is 1.0.

    Args:
        backbone: the backbone the wrapper holds.
        prefix: where the wrapper keeps ``backbone.model`` (``self.backbone = backbone`` gives the default).
        head_prefix: where it keeps the new, randomly initialised modules.

    Returns:
        ``name -> layer id``, to return from the wrapper's ``group_matcher(coarse=False)``; it raises
        ``ValueError`` for a name under neither prefix (rather than guess that parameter's lr).

    Example:
        >>> class Wrapper(nn.Module):
        ...     def __init__(self, backbone, num_classes):
        ...         super().__init__()
        ...         self.backbone, self.head = backbone, nn.Linear(backbone.embed_dim, num_classes)
        ...     def group_matcher(self, coarse=False):
        ...         return group_matcher_for(self.backbone)
        ...     def no_weight_decay(self):
        ...         return no_weight_decay_for(self.backbone)
        >>> opt = timm.optim.create_optimizer_v2(Wrapper(bb, 10), "adamw", lr=1e-3, layer_decay=0.75)
    """
    ids = layer_ids(backbone)
    head = max(ids.values(), default=-1) + 1
    heads = (head_prefix,) if isinstance(head_prefix, str) else tuple(head_prefix)

    def match(name: str) -> int:
        if name.startswith(prefix) and name[len(prefix) :] in ids:
            return ids[name[len(prefix) :]]
        if name.startswith(heads):
            return head
        raise ValueError(
            f"parameter {name!r} is neither in the backbone ({prefix!r}) nor in the new modules "
            f"({', '.join(map(repr, heads))}); pass the wrapper's prefixes to group_matcher_for"
        )

    return match


def no_weight_decay_for(backbone: Backbone, prefix: str = "backbone.model.") -> set[str]:
    """Names, as the wrapper sees them, of the backbone's parameters exempt from weight decay.

    The model's own ``no_weight_decay()`` where it declares one (timm, OpenCLIP), else its token and
    position embeddings (:func:`is_embedding_name`). timm already exempts every 1-d tensor (norms,
    biases); these are the n-d ones that must not be pulled toward zero either.
    """
    model = backbone.model
    if hasattr(model, "no_weight_decay"):
        names = set(model.no_weight_decay())
    else:
        names = {n for n, _ in model.named_parameters() if is_embedding_name(n)}
    return {prefix + n for n in names}


# -- stochastic depth ----------------------------------------------------------------------------------


def _slots(module: nn.Module) -> list[str]:
    """The drop-path slots of one module: ``drop_path*`` attributes that are a DropPath, an Identity, or
    None (timm's ResNet leaves ``drop_path = None`` at rate 0)."""
    names = [n for n in (*module._modules, *vars(module)) if _SLOT.fullmatch(n)]
    out = []
    for n in dict.fromkeys(names):
        value = getattr(module, n)
        if value is None or isinstance(value, nn.Identity) or type(value).__name__.endswith("DropPath"):
            out.append(n)
    return out


def drop_path_rates(model: nn.Module, rate: float) -> dict[str, float]:
    """``{slot name: rate}`` that :func:`set_drop_path` gives each drop-path slot of ``model``.

    Blocks (modules holding slots) in registration order get ``torch.linspace(0, rate, n_blocks)``, as
    timm builds ViTs, ConvNeXts, Swins and ResNets; blocks of timm's EfficientNet builder (EfficientNet,
    MobileNetV2/V3) get ``rate * i / n_blocks``, as that builder does.
    """
    blocks = [(name, _slots(m), type(m)) for name, m in model.named_modules()]
    blocks = [b for b in blocks if b[1]]
    n = len(blocks)
    if n and all(cls.__module__.startswith("timm.models._efficientnet") for _, _, cls in blocks):
        rates = [rate * i / n for i in range(n)]
    else:
        rates = [x.item() for x in torch.linspace(0, rate, n)]
    return {
        f"{name}.{slot}" if name else slot: r
        for (name, slots, _), r in zip(blocks, rates, strict=True)
        for slot in slots
    }


def set_drop_path(backbone: Backbone, rate: float) -> int:
    """Turn on stochastic depth in a built backbone: each drop-path slot becomes ``timm.layers.DropPath``.

    Slots are the ``drop_path``, ``drop_path1``, ... attributes timm's blocks (and the Hugging Face ports
    of timm models: ConvNeXt, Swin, DINOv2, BEiT) hold as ``nn.Identity``/``None`` when built at rate 0;
    the per-block rates are what ``timm.create_model(name, drop_path_rate=rate)`` builds (see
    :func:`drop_path_rates`). Models without such slots (torchvision, OpenCLIP, Stable Diffusion, most
    user models) are left untouched: no slot is invented. Eval-mode outputs do not change.

    Args:
        backbone: the backbone, changed in place.
        rate: ``drop_path_rate`` as timm's ``create_model`` takes it (the deepest block's rate), in
            ``[0, 1)``; 0 resets every slot to a no-op.

    Returns:
        The number of slots set; 0 means the model has none and drop path was not applied (record it).

    Raises:
        ValueError: ``rate`` outside ``[0, 1)``.
    """
    from timm.layers import DropPath

    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    rates = drop_path_rates(backbone.model, rate)
    for name, r in rates.items():
        owner, _, slot = name.rpartition(".")
        module = backbone.model.get_submodule(owner)
        # a new module starts in training mode: give it its block's, so an eval-mode model stays exact
        setattr(module, slot, DropPath(r).train(module.training))
    return len(rates)
