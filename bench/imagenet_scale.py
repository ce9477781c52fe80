"""ImageNet at its own size: every stage of a build, one at a time, with its CPU seconds, peak RSS and disk.

    python bench/imagenet_scale.py --quick                          # a 20,000-picture ImageNet-shaped tree
    python bench/imagenet_scale.py --images 80000                   # the tree of the record in BENCHMARKS.md
    python bench/imagenet_scale.py --synthetic-embeddings 1281167   # mine, report, export, verify at 1.28M

**Tree mode** generates an ImageNet-shaped tree (``train/<wnid>/<wnid>_<n>.JPEG`` in up to 1,000 wnid
folders, ``LOC_synset_mapping.txt``; small JPEGs, each a pattern of its own over its class's colours) and runs
``spp-curate build --source imagenet --encoder pixels:16`` stage by stage, each stage its own process, then
``verify`` with 1 and 2 workers, then the index stage again on the unchanged tree in this process with every
``os.stat`` of a picture counted.

**Synthetic mode** writes a build directory as the index and embed stages would (real ImageNet-shaped keys,
1,000 labels, 512-d float16 embeddings around class centres, copy descriptors) and runs mine (``--category
label`` or ``none``), report, an ID-only export (``--images none``) and ``verify``, each its own process.

**Kill mode** (``--kill-each-stage``, with ``--images N``) builds the tree once uninterrupted, then once per
stage kills the build (SIGKILL to its process group, workers included) a moment into that stage and runs the
same command again; each release is compared file by file (sha256) with the uninterrupted one.

Per stage: CPU seconds (user + sys of the stage's process and its workers, from ``wait4``), peak RSS
(the largest of the process and its workers) and, where it writes, bytes on disk per image. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLASSES = 1000


def wnid(c: int) -> str:
    return f"n{1440764 + 7919 * c:08d}"


def _class_pictures(args: tuple[str, int, list[int]]) -> None:
    from PIL import Image

    root, c, numbers = args
    rng = np.random.default_rng(c)
    low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    pattern = np.asarray(Image.fromarray(low).resize((80, 60), Image.Resampling.BICUBIC), np.int16)
    folder = Path(root) / "train" / wnid(c)
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        # a picture of its own (its own coarse pattern) in its class's colours: distinct pictures, as a class's
        # photographs are, not copies of one another
        own = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (80, 60), Image.Resampling.BICUBIC), np.int16)
        dx, dy = rng.integers(0, 16), rng.integers(0, 12)
        view = (0.4 * pattern + 0.6 * own)[dy: dy + 48, dx: dx + 64] + rng.normal(0, 12, (48, 64, 3))
        Image.fromarray(np.clip(view, 0, 255).astype(np.uint8)).save(folder / f"{wnid(c)}_{n}.JPEG",
                                                                     quality=int(rng.integers(70, 95)))


def make_tree(root: Path, images: int, workers: int) -> None:
    """``images`` small JPEGs over ``min(1000, images // 20)`` wnid folders, and the synset mapping."""
    classes = max(2, min(CLASSES, images // 20))
    per = np.bincount(np.arange(images) % classes, minlength=classes)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(c)} class {c}, thing {c}\n" for c in range(classes)))
    jobs = [(str(root), c, list(range(int(per[c])))) for c in range(classes)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_class_pictures, jobs, chunksize=8))


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its CPU seconds (user + sys, workers included), peak RSS (MB) and wall seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    text = out.decode(errors="replace")
    last = [line for line in text.splitlines() if line.startswith("{")]
    rate = re.findall(r"checked in [0-9.]+ s, ([0-9,]+) MB/s\)", text)  # verify's own rate, past its imports
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - started, 2), **(json.loads(last[-1]) if last else {}),
            **({"reported_mb_s": float(rate[-1].replace(",", ""))} if rate else {})}


def disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "spp_curate.cli", *map(str, args)]


def stat_count(root: Path, build: Path, recipe_args: list[str]) -> dict:
    """The index stage of an unchanged tree, in this process, with every ``os.stat`` of a picture counted."""
    from collections import Counter

    from spp_curate.cli import main as spp_main

    counts: Counter = Counter()
    real = os.stat

    def stat(path, *args, **kwargs):
        name = os.fspath(path) if not isinstance(path, int) else ""
        if isinstance(name, str) and name.endswith(".JPEG"):
            counts[name] += 1
        return real(path, *args, **kwargs)

    os.stat = stat
    try:
        code = spp_main([*map(str, recipe_args), "--out", str(build), "--until", "index"])
    finally:
        os.stat = real
    assert code == 0
    files = sum(1 for _ in (root / "train").rglob("*.JPEG"))
    return {"files": files, "stats": int(sum(counts.values())), "max_per_file": max(counts.values(), default=0)}


def tree_mode(args, work: Path) -> dict:
    root, build = work / "imagenet", work / "build"
    t0 = time.perf_counter()
    make_tree(root, args.images, args.workers)
    result: dict = {"mode": "tree", "images": args.images, "generate_s": round(time.perf_counter() - t0, 1)}
    recipe = ["build", "--source", "imagenet", "--root", root, "--encoder", "pixels:16", "--category", "label",
              "--workers", args.workers]
    stages: dict = {"index": measured(cli(*recipe, "--out", build, "--until", "index"))}
    for stage in ("embed", "exclude", "mine", "report", "export"):
        stages[stage] = measured(cli(stage, build))
        print(f"{stage}: {stages[stage]['cpu_s']} CPU-s, peak RSS {stages[stage]['peak_rss_mb']} MB", flush=True)
    stats = json.loads((build / "mine_stats.json").read_text())
    n = args.images
    sizes = {"index": disk(build / "index.parquet"), "embeddings": disk(build / "embeddings"),
             "pairs": disk(build / "pairs.parquet"), "copy_scores": disk(build / "copy-scores.parquet"),
             "release": disk(build / "release")}
    result.update(stages=stages, disk_bytes_per_image={k: round(v / n, 1) for k, v in sizes.items()},
                  pairs=stats["pairs"], copy_rule=stats["duplicates"])
    compared = stats["duplicates"].get("pairs_compared", 0)
    result["mine_over_embed_cpu"] = round(stages["mine"]["cpu_s"] / stages["embed"]["cpu_s"], 3)
    result["pairs_compared"] = compared
    result["verify"] = verify_rates(build / "release")
    result["unchanged_index_stats"] = stat_count(root, work / "build", recipe)
    return result


#: A line printed as each stage begins (for exclude, which prints only its summary when no reference set is
#: given, and for export, whose first line comes late, the line of the stage before): the kill comes
#: ``--kill-delay`` seconds after it.
STAGE_MARKS = {"index": "index: start", "embed": "embed: start", "exclude": "embed: embedded",
               "mine": "mine: kNN: start", "report": "report: figures: start", "export": "report: images"}


def release_digests(release: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(release).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(release.rglob("*")) if p.is_file()}


def killed_during(cmd: list[str], mark: str, delay: float) -> dict:
    """Run ``cmd``; ``delay`` seconds after it prints a line starting with ``mark``, SIGKILL its whole process
    group. Returns when it was killed (or that it ended first) and the last line it printed."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    started, seen, last = time.perf_counter(), None, ""
    for raw in proc.stdout:
        last = raw.decode(errors="replace").strip()
        if seen is None and last.startswith(mark):
            seen = time.perf_counter()
            break
    if seen is not None:
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        killed = False
    proc.wait()
    proc.stdout.close()
    return {"killed": killed, "at_s": round(time.perf_counter() - started, 1), "after_line": last[:80]}


def kill_mode(args, work: Path) -> dict:
    root = work / "imagenet"
    make_tree(root, args.images, args.workers)
    recipe = ["build", "--source", "imagenet", "--root", root, "--encoder", "pixels:16", "--category", "label",
              "--workers", args.workers]
    measured(cli(*recipe, "--out", work / "reference"))
    want = release_digests(work / "reference" / "release")
    result: dict = {"mode": "kill", "images": args.images, "release_files": len(want), "stages": {}}
    for stage in args.kill_stages.split(","):
        out = work / f"killed-{stage}"
        # the ID-only export of a small tree is over within a second of the report's last line
        kill = killed_during(cli(*recipe, "--out", out), STAGE_MARKS[stage],
                             min(args.kill_delay, 0.2) if stage == "export" else args.kill_delay)
        rerun = measured(cli(*recipe, "--out", out))
        got = release_digests(out / "release")
        kill.update(identical=got == want, rerun_cpu_s=rerun["cpu_s"],
                    differing=sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5])
        result["stages"][stage] = kill
        print(f"{stage}: killed {kill['killed']} at {kill['at_s']} s, rerun {rerun['cpu_s']} CPU-s, release "
              f"{'identical' if kill['identical'] else 'DIFFERENT'}", flush=True)
        shutil.rmtree(out)
    result["all_identical"] = all(v["identical"] for v in result["stages"].values())
    return result


def verify_rates(release: Path) -> dict:
    """``verify`` with one worker and with two, twice each in turn (the machine's noise), on the same release:
    the rate each run reports (bytes checked over the seconds from reading the manifest to the verdict, the
    interpreter's start and imports left out) and the command's whole wall time."""
    out: dict = {}
    for _ in range(2):
        for workers in (1, 2):
            got = measured(cli("verify", release, "--workers", workers))
            best = out.get(f"workers_{workers}")
            if best is None or got.get("reported_mb_s", 0) > best.get("reported_mb_s", 0):
                out[f"workers_{workers}"] = got
    size = disk(release)
    for w in (1, 2):
        out[f"workers_{w}"]["mb_s"] = round(size / 1e6 / out[f"workers_{w}"]["wall_s"], 1)
    out["bytes"] = size
    out["speedup_2_over_1"] = round(out["workers_2"]["reported_mb_s"] / out["workers_1"]["reported_mb_s"], 2)
    out["wall_speedup_2_over_1"] = round(out["workers_1"]["wall_s"] / out["workers_2"]["wall_s"], 2)
    return out


def synthetic_build(build: Path, root: Path, n: int, dim: int = 512, chunk: int = 65_536, seed: int = 0) -> None:
    """A build directory as the index and embed stages leave it, for ``n`` pictures of 1,000 classes, and the
    tree of their keys under ``root`` (:func:`linked_tree`)."""
    import hashlib

    import pyarrow as pa

    from spp_curate import layout
    from spp_curate.config import Recipe, save_recipe
    from spp_curate.curate.index import INDEX_SCHEMA, QUARANTINE_SCHEMA
    from spp_curate.files import write_json, write_table
    from spp_curate.pairing.duplicates import DESCRIPTOR_VERSION, SIDE

    rng = np.random.default_rng(seed)
    build.mkdir(parents=True)
    labels = np.sort(rng.integers(0, CLASSES, n)).astype(np.int32)
    names = [f"class {c}" for c in range(CLASSES)]
    counter = np.arange(n) - np.searchsorted(labels, labels)
    key_list = [f"{wnid(int(c))}/{wnid(int(c))}_{int(i)}.JPEG" for c, i in zip(labels, counter)]
    linked_tree(root, key_list)
    keys = pa.array(key_list, pa.string())
    del key_list
    digests = pa.array([hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in range(n)], pa.string())
    table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "key": keys, "split": pa.array(["train"] * n),
                      "label": labels, "label_name": pa.array([names[c] for c in labels]),
                      "width": pa.array(np.full(n, 500, np.int32)), "height": pa.array(np.full(n, 375, np.int32)),
                      "nbytes": pa.array(np.full(n, 110_000, np.int64)), "digest": digests,
                      "format": pa.array(["JPEG"] * n)}, schema=INDEX_SCHEMA)
    write_table(build / layout.INDEX, table.replace_schema_metadata(
        {layout.CLASS_NAMES_META: json.dumps(names).encode()}))
    write_table(build / layout.QUARANTINE, pa.table({"key": [], "error": []}, schema=QUARANTINE_SCHEMA))
    write_table(build / layout.EXCLUSION, pa.table({"id": pa.array([], pa.int64()), "excluded": pa.array([], pa.bool_())}))
    emb = build / layout.EMBEDDINGS
    emb.mkdir()
    centres = rng.normal(size=(CLASSES, dim)).astype(np.float32)
    files = []
    for c, lo in enumerate(range(0, n, chunk)):
        hi = min(n, lo + chunk)
        v = centres[labels[lo:hi]] + rng.normal(scale=1.2, size=(hi - lo, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        vec_path, ids_path = layout.chunk_paths(emb, c)
        np.save(vec_path, v.astype(np.float16))
        np.save(ids_path, np.arange(lo, hi, dtype=np.int64))
        np.save(layout.chunk_copy_path(emb, c), rng.integers(0, 255, (hi - lo, SIDE * SIDE), dtype=np.uint8))
        write_table(layout.chunk_keys_path(emb, c), pa.table({"key": keys[lo:hi], "digest": digests[lo:hi],
                                                               "error": pa.nulls(hi - lo, pa.string())}))
        files.append(c)
    write_json(build / layout.EMBEDDINGS_META, {
        "encoder": "synthetic", "dim": dim, "image_size": 224, "decode": "none", "model": {}, "dtype": "float16",
        "normalized": "l2", "count": n, "chunks": len(files), "chunk_files": files, "chunk_size": chunk,
        "failed_ids": [], "copy_descriptor": {"version": DESCRIPTOR_VERSION, "side": SIDE, "dtype": "uint8"}})
    save_recipe(build, Recipe(name="synthetic", source="imagenet", root=str(root), encoder="pixels:16",
                              images="none", chunk_size=chunk))


def linked_tree(root: Path, keys: list[str]) -> None:
    """An ImageNet-shaped tree of ``keys``: each file a hard link to its class's one small JPEG (the report
    shows pictures of a sample of pairs; a million links cost a million directory entries, not pictures)."""
    from PIL import Image

    made: dict[str, Path] = {}
    for key in keys:
        folder = key.split("/", 1)[0]
        if folder not in made:
            (root / "train" / folder).mkdir(parents=True, exist_ok=True)
            c = len(made)
            made[folder] = root / f"{folder}.JPEG"
            pixels = np.random.default_rng(c).integers(0, 255, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((64, 48), Image.Resampling.BICUBIC).save(made[folder], quality=85)
        os.link(made[folder], root / "train" / key)


def run_stage(stage: str, build: Path, category: str) -> None:
    """One stage's function on a synthetic build, in this process (the parent measures it)."""
    from spp_curate.config import load_recipe
    from spp_curate.engine.local import LocalEngine

    recipe = load_recipe(build).model_copy(update={"category": category})
    if stage == "mine":
        from spp_curate.pairing.mine import mine_pairs

        print(json.dumps(mine_pairs(recipe, build, LocalEngine())))
    elif stage == "report":
        from spp_curate.pairing.quality import write_report

        write_report(recipe, build, LocalEngine())
    elif stage == "export":
        from spp_curate.export.release import export_release

        export_release(recipe, build, LocalEngine())


def synthetic_mode(args, work: Path) -> dict:
    n = args.synthetic_embeddings
    build = work / "synthetic"
    t0 = time.perf_counter()
    synthetic_build(build, work / "imagenet", n)
    result: dict = {"mode": "synthetic", "images": n, "category": args.category,
                    "generate_s": round(time.perf_counter() - t0, 1), "stages": {}}
    me = [sys.executable, str(Path(__file__).resolve()), "--run-stage"]
    for stage in args.stages.split(","):
        got = measured([*me, stage, "--build", str(build), "--category", args.category])
        result["stages"][stage] = got
        print(f"{stage}: {got['cpu_s']} CPU-s, peak RSS {got['peak_rss_mb']} MB, {got['wall_s']} s", flush=True)
    stats = json.loads((build / "mine_stats.json").read_text())
    result["pairs"] = stats["pairs"]
    result["search"] = stats["search"]
    result["copy_rule"] = stats["duplicates"]
    if "export" in args.stages and (build / "release").is_dir():
        result["verify"] = verify_rates(build / "release")
    return result


def _noise_pictures(args: tuple[str, int, int]) -> None:
    from PIL import Image

    folder, first, count = args
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        pixels = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(folder) / f"{i:06d}.jpg", quality=92)


def verify_mode(args, work: Path) -> dict:
    """A release of large pictures (noise JPEGs of about 1.6 MB, in 10 class folders, ``--verify-gb`` GB in
    all), built with the pictures embedded in 100 MB shards, then ``verify`` with one worker and with two on
    it."""
    from concurrent.futures import ProcessPoolExecutor

    root, build = work / "pictures", work / "build"
    count = max(20, int(args.verify_gb * 1e9 / 1.6e6))
    jobs = []
    for c in range(10):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        lo, hi = c * count // 10, (c + 1) * count // 10
        jobs += [(str(folder), s, min(50, hi - s)) for s in range(lo, hi, 50)]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(_noise_pictures, jobs))
    # shards of 100 MB: a file is hashed by one worker, so a release of a few big shards cannot be spread
    # (three 500 MB shards on two workers: 1.5x at most); a real ImageNet release has hundreds
    measured(cli("build", "--source", "imagefolder", "--root", root, "--out", build, "--encoder", "pixels:8",
                 "--category", "label", "--workers", args.workers, "--shard-size", "100MB"))
    return {"mode": "verify", "pictures": count, "verify": verify_rates(build / "release")}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 20,000-picture tree")
    parser.add_argument("--images", type=int, help="pictures in the generated tree [20,000]")
    parser.add_argument("--synthetic-embeddings", type=int, help="N synthetic 512-d embeddings instead of a tree")
    parser.add_argument("--category", default="label", choices=["label", "none"], help="synthetic mode's mining")
    parser.add_argument("--stages", default="mine,report,export", help="synthetic mode's stages")
    parser.add_argument("--verify-gb", type=float, help="verify alone, on a release of this many GB of pictures")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    parser.add_argument("--kill-each-stage", action="store_true",
                        help="kill -9 a build of the tree in each stage, rerun it, compare with an uninterrupted one")
    parser.add_argument("--kill-delay", type=float, default=1.0, help="seconds into a stage the kill comes [1]")
    parser.add_argument("--kill-stages", default=",".join(STAGE_MARKS), help="the stages killed [all]")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_stage:
        run_stage(args.run_stage, args.build, args.category)
        return None
    args.images = args.images or 20_000
    work = args.keep or Path(tempfile.mkdtemp(prefix="spp-imagenet-scale-"))
    try:
        result = (verify_mode(args, work) if args.verify_gb else kill_mode(args, work) if args.kill_each_stage else
                  synthetic_mode(args, work) if args.synthetic_embeddings else tree_mode(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
