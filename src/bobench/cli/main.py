"""``bobench`` command line: noun-verb commands over the library.

Every command is a thin wrapper over a library call; heavy imports (torch, timm) happen inside the
commands that need them, so ``bobench backbones list`` stays fast and torch-free.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bobench.cli.backbones import backbones_app
from bobench.cli.battle import battle
from bobench.cli.output import echo_json as _echo_json
from bobench.cli.output import emit as _emit
from bobench.cli.output import table as _table
from bobench.cli.report import report_cmd
from bobench.cli.results import default_db, results_app
from bobench.options import RunOptions

app = typer.Typer(
    name="bobench",
    help="Battle of the Backbones: benchmark any pretrained vision backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="List datasets.", no_args_is_help=True)
features_app = typer.Typer(help="Extract and cache frozen features.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
app.add_typer(datasets_app, name="datasets")
app.add_typer(features_app, name="features")
app.add_typer(results_app, name="results")
app.command("report")(report_cmd)


_INPUT_CACHE = Annotated[
    bool,
    typer.Option(
        "--input-cache", help="Extract features from images decoded and resized once, shared by backbones "
        "that resize alike (stored beside the feature cache; same features).",
    ),
]  # fmt: skip


# -- datasets ----------------------------------------------------------------------------------------
@datasets_app.command("list")
def datasets_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the embedded datasets (classification, detection / instance segmentation, semantic segmentation).
    Your own: imagefolder:PATH, csv:MANIFEST.csv or a YAML spec; coco:, cocojson:, sim10k:, cityscapes: for
    detection; ade20k:, voc:, cityscapes-seg:, segfolder: for semantic segmentation."""
    from bobench.data import list_datasets
    from bobench.data.dense_embedded import list_detection_datasets
    from bobench.data.seg_files import list_segmentation_datasets

    rows = [{"name": r["name"], "kind": "classification", **r} for r in list_datasets()]
    for kind, listed in (
        ("detection", list_detection_datasets()),
        ("segmentation", list_segmentation_datasets()),
    ):
        for r in listed:  # same columns: the class count, not the names
            dense = {k: v for k, v in r.items() if k not in ("classes", "version", "derived_from")}
            rows.append({"name": r["name"], "kind": kind, **dense, "n_classes": len(r["classes"])})
    columns = ["name", "kind", "description", "n_classes", "split_sizes", "image_size", "source", "license"]
    _emit(rows, columns, "datasets", as_json)
    if not as_json:
        typer.echo(
            "Also: imagefolder:/path/to/root, csv:/path/manifest.csv or a dataset YAML file; for detection "
            "coco:/path/to/coco, cocojson:/path/instances.json?images=DIR, sim10k:/path, cityscapes:/path; "
            "for segmentation ade20k:/path, voc:/path?sbd=/path, cityscapes-seg:/path, segfolder:/path."
        )


# -- features ----------------------------------------------------------------------------------------
@features_app.command("extract")
def features_extract(
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Zoo name or spec.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset spec, e.g. patches13.")],
    split: Annotated[list[str] | None, typer.Option(help="Split(s) to extract (default: all).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local weights file (.safetensors / .pth).")] = None,
    pretrained: Annotated[bool, typer.Option(help="--no-pretrained: random-init control.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | fp16 | bf16 (bf16 opt-in on CPU)")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (CPU: cache-sized chunks).")] = 64,
    image_size: Annotated[int | None, typer.Option(min=1, help="Override the card's input size.")] = None,
    workers: _WORKERS = None,  # (defined below, with the other run options)
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache (default ~/.cache/bobench).")] = None,
    input_cache: _INPUT_CACHE = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Extract pooled features of BACKBONE on DATASET into the content-addressed cache.

    A re-run whose features are all cached answers from the cache without building the model.
    """
    from bobench.features import ExtractOptions, FeatureStore
    from bobench.light_index import LightIndex, LightRequest

    store = FeatureStore(cache_dir)
    opts = ExtractOptions(
        device=device, precision=precision, batch_size=batch_size, image_size=image_size, num_workers=workers,
        input_cache=input_cache,
    )  # fmt: skip
    splits = split or ["train", "val", "test"]
    index = LightIndex(store)
    request = LightRequest(backbone, dataset, opts, pretrained=pretrained, weights=weights)
    hits = index.lookup(request, splits)
    if hits is not None:
        found = [(h.split, h.features, h.seconds) for h in hits]
        title = backbone  # the card's name is the name asked for
    else:
        found, title = _extract_splits(store, index, request, splits)
    rows = [
        {
            "split": sp,
            "n": fs.n,
            "dim": fs.dim,
            "cache_hit": fs.cache_hit,
            "seconds": round(wall, 3),
            "img_per_s": round(fs.stats["img_per_s"] or 0.0, 1),
            "device": fs.stats["device"],
            "precision": fs.stats["precision"],
            "key": fs.key[:16],
            "path": str(fs.path),
        }
        for sp, fs, wall in found
    ]
    if as_json:
        _echo_json(rows)
    else:
        _table(
            rows,
            ["split", "n", "dim", "cache_hit", "seconds", "img_per_s", "device", "precision", "key"],
            f"{title} on {dataset}",
        )


def _extract_splits(store, index, request, splits: list[str]) -> tuple[list, str]:
    """The full path: build the backbone, then get or extract each split (recording its light key)."""
    import time

    from bobench.backbones import create_backbone
    from bobench.data import load_dataset

    recorder = index.recorder(request)  # before the build reads the weights
    bb = create_backbone(request.backbone, pretrained=request.pretrained, weights=request.weights)
    found = []
    for sp in splits:
        ds = load_dataset(request.dataset, split=sp)
        t0 = time.perf_counter()
        fs = store.get_or_extract(bb, ds, request.options)
        found.append((sp, fs, time.perf_counter() - t0))
        recorder.remember(sp, ds, fs)
    return found, bb.card.name


# -- tasks and suites --------------------------------------------------------------------------------
tasks_app = typer.Typer(help="List tasks and suites.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("list")
def tasks_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in tasks (a task YAML path works wherever a task name does)."""
    from bobench.task import list_tasks

    rows = list_tasks()
    _emit(rows, ["name", "version", "dataset", "protocol", "primary", "description"], "tasks", as_json)


@tasks_app.command("suites")
def suites_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in suites."""
    from bobench.task import list_suites

    rows = list_suites()
    _emit(rows, ["name", "backbones", "tasks", "description"], "suites", as_json)


# -- battles -----------------------------------------------------------------------------------------
def _split(csv: str | None) -> list[str] | None:
    return [x.strip() for x in csv.split(",") if x.strip()] if csv else None


_PATHS = Annotated[
    Path | None,
    typer.Option(
        help="Paths file (YAML name: /data/path) for ${name} placeholders in task datasets "
        "(default: $BOBENCH_PATHS)."
    ),
]
_DB = Annotated[
    Path, typer.Option(help="Results database (default: $BOBENCH_DB or bobench-results/results.db).")
]
_CACHE = Annotated[
    Path | None, typer.Option(help="Feature cache (default: $BOBENCH_CACHE or ~/.cache/bobench).")
]
_DEVICE = Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")]
_PRECISION = Annotated[str, typer.Option(help="auto | fp32 | fp16 | bf16")]
_BATCH = Annotated[int, typer.Option(min=1, help="Images per batch (CPU: in cache-sized chunks).")]
_WORKERS = Annotated[int | None, typer.Option(min=0, help="DataLoader workers (CPU: 0; else spare cores).")]
_FORCE = Annotated[bool, typer.Option("--force", help="Redo cells that are already in the database.")]
_DRY = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the plan and the preflight, run nothing (exit 1 if it found problems)."
    ),
]
_STRICT = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Stop before any work when the preflight finds missing weights or datasets "
        "(default: record those cells as failed and run the rest).",
    ),
]
_NPROC = Annotated[
    int,
    typer.Option(
        min=1,
        help="Processes to train on, one GPU each (or CPU processes with --device cpu): reruns this command "
        "under torchrun; trained cells train together with DDP, only rank 0 records and prints.",
    ),
]
_COMPILE = Annotated[bool, typer.Option("--compile", help="Run trained models through torch.compile.")]
_EXIT_CODES = (
    "Exit codes: 0 all cells ok (or skipped as already done); 1 some cell failed or was blocked by the "
    "preflight (recorded with its error; rerun to retry only those); 2 usage error, before any work."
)


def _options(
    device: str, precision: str, batch_size: int, workers: int | None, compile: bool = False,
    input_cache: bool = False,
) -> RunOptions:  # fmt: skip
    from bobench.distributed import init_from_env

    device = init_from_env(device)  # under torchrun: join the process group; this rank's GPU
    return RunOptions(
        device=device, precision=precision, batch_size=batch_size, num_workers=workers, compile=compile,
        input_cache=input_cache,
    )  # fmt: skip


_argv: list[str] = []  # this process's command line (main() sets it): --nproc reruns it under torchrun


def _launch(nproc: int, device: str, backbones: list[str], tasks: list[str], paths: Path | None) -> int:
    """Check usage here (one clear error, not one per rank), then rerun the command under torchrun."""
    from bobench.distributed import launch, world
    from bobench.runner import validate_backbones, validate_tasks
    from bobench.task import load_paths, load_task

    if world()[2] > 1:
        raise typer.BadParameter("already running under torchrun: drop --nproc", param_hint="--nproc")
    where = load_paths(paths)
    validate_tasks([load_task(t, where) for t in tasks])
    validate_backbones(backbones)
    argv, skip = [], False
    for arg in _argv or sys.argv[1:]:  # the same command line, without --nproc
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    return launch(nproc, argv, device)


@app.command("run", epilog=_EXIT_CODES)
def run_cmd(
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Zoo name or spec.")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name or YAML path (repeatable).")],
    seed: Annotated[list[int] | None, typer.Option(help="Seed(s), overriding the task's.")] = None,
    db: _DB = default_db(),
    cache_dir: _CACHE = None,
    device: _DEVICE = "auto",
    precision: _PRECISION = "auto",
    batch_size: _BATCH = 64,
    workers: _WORKERS = None,
    force: _FORCE = False,
    paths: _PATHS = None,
    dry_run: _DRY = False,
    strict: _STRICT = False,
    nproc: _NPROC = 1,
    compile: _COMPILE = False,
    input_cache: _INPUT_CACHE = False,
) -> None:
    """Run one backbone on one or more tasks."""
    if nproc > 1 and not dry_run:
        raise typer.Exit(_launch(nproc, device, [backbone], task, paths))
    rc = battle(
        [backbone],
        task,
        db=db,
        options=_options(device, precision, batch_size, workers, compile, input_cache),
        title="run",
        cache_dir=cache_dir,
        force=force,
        seeds=seed or None,
        paths=paths,
        dry_run=dry_run,
        strict=strict,
    )
    raise typer.Exit(rc)


@app.command("battle", epilog=_EXIT_CODES)
def battle_cmd(
    suite: Annotated[str | None, typer.Option(help="Suite name (demo) or YAML file.")] = None,
    backbones: Annotated[
        str | None, typer.Option(help="Comma-separated backbones (replace the suite's).")
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (replace the suite's).")] = None,
    db: _DB = default_db(),
    cache_dir: _CACHE = None,
    device: _DEVICE = "auto",
    precision: _PRECISION = "auto",
    batch_size: _BATCH = 64,
    workers: _WORKERS = None,
    force: _FORCE = False,
    paths: _PATHS = None,
    dry_run: _DRY = False,
    strict: _STRICT = False,
    executor: Annotated[str, typer.Option(help="local (in this process) or ray (bobench[ray]).")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (auto: a running cluster; default: start one).")
    ] = None,
    max_retries: Annotated[int, typer.Option(help="Ray: retries of a group whose task or worker fails.")] = 1,
    nproc: _NPROC = 1,
    compile: _COMPILE = False,
    input_cache: _INPUT_CACHE = False,
) -> None:
    """Run a suite (or --backbones x --tasks), skipping finished cells, and print the leaderboard.

    Before any work it checks every backbone's weights and every dataset path (the preflight) and says
    what is missing with the command or paths key that fixes it. Suites over datasets on disk (e.g.
    ``bob``) name them by placeholder; give their locations with --paths FILE (see
    examples/bob-paths.yaml).
    """
    from bobench.task import load_suite

    if suite is None and not (backbones and tasks):
        raise typer.BadParameter("give --suite, or both --backbones and --tasks")
    s = load_suite(suite) if suite else None
    bbs = _split(backbones) or list(s.backbones)
    ts = _split(tasks) or list(s.tasks)
    if nproc > 1 and executor != "local":
        raise typer.BadParameter("--nproc runs every process on this machine: use --executor local")
    if nproc > 1 and not dry_run:
        raise typer.Exit(_launch(nproc, device, bbs, ts, paths))
    rc = battle(
        bbs,
        ts,
        db=db,
        options=_options(device, precision, batch_size, workers, compile, input_cache),
        title=s.name if s else "battle",
        cache_dir=cache_dir,
        force=force,
        paths=paths,
        executor=executor,
        executor_options={"address": address, "max_retries": max_retries} if executor == "ray" else None,
        dry_run=dry_run,
        strict=strict,
        fetch_hint=f"bobench backbones fetch --suite {s.name}" if s and not backbones else None,
    )
    raise typer.Exit(rc)


@app.command("demo", epilog=_EXIT_CODES)
def demo(
    db: _DB = default_db(),
    cache_dir: _CACHE = None,
    device: _DEVICE = "auto",
    force: _FORCE = False,
) -> None:
    """The offline demo battle: shipped ImageNet backbones vs random-init controls (suite `demo`)."""
    from bobench.task import load_suite

    s = load_suite("demo")
    rc = battle(
        list(s.backbones),
        list(s.tasks),
        db=db,
        options=_options(device, "auto", 64, None),
        title="demo",
        cache_dir=cache_dir,
        force=force,
    )
    typer.echo(f"Results: {db} (export with `bobench results export results.csv`).")
    raise typer.Exit(rc)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn library errors into one clear line (exit code 2), warnings into one
    ``warning: ...`` line each.

    Set ``BOBENCH_DEBUG=1`` to see full tracebacks and where each warning came from instead.
    """
    import warnings

    from bobench.distributed import exit_code

    if not os.environ.get("BOBENCH_DEBUG"):  # a warning in one line, as an error is
        warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    _argv[:] = sys.argv[1:] if argv is None else list(argv)
    return exit_code(*_dispatch(argv))


def _dispatch(argv: list[str] | None) -> tuple[int, bool]:
    """``(exit code, whether the command completed)``: False for an error or an interruption."""
    from click.exceptions import Exit

    from bobench.distributed import RankFailure, world

    try:
        # without standalone mode click returns a command's typer.Exit code instead of raising it
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):
            return rc, True
    except Exit as exc:
        return exc.exit_code, True
    except SystemExit as exc:
        return int(exc.code or 0), True
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130, False
    except Exception as exc:
        import click

        # typer >= 0.29 vendors its own click: its usage errors (bad option values) are not
        # click.ClickException, but carry the same show() that names the option
        if isinstance(exc, click.ClickException | typer.TyperException) and callable(
            getattr(exc, "show", None)
        ):
            exc.show()
            return int(getattr(exc, "exit_code", 2)), False
        if os.environ.get("BOBENCH_DEBUG"):
            raise
        rank, _, size = world()
        typer.secho(f"{f'[rank {rank}] ' if size > 1 else ''}error: {exc}", err=True, fg="red")
        return (1 if isinstance(exc, RankFailure) else 2), False
    return 0, True


if __name__ == "__main__":
    sys.exit(main())
