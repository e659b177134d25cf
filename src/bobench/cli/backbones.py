"""``bobench backbones list | show | fetch``: the zoo from the command line.

``list`` reads the zoo's YAML only (never imports torch); ``show`` builds the backbone to count its
parameters and describe its features; ``fetch`` puts weights on disk ahead of a battle.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bobench.cli.output import echo_json, emit, table

backbones_app = typer.Typer(help="List, inspect and fetch backbones.", no_args_is_help=True)

_LIST_COLUMNS = ["name", "spec", "family", "pretraining", "pretraining_data", "pretraining_images", "license"]


def _matches(row: dict, family: str | None, method: str | None, query: str | None) -> bool:
    if family is not None and row.get("family") != family:
        return False
    if method is not None and method not in {row.get("pretraining"), row.get("pretraining_kind")}:
        return False
    if query is not None:
        text = " ".join(str(row.get(k, "")) for k in ("name", "spec", "description")).lower()
        return query.lower() in text
    return True


@backbones_app.command("list")
def backbones_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    family: Annotated[str | None, typer.Option(help="Only this family: cnn, vit, hybrid, other.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="Only this pretraining method (dino, mae, clip, ...) or kind (supervised, ssl, "
            "vision-language, depth, segmentation, generative, none)."
        ),
    ] = None,
    query: Annotated[
        str | None, typer.Option("--query", "-q", help="Substring of name/spec/description.")
    ] = None,
) -> None:
    """List named backbones (the zoo and plugins). Any timm:/torchvision:/hf:/open_clip: spec works too."""
    from bobench.backbones import list_backbones

    rows = [r for r in list_backbones() if _matches(r, family, method, query)]
    emit(rows, _LIST_COLUMNS, f"{len(rows)} backbones", as_json)


@backbones_app.command("show")
def backbones_show(
    name: Annotated[str, typer.Argument(help="Zoo name or spec, e.g. bob/dino-vit-s16.")],
    pretrained: Annotated[bool, typer.Option(help="Load weights (--no-pretrained: random init).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build a backbone and print its card (parameters counted, preprocessing, provenance, features).

    When the weights are not on disk and cannot be downloaded, the card is shown for the architecture
    (random init) with the zoo's description of the weights, and a line says how to get them.
    """
    from bobench.backbones import create_backbone
    from bobench.backbones.fetch import zoo_entry
    from bobench.backbones.weights import WeightsUnavailableError

    note = None
    try:
        bb = create_backbone(name, pretrained=pretrained)
    except WeightsUnavailableError as exc:
        bb = create_backbone(name, pretrained=False)
        entry = zoo_entry(name)
        if entry is not None:  # the release's description, so the card still says what it is
            overrides = {k: v for k, v in entry.card.items() if k in bb.card.to_dict()}
            bb.card = bb.card.replace(**overrides, weights="not on disk", pretrained=False)
        note = f"weights not on disk: {exc}"
    card = bb.card.to_dict()
    card["feature_info"] = [
        {"channels": f.channels, "stride": f.stride, "name": f.name} for f in bb.feature_info
    ]
    if note:
        card["note"] = note
    if as_json:
        echo_json(card)
    else:
        table([{"field": k, "value": v} for k, v in card.items()], ["field", "value"], name)


@backbones_app.command("fetch")
def backbones_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Zoo names or specs.")] = None,
    suite: Annotated[
        str | None, typer.Option(help="All backbones of a task suite (demo) or a zoo prefix (bob, modern).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only report what is on disk; download nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Download (sha256-verified, resumable) the weights of NAMES or of a whole --suite.

    URL releases go to the bobench weights cache ($BOBENCH_WEIGHTS, else ~/.cache/bobench/weights);
    hub-hosted weights to the Hugging Face cache. Offline, each fails at once with the URL and the path
    to place the file at by hand. Exits 1 if any backbone failed.
    """
    from bobench.backbones.fetch import fetch, names_for

    todo = list(names or [])
    if suite:
        todo += names_for(suite)
    if not todo:
        raise typer.BadParameter("name at least one backbone, or --suite (e.g. --suite bob)")
    rows = []
    for n in dict.fromkeys(todo):
        got = fetch(n, download=not check)
        rows.append({"name": got.name, "ok": got.ok, "where": got.where})
        if not as_json:
            mark = "[ok]" if got.ok else "[missing]" if check else "[failed]"
            typer.echo(f"{mark} {got.name}: {got.where}", err=not got.ok)
    failed = sum(not r["ok"] for r in rows)
    if as_json:
        echo_json(rows)
    else:
        typer.echo(f"{len(rows) - failed} of {len(rows)} backbones have their weights on disk")
    if failed:
        raise typer.Exit(1)
