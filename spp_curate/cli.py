"""The ``spp-curate`` command line: thin; it parses options and calls the stages."""

from __future__ import annotations

import errno
import inspect
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from . import __version__, layout
from .config import reference_forms, resolve_recipe, source_forms
from .errors import UserError
from .pipeline import PIPELINE, STAGE_BY_NAME, STAGES

app = typer.Typer(
    name="spp-curate",
    help="Build, curate and publish semantic positive pair datasets for self-supervised learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: spare cores]" is words, not a markup tag
)


def _usage_name(argument) -> str:
    """An argument in the usage line as its metavar (``BUILD_DIR``), ``[NAME]`` when optional; Typer 0.29
    wraps a required one in braces, which reads as a set."""
    name = argument.display_name_raw
    return (name if argument.required else f"[{name}]") + ("..." if argument.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name
# Soft wrap: a line the program prints stays one line, whatever the terminal's width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DirArg = typer.Argument(..., metavar="BUILD_DIR", help="build directory (made by `spp-curate build`)")
ForceOpt = typer.Option(False, "--force", help="run the stage even if its output is complete")


def _version(value: bool) -> None:
    if value:
        out.print(f"spp-curate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Build, curate and publish semantic positive pair datasets for self-supervised learning."""


def preflight(recipe, build_dir: Path | None = None, until: str | None = None) -> None:
    """Checks before any stage runs, so a wrong option fails in seconds, not after indexing: the cheap ones, and
    an encoder that names weights (a file, a folder, the Hub's) is built once, so weights that do not load or
    that hold inf fail here, unless this build's embeddings were already made with it."""
    from .curate.encoder_checks import check_encoder, names_weights

    if recipe.root is not None and not Path(recipe.root).exists():
        raise UserError(f"{recipe.root} does not exist", option="--root")
    if until != "index":  # with --until index no picture is embedded: the encoder is not asked for yet
        from .progress import heartbeat

        # open_clip's or timm's import, and a model built once to check its weights: seconds, said while they
        # last (a line after each second without one: the interpreter and the imports before took about one)
        with heartbeat(f"build: checking --encoder {recipe.encoder}", every=1.0):
            check_encoder(recipe.encoder, recipe.image_size)
            if names_weights(recipe.encoder) and not _embedded_with(build_dir, recipe.encoder):
                from .curate.encoders import load_encoder

                load_encoder(recipe.encoder, recipe.image_size, recipe.encoder_prefix)
    if recipe.class_names:
        from .pairing.categories import read_class_names_file

        read_class_names_file(recipe.class_names)
    for ref in recipe.references:
        if ref.root_option and not Path(ref.root_option).exists():
            raise UserError(f"reference set {ref.spec!r}: {ref.root_option} does not exist", option="--exclude-near")
    if recipe.engine == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError("Ray is not installed; pip install 'spp-curate[ray]'", option="--engine")


def _embedded_with(build_dir: Path | None, encoder: str) -> bool:
    """Whether ``build_dir`` holds embeddings that this encoder string made (its weights loaded then)."""
    from .files import read_json

    try:
        return build_dir is not None and read_json(build_dir / layout.EMBEDDINGS_META).get("encoder") == encoder
    except (OSError, ValueError, AttributeError):
        return False


def _print_stage(stage: str, summary) -> None:
    if summary is None:
        err.print(f"[dim]{stage}: complete, skipped[/dim]")
    else:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v:,}" if isinstance(v, int)
                          else f"{k} {v}" for k, v in summary.items() if v is not None)
        err.print(f"[green]{stage}[/green]: {shown}")


def _print_result(build_dir: Path) -> None:
    from .files import read_json

    metrics = read_json(build_dir / layout.METRICS)
    manifest = read_json(build_dir / layout.RELEASE / layout.MANIFEST)
    precision = metrics["precision"]
    out.print(f"pairs: {metrics['pairs']:,} over {metrics['images']:,} images "
              f"(precision {'n/a' if precision is None else f'{precision:.4f}'}, coverage {metrics['coverage']:.4f}, "
              f"{metrics['quarantined']} quarantined)")
    out.print(f"release: {build_dir / 'release'} ({manifest['counts']['shards']} shards)")
    out.print(f"report:  {build_dir / 'report' / 'index.html'}")


def recipe_option(name: str) -> inspect.Parameter:
    """The command-line option of recipe field ``name``, made from the field's own declaration
    (``config.knob``): its help, how it is taken and its bound. Every command that takes a field takes it so."""
    from pydantic_core import PydanticUndefined

    from .config import Recipe

    field = Recipe.model_fields[name]
    extra = field.json_schema_extra or {}
    flag = f"--{name.replace('_', '-')}"
    text = (field.description or "").format(sources=source_forms(), references=reference_forms())
    kind, bound = extra.get("option", "value"), {"min": extra["min"]} if extra.get("min") is not None else {}
    if "[" not in text and field.default not in (None, PydanticUndefined, "") and kind != "flag":
        shown = field.default if not isinstance(field.default, float) else f"{field.default:g}"
        text += f" [default: {shown}, or the recipe's]"
    if kind == "flag":
        option, annotation = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=text), Optional[bool]
    elif kind == "list":
        option, annotation = typer.Option(None, flag, help=text), Optional[list[str]]
    elif kind == "path":
        option, annotation = typer.Option(None, flag, help=text), Optional[Path]
    else:
        whole = kind == "value" and field.annotation in (int, Optional[int])
        required = bool(extra.get("required"))
        option = typer.Option(... if required else None, flag, help=text, **bound)
        annotation = (int if whole else str) if required else Optional[int] if whole else Optional[str]
    return _option(name, annotation, option)


#: ``--backbone`` of train and study.
BACKBONE_HELP = ("small-cnn-grid (pooled to 2 x 2 cells: where a small picture's parts are stays in the features) | "
                 "small-cnn (one global pool) | resnet18 | resnet50")


def _option(name: str, annotation, option) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def build(**options) -> None:
    """Build a release: index -> embed -> exclude -> mine -> report -> export. Complete stages are skipped."""
    from .stages import build as run_build

    out_dir, recipe_file, until = options.pop("out_dir"), options.pop("recipe_file"), options.pop("until")
    force, rehash, source = options.pop("force"), options.pop("rehash"), options.pop("source")
    trust_listing = options.pop("trust_listing")
    # What is left is the recipe's fields, each an option of its own name (made by recipe_option).
    overrides = {name: str(value) if isinstance(value, Path) else value for name, value in options.items()}
    overrides["exclude_near"] = options.get("exclude_near") or None
    if until is not None and until not in STAGES:
        raise UserError(f"unknown stage {until!r}; accepted: {', '.join(STAGES)}", option="--until")
    recipe = resolve_recipe(source, overrides, str(recipe_file) if recipe_file else None)
    build_dir = out_dir or Path("builds") / recipe.source_spec.kind
    preflight(recipe, build_dir, until)
    run_build(build_dir, recipe, force=force, on_stage=_print_stage, until=until, rehash=rehash,
              trust_listing=trust_listing)
    if until in (None, STAGES[-1]):
        _print_result(build_dir)


def _build_signature() -> inspect.Signature:
    from .config import Recipe

    fields = [n for n, f in Recipe.model_fields.items() if (f.json_schema_extra or {}).get("build", True)]
    first = ["source", "root"]
    return inspect.Signature([
        *(recipe_option(n) for n in first),
        _option("out_dir", Optional[Path], typer.Option(None, "--out", help="build directory [default: builds/<source>]")),
        _option("recipe_file", Optional[Path], typer.Option(None, "--recipe",
                                                            help="a recipe YAML instead of manifests/<source>.yaml")),
        *(recipe_option(n) for n in fields if n not in first),
        _option("until", Optional[str], typer.Option(None, help=f"stop after this stage: {' | '.join(STAGES)}")),
        _option("force", bool, typer.Option(False, "--force", help="rerun every stage, reading every source file "
                                            "again")),
        _option("rehash", bool, typer.Option(False, "--rehash", help="read and hash every source file again, not "
                                             "only those whose size or modification time changed (a content check, "
                                             "as rsync's --checksum); later stages rerun only where the index "
                                             "changed")),
        _option("trust_listing", bool, typer.Option(False, "--trust-listing", help="take the last build's listing "
                                                    "of the source instead of walking it, when no folder changed since "
                                                    "(a file edited in place is then not seen; for large trees on "
                                                    "slow file systems)")),
    ])


build.__signature__ = _build_signature()
app.command()(build)


def _stage_command(stage: str, doc: str) -> None:
    def command(build_dir: Path = DirArg, force: bool = ForceOpt) -> None:
        from .config import load_recipe
        from .stages import run_stage

        recipe = load_recipe(build_dir)
        _print_stage(stage, run_stage(build_dir, recipe, stage, force=force))

    command.__doc__ = doc
    app.command(name=stage)(command)


def _stage_with(stage: str, fields: tuple[str, ...]) -> Callable[..., None]:
    """The command that runs ``stage`` with these recipe fields as options (changed and saved where given)."""
    def command(**options) -> None:
        build_dir, force = options.pop("build_dir"), options.pop("force")
        _run_with(build_dir, stage, force, **options)

    command.__signature__ = inspect.Signature([
        _option("build_dir", Path, DirArg), _option("force", bool, ForceOpt), *(recipe_option(f) for f in fields)])
    return command


def _run_with(build_dir: Path, stage: str, force: bool, **changes) -> None:
    """Run one stage on a build directory, with recipe fields changed (and saved) where options were given."""
    from .config import validate_recipe
    from .config import load_recipe, save_recipe
    from .stages import run_stage

    recipe = load_recipe(build_dir)
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        recipe = validate_recipe({**recipe.model_dump(), **changes})
        save_recipe(build_dir, recipe)
    _print_stage(stage, run_stage(build_dir, recipe, stage, force=force))


embed_command = _stage_with("embed", ("chunk_size", "workers", "batch_size", "decode"))
embed_command.__doc__ = STAGE_BY_NAME["embed"].help
export_command = _stage_with("export", ("reviewed",))
export_command.__doc__ = STAGE_BY_NAME["export"].help + " --reviewed keeps the pairs the review page accepted."
_COMMANDS = {"embed": embed_command, "export": export_command}
for _stage in PIPELINE:  # registered in pipeline order, so --help lists them so
    if _stage.name in _COMMANDS:
        app.command(name=_stage.name)(_COMMANDS[_stage.name])
    else:
        _stage_command(_stage.name, _stage.help)


@app.command()
def review(
    build_dir: Path = DirArg,
    port: int = typer.Option(8765, min=0, max=65535, help="port to listen on (0: any free port)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on: loopback only, unless --allow-remote"),
    reviewer: Optional[str] = typer.Option(None, help="your name, recorded with each decision [default: $USER]"),
    estimate: Optional[int] = typer.Option(
        None, min=1, max=100_000, help="estimate mode: judge up to N pairs drawn at random (stratified by similarity) "
        "for the release's precision with a 95 % interval, e.g. --estimate 300"),
    half_width: float = typer.Option(0.03, min=0.001, max=0.5,
                                     help="with --estimate: stop once the interval is this narrow on each side"),
    seed: int = typer.Option(0, min=0, max=2**31 - 1, help="with --estimate: the seed of the draw"),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="let --host be an address others can reach (the page has no authentication)"),
) -> None:
    """Review pairs in the browser: accept (a), reject (r), skip (s); decisions go to DIR/reviews.parquet."""
    from .review.server import serve
    from .review.store import reviewer_name

    name = reviewer_name(reviewer)
    serve(build_dir, host, port, name, say=lambda line: out.print(line, markup=False, highlight=False),
          estimate=estimate, half_width=half_width, seed=seed, allow_remote=allow_remote)


@app.command()
def verify(release: str = typer.Argument(..., metavar="RELEASE", help="release directory (holds manifest.json), or hf://ORG/NAME[@REV] "
                                         "for a release on the Hub"),
           workers: Optional[int] = typer.Option(None, min=0, help="processes hashing files [default: spare "
                                                 "cores]")) -> None:
    """Check every file of a release against manifest.json: bytes, sha256, rows, tar layout; on the Hub, every
    listed file at that revision: there, its size, its sha256."""
    from .export.manifest import verify_release

    if release.startswith("hf://"):
        from .export.hub import verify_remote

        commit, problems = verify_remote(release)
        for problem in problems:
            err.print(f"verify: {problem}", markup=False, highlight=False)
        if problems:
            raise typer.Exit(1)
        out.print(f"{release}: ok at commit {commit}", markup=False, highlight=False)
        return
    import time

    from .devices import auto_workers
    from .engine import get_engine
    from .export.manifest import load_manifest

    started = time.perf_counter()
    problems = verify_release(Path(release), auto_workers() if workers is None else workers, get_engine("local"))
    if problems:
        for problem in problems:
            err.print(f"verify: {problem}", markup=False, highlight=False)
        raise typer.Exit(1)
    size = sum(e.bytes for e in load_manifest(Path(release)).files)  # verified: the manifest is sound
    seconds = max(time.perf_counter() - started, 1e-6)
    out.print(f"{release}: ok ({size / 1e6:,.1f} MB checked in {seconds:.1f} s, {size / 1e6 / seconds:,.0f} MB/s)",
              markup=False, highlight=False)


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", help="run directory: checkpoints, metrics"),
    pairs: Optional[str] = typer.Option(None, help="a release directory or hf://org/name"),
    source: Optional[str] = typer.Option(None, help="train on single images of a source instead"),
    root: Optional[Path] = typer.Option(None, help="the source's root (with --source)"),
    method: str = typer.Option("simclr", help="moco | simclr | simsiam | byol"),
    positives: str = typer.Option("auto", help="both (each anchor's two augmentations and its partner, SePP-ID) | "
                                  "semantic (the partner replaces the second augmentation) | augment (the matched "
                                  "baseline: the partners unused) | auto: both with --pairs, augment with --source"),
    backbone: str = typer.Option("small-cnn-grid", help=BACKBONE_HELP),
    epochs: int = typer.Option(10, min=1, help="passes over the pairs (an epoch is the anchors with --pairs, "
                               "every picture with --source; the run prints its steps)"),
    batch_size: int = typer.Option(256, min=2),
    lr: float = typer.Option(0.06, min=0.0, help="learning rate at batch 256 (scaled linearly)"),
    image_size: int = typer.Option(32, min=8, help="training input size"),
    limit: Optional[int] = typer.Option(None, min=1, help="use the first N pairs or images"),
    seed: int = typer.Option(0, help="seeds the weights' initialisation, the augmentations and the batch order"),
    workers: Optional[int] = typer.Option(None, min=0, help="decode processes [default: spare cores]"),
    cache: str = typer.Option("auto", help="decoded pictures: auto (raw pixels where they fit half the memory, "
                              "else jpeg) | disk (raw pixels, memory-mapped) | jpeg (JPEG at the training size, "
                              "decoded per batch) | memory (this run only); a local release's cache is kept beside "
                              "it (.NAME.cache/) and reused by later runs"),
    partner_weight: str = typer.Option(
        "auto", help="weight of the partner positives: auto (the release's pair precision above chance: "
        "reviewed estimate, else labels) or a number from 0 to 1"),
    partner_trust: str = typer.Option(
        "release", help="with --partner-weight auto: release (one weight for every pair) or similarity (each pair "
        "by the precision of its similarity band, from the reviewed sample or the labels)"),
    positive_loss: str = typer.Option(
        "out", help="how a view's several positives enter the contrastive loss: out (the mean of their log "
        "probabilities, SupCon's L_out) or in (the log of their mean probability, L_in)"),
    support: str = typer.Option(
        "auto", help="a support set of this many partner projections; each view's nearest one is one more positive "
        "(after NNCLR); 0: none; auto: the default for the method"),
    self_pairs: float = typer.Option(0.0, help="the share of pairs whose partner is replaced by the anchor itself "
                                     "(seeded): the self-pair rate, an ablation"),
    resume: bool = typer.Option(False, "--resume", help="continue from RUN/last.pt"),
    force: bool = typer.Option(False, "--force", help="start again in a folder that holds a run"),
) -> None:
    """Pretrain MoCo-v2, SimCLR, SimSiam or BYOL on pair shards (or single images); checkpoints every epoch."""
    from .progress import loading

    with loading("train: loading torch and the methods"):  # seconds on a small CPU
        from .train.loop import TrainConfig, parse_support, train as run_train
        from .train.trust import parse_partner_weight

    if positives == "auto":  # the point of a pair release is its partners; single images have none
        positives = "augment" if source is not None and pairs is None else "both"
    cfg = TrainConfig(out=str(out_dir), method=method, positives=positives, backbone=backbone, pairs=pairs,
                      source=source, root=str(root) if root else None, limit=limit, epochs=epochs,
                      batch_size=batch_size, lr=lr, image_size=image_size, seed=seed, workers=workers,
                      cache=cache, partner_weight=parse_partner_weight(partner_weight),
                      partner_trust=partner_trust, positive_loss=positive_loss, support=parse_support(support),
                      self_pairs=self_pairs)
    metrics = run_train(cfg, resume=resume, force=force)
    out.print(f"run: {out_dir} (epoch {metrics.get('epoch')}, loss {metrics.get('loss', float('nan')):.4f}); "
              f"use it as --encoder ssl:{out_dir / 'last.pt'}")


@app.command(name="eval")
def eval_run(
    run: Path = typer.Argument(..., metavar="RUN", help="a run directory from `spp-curate train`"),
    source: str = typer.Option(..., help=f"labelled source for the probe: {source_forms()}"),
    root: Optional[Path] = typer.Option(None, help="the source's root (for image folders: the train split)"),
    test_root: Optional[Path] = typer.Option(None, help="image folders: the test split"),
    limit: Optional[int] = typer.Option(None, min=1, help="first N images of each split"),
    k: Optional[list[int]] = typer.Option(None, "--k", min=1, help="neighbours of the weighted kNN; repeat for "
                                          "several (the first is knn_top1) [default: 200]"),
) -> None:
    """Weighted kNN (k=200, T=0.1) and linear-probe top-1 of a run's backbone, beside raw-pixel kNN, 1-NN and
    linear probe of the same split (computed once per split and kept); writes RUN/eval.json."""
    from .progress import loading

    with loading("eval: loading torch and the run's backbone"):
        from .train.evaluate import evaluate

    ks = tuple(dict.fromkeys(k or [200]))
    result = evaluate(run, source, str(root) if root else None, str(test_root) if test_root else None, limit, ks)
    at = "  ".join(f"k={key} {result['knn_top1_at'][key]:.4f} (pixels {result['pixel_knn_top1_at'][key]:.4f})"
                   for key in map(str, ks)) if len(ks) > 1 else ""
    out.print(f"knn_top1 {result['knn_top1']:.4f}  linear_top1 {result['linear_top1']:.4f}  "
              f"(raw pixels: knn_top1 {result['pixel_knn_top1']:.4f}, 1-NN {result['pixel_1nn_top1']:.4f}, "
              f"linear_top1 {result['pixel_linear_top1']:.4f})  " + (f"{at}  " if at else "") +
              f"({run / 'eval.json'})", markup=False, highlight=False)


@app.command()
def study(
    source: str = typer.Option(..., help=f"a labelled source: {source_forms()}"),
    out_dir: Path = typer.Option(Path("builds/study"), "--out", help="where the releases, runs and report go; a "
                                 "study run again into it reuses every run of the same settings"),
    root: Optional[Path] = typer.Option(None, help="the source's root (for image folders: the train split)"),
    test_root: Optional[Path] = typer.Option(None, help="image folders: the test split"),
    sampler: str = typer.Option("pixels:32", help="the encoder that mines the semantic pairs (any --encoder), or "
                                "ssl: the SePP-ID loop, the first method's single-image run as the sampler"),
    methods: str = typer.Option("simclr,moco,simsiam,byol", help="comma-separated: simclr, moco, simsiam, byol"),
    modes: str = typer.Option("augment,semantic,both", help="comma-separated positives modes: augment (the matched "
                              "control), semantic, both"),
    seeds: int = typer.Option(3, help="seeds 0..N-1 for every run"),
    epochs: Optional[int] = typer.Option(None, help="epochs of every run [default: 10; 3 with --quick]"),
    batch_size: int = typer.Option(128, help="batch of every run"),
    backbone: str = typer.Option("small-cnn-grid", help=BACKBONE_HELP),
    image_size: int = typer.Option(32, help="training input size"),
    limit: Optional[int] = typer.Option(None, min=1, help="the first N training pictures in source order (an "
                                        "image folder lists class by class: give them all) [default: all; 3,000 "
                                        "with --quick]"),
    eval_limit: Optional[int] = typer.Option(None, min=1, help="the first N pictures of each evaluation split, in "
                                             "source order [default: all; 3,000 with --quick]"),
    k: Optional[list[int]] = typer.Option(None, "--k", min=1, help="kNN neighbours, repeat for several "
                                          "[default: 200 and 20]"),
    transfer: Optional[list[str]] = typer.Option(None, help="also evaluate on fashion-mnist[:ROOT] or imagefolder:ROOT "
                                                 "(ROOT/train and ROOT/test) (repeatable)"),
    ablate: Optional[list[str]] = typer.Option(None, help="partner:nearest|random|farthest | partners:N | "
                                               "self-pairs:SHARE, each trained as both with the first method "
                                               "(repeatable)"),
    label_pairs: Optional[bool] = typer.Option(None, "--label-pairs/--no-label-pairs", help="also the label pairs, "
                                               "the ceiling, when the source has labels [default: yes; no with "
                                               "--quick]"),
    references: bool = typer.Option(True, "--references/--no-references", help="also the single-image run of each "
                                    "method and the supervised run"),
    quick: bool = typer.Option(False, "--quick", help="sizes that fit a 2-core CPU in under 45 minutes: 3,000 "
                               "pictures, 3 epochs, no label pairs unless --label-pairs"),
    workers: Optional[int] = typer.Option(None, min=0, help="decode processes [default: spare cores]"),
) -> None:
    """The papers' study on one labelled source: matched releases (semantic pairs, label pairs, the augment
    control), every method and positives mode over seeds, kNN and linear, transfer, ablations; one HTML and JSON
    report with paired differences."""
    from .progress import loading

    with loading("study: loading torch and the methods"):
        from .study.execute import run_study
        from .study.plan import StudyConfig, with_quick

    def names(text: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))

    cfg = StudyConfig(out=str(out_dir), source=source, root=str(root) if root else None,
                      test_root=str(test_root) if test_root else None, sampler=sampler, methods=names(methods),
                      modes=names(modes), seeds=seeds, epochs=epochs or StudyConfig.epochs, batch_size=batch_size,
                      backbone=backbone, image_size=image_size, limit=limit, eval_limit=eval_limit,
                      ks=tuple(dict.fromkeys(k)) if k else StudyConfig.ks, label_pairs=label_pairs is not False,
                      references=references, transfer=tuple(transfer or ()), ablations=tuple(ablate or ()),
                      workers=workers)
    if quick:
        given = {name for name, v in (("limit", limit), ("eval_limit", eval_limit), ("epochs", epochs),
                                      ("label_pairs", label_pairs)) if v is not None}
        cfg = with_quick(cfg, given)
    result = run_study(cfg, say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
    out.print(f"report: {result['report']}", markup=False, highlight=False)
    out.print(f"table:  {Path(result['report']).parent / 'study.json'}", markup=False, highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("builds/demo"), "--out", help="where the runs and releases go"),
    root: Optional[Path] = typer.Option(None, help="Fashion-MNIST IDX files [default: the Debian package's]"),
    limit: int = typer.Option(10_000, min=100, help="images used from each split"),
    epochs: int = typer.Option(3, min=1, help="epochs for every training run"),
    sampler: str = typer.Option("pixels", help="the semantic sampler: pixels (raw pixels, PCA-whitened) | ssl "
                                "(SimCLR pretrained on single images first)"),
) -> None:
    """The SePP-ID loop on Fashion-MNIST: a sampler mines pairs, then augment vs both are trained and evaluated."""
    from .demo import results_table, run_demo

    summary = run_demo(out_dir, str(root) if root else None, limit=limit, epochs=epochs, sampler=sampler,
                       say=lambda line: err.print(f"[bold]{line}[/bold]"))
    out.print(results_table(summary, "simclr"))
    out.print(f"release: {summary['build'] / 'release'}")
    out.print(f"report:  {summary['build'] / 'report' / 'index.html'}")


@app.command()
def push(
    release: Path = typer.Argument(..., metavar="RELEASE", help="release directory (holds manifest.json)"),
    repo_id: str = typer.Option(..., help="the dataset repo, ORG/NAME"),
    private: bool = typer.Option(False, "--private", help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to [default: main]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be uploaded; touch no network"),
    max_files: int = typer.Option(100, min=1, max=1000, help="files in one commit (the Hub recommends under 100)"),
    rights: bool = typer.Option(False, "--i-hold-the-rights",
                                help="publish the pictures of a source whose recipe says they may not be "
                                "redistributed (redistribute: false), stating that you hold the rights to"),
) -> None:
    """Verify a release, then upload the files it verified to the Hugging Face Hub; --dry-run lists them."""
    from .export.hub import check_repo_id, push_release
    from .export.manifest import load_manifest, verified_files

    check_repo_id(repo_id)
    files = verified_files(release)
    manifest = load_manifest(release)
    if manifest.images == "embed" and (manifest.model_extra or {}).get("redistribute") is False and not rights:
        raise UserError(f"{release} holds the pictures of {manifest.recipe.get('source')!r}, whose recipe says they "
                        "may not be redistributed; publish an ID-only release (--images none, and `spp-curate "
                        "materialize` for its users), or pass --i-hold-the-rights if you do",
                        option="--i-hold-the-rights")
    if dry_run:
        for path, size in files:
            out.print(f"{size:>14,}  {path}", markup=False, highlight=False)
        total = sum(size for _, size in files)
        out.print(f"{len(files)} files, {total:,} bytes -> dataset {repo_id}"
                  f"{' (private)' if private else ''}{f' @ {revision}' if revision else ''} (dry run: nothing sent)",
                  markup=False, highlight=False)
        return
    result = push_release(release, files, repo_id, private=private, revision=revision, max_files=max_files,
                          say=lambda line: err.print(line, markup=False, highlight=False))
    out.print(f"pushed {len(files)} files to {result['url']}: sent {result['sent_files']} ({result['sent_bytes']:,} "
              f"bytes) in {result['commits']} commit(s), {len(files) - result['sent_files']} already there; the remote "
              f"matches the manifest at commit {result['commit']}", markup=False, highlight=False)
    out.print(f"pin it: spp-curate train --pairs hf://{repo_id}@{result['commit']}  |  "
              f"load_dataset(\"{repo_id}\", revision=\"{result['commit']}\")", markup=False, highlight=False)


@app.command()
def materialize(
    release: Path = typer.Argument(..., metavar="RELEASE", help="an ID-only release (built with --images none)"),
    source: str = typer.Option(..., help=f"what your copy is: {source_forms()} (never taken from the release)"),
    root: Optional[Path] = typer.Option(None, help="your own copy of the source"),
    out_dir: Path = typer.Option(..., "--out", help="where to write the full release (new, empty, or an "
                                                    "earlier materialize output)"),
) -> None:
    """Rebuild an ID-only release's image shards from your own copy of the source, checking every digest."""
    from .engine import get_engine
    from .export.materialize import materialize as run

    if root is not None and not root.exists():
        raise UserError(f"{root} does not exist", option="--root")
    problems, counts = run(release, source, root, out_dir, get_engine("local"))
    if problems:
        for problem in problems:
            err.print(f"materialize: {problem}", markup=False, highlight=False)
        err.print(f"materialize: {len(problems)} image(s) not usable as listed; nothing written", markup=False)
        raise typer.Exit(1)
    out.print(f"release: {out_dir} ({counts['pairs']:,} pairs in {counts['shards']} shards)",
              markup=False, highlight=False)


@app.command()
def diff(
    old: Path = typer.Argument(..., metavar="OLD", help="the earlier release directory"),
    new: Path = typer.Argument(..., metavar="NEW", help="the later release directory"),
    show: int = typer.Option(10, min=0, help="keys shown for each kind of change"),
) -> None:
    """Print what changed between two releases: pairs added and removed, images added, removed, changed."""
    from .export.versions import diff_releases

    d = diff_releases(old, new)
    say = lambda line: out.print(line, markup=False, highlight=False)  # noqa: E731
    versions = ["?" if v is None else str(v) for v in d["versions"]]
    say(f"{old} (version {versions[0]}) -> {new} (version {versions[1]}): "
        + ("NEW's parent is OLD" if d["descends"] else "NEW does not name OLD as its parent"))
    by = ("the sha256 of the bytes each release ships" if d["by"] == "bytes"
          else "the digest column (an ID-only release ships no pictures)")
    say(f"pictures compared by {by}")
    for release, keys in zip((old, new), d["conflicting"]):
        if keys:
            say(f"warning: {release} ships {len(keys):,} keys with two different pictures: "
                + ", ".join(keys[:show]))
    p = d["pairs"]
    say(f"pairs: +{p['added']:,} -{p['removed']:,} ({p['kept']:,} in both)")
    for title, changes in (("images in pairs", d["images_in_pairs"]),
                           ("source images (NEW's changelog)", (d["changelog"] or {}).get("images"))):
        if changes is None:
            continue
        say(f"{title}: +{len(changes['added']):,} -{len(changes['removed']):,} ~{len(changes['changed']):,}")
        for sign, kind in (("+", "added"), ("-", "removed"), ("~", "changed")):
            for key in changes[kind][:show]:
                say(f"  {sign} {key}")


@app.command()
def audit(
    release: Path = typer.Argument(..., metavar="RELEASE", help="a release directory (verified first; from anywhere)"),
    against: str = typer.Option(..., help=f"the reference set, {reference_forms()}"),
    threshold: str = typer.Option("0.99", help="copy score at or above which an image is a near-copy, or a "
                                               "quantile of the release's own scores (q0.999)"),
    max_leaks: str = typer.Option("auto", help="exit 1 when more distinct images than this are near-copies; auto: "
                                  "more than the reference set's own look-alike rate explains (95 % bound), or "
                                  "any with the same bytes"),
    show: int = typer.Option(10, min=0, help="near-copies listed, strongest first"),
    workers: Optional[int] = typer.Option(None, min=0, help="decode processes for the reference set"),
) -> None:
    """Count a release's near-copies of a reference (evaluation) set, per pair side; exit 1 above --max-leaks."""
    from .config import parse_threshold
    from .engine import get_engine
    from .leakage.audit import SIDES, audit_release

    parse_threshold(threshold, "--threshold")
    if max_leaks != "auto" and not (max_leaks.isdigit()):
        raise UserError(f"{max_leaks!r} is not a count; give a whole number or auto", option="--max-leaks")
    result = audit_release(release, against, threshold, get_engine("local"), workers)

    def say(text: str) -> None:
        out.print(text, markup=False, highlight=False)

    how = f"copy score >= {result.threshold:.4f} or same bytes" if result.pixels else \
        "same bytes only: an ID-only release has no pixels (materialize it to check near-copies)"
    total = result.leaked()
    expected, bound = result.expected_by_chance()
    if max_leaks == "auto":
        allowed = bound if result.same_bytes() == 0 else 0
        rule = (f"auto: {bound:,}, the 95 % bound of what the reference set's own look-alikes explain"
                if result.same_bytes() == 0 else "0: some share a reference picture's bytes")
    else:
        allowed, rule = int(max_leaks), max_leaks
    say(f"{total:,} distinct image(s) leak ({how}) of {result.checked:,} checked; allowed: {rule}")
    for side in SIDES:
        say(f"{side}: {result.images[side]:,} images, {result.leaked(side):,} near-copies of {against}")
    if result.lookalike_rate is not None:
        say(f"look-alikes: {result.lookalike_rate:.2%} of {result.lookalike_sample:,} pictures of {against} reach "
            f"{result.threshold:.4f} against another picture of the same set, so about {expected:,.0f} of "
            f"{result.checked:,} would by chance (up to {bound:,})")
    ranked = sorted(result.leaks, key=lambda leak: (not leak.same_digest, -leak.score))
    for leak in ranked[:show]:
        say(f"leak: {leak.side} {leak.key} ~ {leak.reference_key} "
            f"{'same bytes' if leak.same_digest else f'score {leak.score:.4f}'}")
    if len(ranked) > show:
        say(f"... {len(ranked) - show:,} more (--show N lists more)")
    if total > allowed:
        raise typer.Exit(1)


# Typer may vendor its own click; take the base class of its usage errors from Typer itself.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


#: The address space a command needs before it holds any data: torch, faiss and pyarrow map about 5.8 GiB of
#: libraries and thread stacks in a small build (VmPeak). Below it, a library fails to load or pyarrow's thread
#: pool never starts and the mine stage waits forever: a limit under this is refused in one line at the start.
MIN_ADDRESS_SPACE = 6 * 2**30


def check_address_space() -> None:
    """A one-line error when ``ulimit -v`` leaves less than :data:`MIN_ADDRESS_SPACE`."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        raise UserError(f"the address space is limited to {soft / 2**30:.1f} GiB (ulimit -v {soft // 1024}); the "
                        f"libraries alone map about 5.8 GiB (torch, faiss, pyarrow and their threads), so a stage "
                        f"would fail to load one or wait on a thread pool that never starts: allow at least "
                        f"{MIN_ADDRESS_SPACE // 2**30} GiB (ulimit -v {MIN_ADDRESS_SPACE // 1024}) or none "
                        "(ulimit -v unlimited); to cap memory, cap resident memory instead (a cgroup, systemd-run "
                        "-p MemoryMax=)")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: errors a user can fix print one line, never a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and not set(args) & {"--help", "--version"}:
            check_address_space()
        rv = app(args=argv, standalone_mode=False, prog_name="spp-curate")
    except UserError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except _CLICK_ERROR as exc:
        err.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err.print(f"error: no space left on the device{f' of {exc.filename}' if exc.filename else ''}; free some "
                  "space and run the same command again", markup=False, highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The ``spp-curate`` command: :func:`main`, then an exit without the interpreter's teardown. After torch,
    faiss and the decoders have run, that teardown (collecting every module's objects, torch unregistering its
    operators) takes 1-2 s on a small CPU, a silent wait after the last line; every file a command writes is
    closed (and renamed into place) before :func:`main` returns, so the exit handlers are run, the streams
    flushed and the process ends there. With a thread of a library still running, the ordinary exit is kept."""
    import atexit
    import os
    import threading

    code = main()
    finish = getattr(atexit, "_run_exitfuncs", None)
    if finish is None or any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                             for t in threading.enumerate()):
        sys.exit(code)
    finish()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
