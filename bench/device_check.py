"""Every GPU figure and every CUDA correctness check of this project, in one command for a bare GPU machine.

    make device-wheels                              # here, with the package index: wheels into device-wheels/
    python bench/device_check.py --out DIR          # on the GPU machine (or: make device-check)
    python bench/device_check.py --cpu --out DIR    # the rehearsal: every step on the CPU at small sizes
    python bench/device_check.py --cpu --smoke --out DIR   # the smallest rehearsal (the test suite runs it)

For a machine that has Python, torch, torchvision, numpy, pandas, pyarrow, pillow, typer, rich and
matplotlib and no network. The other packages the project needs come as wheels from ``device-wheels/``
(``make device-wheels``: pure-Python or manylinux x86-64 wheels for CPython 3.12, no CUDA runtime wheels),
installed without dependencies into a temporary prefix that only this command's subprocesses see. Then:

1. ``cuda_tests``: ``tests/test_cuda.py`` with ``SPP_CURATE_CUDA_TESTS=required`` (``cpu`` in the rehearsal);
2. ``embed``: ``bench/scale.py`` with ViT-B-32, then ViT-L-14, on generated ImageNet-like JPEGs: the embed
   stage against the model alone in the same run, and the feeding side's rate per worker;
3. ``knn``: ``bench/mine.py --full``: exact top-32 of 1,281,167 x 512 (faiss on its GPU, else torch on CUDA);
4. ``trainer``: ``bench/trainer.py --full`` (pairs/s of ``augment`` and ``both``, against the previous path);
5. ``eval``: ``spp-curate eval`` of a short run on 70,000 Fashion-MNIST-sized pictures (the committed subset
   tiled), images/s.

Each step runs in its own process under its own time cap, so one slow part cannot starve the others, and
``DIR/device-check.json`` is rewritten after every step (a run cut short keeps what it measured), with
``DIR/device-check.log`` beside it holding every step's output.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WHEELS = REPO / "device-wheels"
SUBSET = REPO / "tests" / "data" / "fashion-mnist"

#: What the project imports that a bare CUDA image lacks, as distribution names; ``bench/device_wheels.py``
#: downloads these at the versions installed here. Their own dependencies that such an image already has
#: (huggingface_hub, safetensors, timm, regex, tqdm, fsspec, xxhash, pyyaml, pytest, ...) are not carried, nor
#: what the modules used here never import (lightly's hydra-core and omegaconf, the review page's fastapi).
CARRIED = ["open_clip_torch", "ftfy", "wcwidth", "faiss-cpu", "webdataset", "braceexpand", "datasets", "dill",
           "multiprocess", "lightly", "kornia", "kornia_rs", "pydantic",
           "pydantic_core", "annotated-types", "typing-inspection"]
#: The modules the steps import, checked before anything runs.
MODULES = ["torch", "torchvision", "numpy", "pandas", "pyarrow", "PIL", "typer", "rich", "matplotlib", "yaml",
           "open_clip", "timm", "faiss", "webdataset", "datasets", "lightly", "kornia", "pydantic", "pytest"]

#: Step time caps in seconds, GPU machine: 9 minutes in all with the install and the picture generation.
#: Worst case 20 s install + 140 + 45 s of pictures + 100 + 70 + 60 + 60 + 40 = 535 s.
GPU_CAPS = {"cuda_tests": 140, "embed_b32": 100, "embed_l14": 70, "knn": 60, "trainer": 60, "eval": 40}
CPU_CAPS = {"cuda_tests": 150, "embed_b32": 45, "embed_l14": 45, "knn": 30, "trainer": 60, "eval": 60}


class Log:
    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", buffering=1)

    def __call__(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.fh.write(line + "\n")


def install(wheels: Path, log: Log) -> tuple[dict[str, str], str, dict]:
    """The environment for the steps: the carried wheels in a temporary prefix (when anything is missing)
    and this repository on PYTHONPATH. Returns it, a line saying what was done, and :func:`probe` of it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    probed = probe(env)
    missing = probed["missing"]
    if not missing:
        return env, "every module present; nothing installed", probed
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise SystemExit(f"missing modules {', '.join(missing)} and no wheels in {wheels} (run `make device-wheels` "
                         "where the package index is reachable, and carry that folder)")
    prefix = Path(tempfile.mkdtemp(prefix="spp-device-wheels-"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                           "--disable-pip-version-check", "--target", str(prefix), *map(str, found)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pip could not install the carried wheels: {proc.stderr.strip()[-400:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(prefix), os.environ.get("PYTHONPATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([str(prefix / "bin"), env.get("PATH", "")])
    after = probe(env)
    if after["missing"]:
        raise SystemExit(f"after installing {len(found)} wheels these modules still do not import: "
                         f"{', '.join(after['missing'])}")
    return env, f"installed {len(found)} wheels into {prefix} in {time.perf_counter() - started:.1f} s", after


def probe(env: dict[str, str]) -> dict:
    """One interpreter under ``env``: the versions of Python, torch (and its GPU) and every module in
    :data:`MODULES`, and ``missing``: those that do not import, each with its error."""
    code = r"""
import json, importlib, platform
out, missing = {"python": platform.python_version()}, []
for m in %r:
    try:
        out[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as exc:
        out[m] = "missing: " + type(exc).__name__
        missing.append(m + " (" + type(exc).__name__ + ": " + str(exc)[:80] + ")")
try:
    import torch
    out.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception:
    pass
try:
    import faiss
    out["faiss_gpus"] = faiss.get_num_gpus()
except Exception:
    pass
out["missing"] = missing
print(json.dumps(out))
""" % (MODULES,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr[-300:], "missing": [proc.stderr[-300:]]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step(name: str, cmd: list[str], cap: float, env: dict[str, str], log: Log, cwd: Path = REPO) -> dict:
    """Run one step under its cap; its output goes to the log; returns its last JSON line, its seconds, and
    ``error`` when it failed or ran out of time.

    The output is read as raw bytes from a non-blocking pipe, never a line at a time, so the cap holds
    whatever the step prints (pytest's progress dots end no line); at the cap the step's whole process
    group is killed."""
    import selectors

    log(f"step {name}: {' '.join(cmd)} (cap {cap:.0f} s)")
    started = time.perf_counter()
    deadline = started + cap
    out_lines: list[str] = []
    pending = b""

    def take(data: bytes, final: bool = False) -> None:
        nonlocal pending
        pending += data
        *lines, pending = pending.split(b"\n")
        if final and pending:
            lines, pending = [*lines, pending], b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            out_lines.append(line)
            log.fh.write(f"    {name}| {line.rstrip()[:400]}\n")

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    rc: int | str | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while rc is None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                rc = "timeout"
                break
            if not sel.select(timeout=min(remaining, 0.5)):
                continue
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                take(data)
                continue
            try:  # the pipe is closed: the step is ending (or left a child holding nothing)
                rc = proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
    if rc == "timeout" or proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
    proc.stdout.close()
    take(b"", final=True)
    seconds = round(time.perf_counter() - started, 1)
    result: dict = {"seconds": seconds}
    for line in reversed(out_lines):
        if line.startswith("{") and line.endswith("}"):
            try:
                result["result"] = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if rc != 0:
        tail = " | ".join(out_lines[-3:])[-300:]
        result["error"] = f"timed out after {cap:.0f} s" if rc == "timeout" else f"exit {rc}: {tail}"
    log(f"step {name}: {'ok' if 'error' not in result else result['error']} in {seconds} s")
    return result


#: Distinct pictures drawn by ``bench/embed.py``'s generator (about 50 ms each); the rest of the files are
#: shifted, flipped and re-encoded variants of them (about 8 ms each), distinct files of the same kind.
BASE_PICTURES = 2000


def _generate(args: tuple[str, int, int]) -> None:
    sys.path.insert(0, str(BENCH))
    from embed import imagenet_like

    root, n, start = args
    imagenet_like(Path(root), n, start=start)


def _variants(args: tuple[str, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    root, base, lo, hi = args
    sources = sorted(p for p in Path(root).rglob("*.jpg") if not p.name.startswith("v"))[:base]
    rng = np.random.default_rng(lo)
    cache: dict[int, np.ndarray] = {}
    for i in range(lo, hi):
        j = i % base
        if j not in cache:
            cache[j] = np.asarray(Image.open(sources[j]).convert("RGB"))
        pixels = np.roll(cache[j], (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), axis=(0, 1))
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        folder = Path(root) / f"class{i % 10:02d}"
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"v{i:06d}.jpg",
                                                           quality=int(rng.integers(85, 96)))


def generate_jpegs(root: Path, n: int, workers: int) -> None:
    """``n`` ImageNet-like JPEGs of 500x375 under ``root`` (10 class folders), written by ``workers`` processes:
    ``BASE_PICTURES`` drawn, the rest variants of those."""
    if n <= 0:
        return
    base = min(n, BASE_PICTURES)
    per = -(-base // workers)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_generate, [(str(root), min(per, base - lo), lo) for lo in range(0, base, per)]))
        per = -(-(n - base) // workers) if n > base else 0
        if per:
            list(pool.map(_variants, [(str(root), base, lo, min(n, lo + per)) for lo in range(base, n, per)]))


def tiled_fashion_mnist(dst: Path, train: int, test: int) -> Path:
    """Fashion-MNIST IDX files of ``train`` and ``test`` pictures, the committed subset repeated (a figure of
    throughput, not of accuracy)."""
    import numpy as np

    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        raw = gzip.decompress((SUBSET / f"{split}-images-idx3-ubyte.gz").read_bytes())
        labels = gzip.decompress((SUBSET / f"{split}-labels-idx1-ubyte.gz").read_bytes())
        have = int.from_bytes(raw[4:8], "big")
        pixels = np.frombuffer(raw[16:], np.uint8).reshape(have, 784)
        picks = np.arange(n) % have
        header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (dst / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels[picks].tobytes(), 1))
        lab = np.frombuffer(labels[8:], np.uint8)[picks]
        (dst / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + lab.tobytes(), 1))
    return dst


def eval_step(root: Path, work: Path, cpu: bool, smoke: bool) -> list[str]:
    code = f"""
import json, time
from pathlib import Path
from spp_curate.train.loop import TrainConfig, train
from spp_curate.train.evaluate import evaluate
run = Path({str(work / 'eval-run')!r})
train(TrainConfig(out=str(run), method="simclr", source="fashion-mnist", root={str(root)!r}, limit={256 if smoke else 1024},
                  backbone={'"small-cnn"' if cpu else '"resnet18"'}, batch_size=256, epochs=1), force=True)
started = time.perf_counter()
result = evaluate(run, "fashion-mnist", {str(root)!r}, limit={800 if smoke else None})
seconds = time.perf_counter() - started
images = result["train_images"] + result["test_images"]
print(json.dumps({{"eval_img_s": round(images / seconds, 1), "images": images, "seconds": round(seconds, 2),
                  "knn_top1": result["knn_top1"], "linear_top1": result["linear_top1"]}}))
"""
    return [sys.executable, "-c", code]


def junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {"error": "no junit report"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if tag != "skipped":
                    state += ": " + (node.get("message") or "")[:200]
                else:
                    state += ": " + (node.get("message") or "")[:120]
        cases[case.get("name")] = state
    counts = {name: sum(1 for v in cases.values() if v.startswith(state))
              for name, state in (("passed", "passed"), ("failed", "failed"), ("errors", "error"),
                                  ("skipped", "skipped"))}
    return {**counts, "tests": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where device-check.json and the log go")
    parser.add_argument("--cpu", action="store_true", help="rehearse every step on the CPU at small sizes")
    parser.add_argument("--smoke", action="store_true", help="with --cpu: the smallest sizes (seconds a step)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the carried wheels [device-wheels/]")
    parser.add_argument("--cap-scale", type=float, default=1.0,
                        help="multiply every step's time cap (a loaded machine rehearsing) [1]")
    parser.add_argument("--only", help="comma-separated steps to run [all: " + ",".join(GPU_CAPS) + "]")
    args = parser.parse_args(argv)
    if args.smoke and not args.cpu:
        parser.error("--smoke is a size of the CPU rehearsal: give --cpu too")
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "device-check.log")
    report_path = args.out / "device-check.json"
    started = time.perf_counter()
    if not 0 < args.cap_scale <= 100:
        parser.error(f"--cap-scale: {args.cap_scale} is not a factor in (0, 100]")
    caps = {k: v * args.cap_scale for k, v in (CPU_CAPS if args.cpu else GPU_CAPS).items()}
    only = set(args.only.split(",")) if args.only else set(caps)
    unknown = only - set(caps)
    if unknown:
        parser.error(f"--only: unknown steps {', '.join(sorted(unknown))}; accepted: {', '.join(caps)}")
    report: dict = {"mode": "cpu-smoke" if args.smoke else "cpu" if args.cpu else "gpu",
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                    "cpu_cores": os.cpu_count()}

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        report_path.write_text(json.dumps(report, indent=1) + "\n")

    env, installed, probed = install(args.wheels, log)
    log(installed)
    report["install"] = installed
    report["versions"] = {k: v for k, v in probed.items() if k != "missing"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs on the CPU even where a GPU is
        env.pop("SPP_CURATE_CUDA_TESTS", None)
    gpu = report["versions"].get("cuda_available") and not args.cpu
    report["device"] = (f"{report['versions'].get('gpu')} (capability {report['versions'].get('capability')}), "
                        f"{os.cpu_count()} CPU cores") if gpu else f"cpu ({os.cpu_count()} cores)"
    if not args.cpu and not gpu:
        log("torch sees no CUDA device: the CUDA tests will fail as required; use --cpu to rehearse")
    save()
    work = Path(tempfile.mkdtemp(prefix="spp-device-check-"))
    py = sys.executable
    try:
        if "cuda_tests" in only:
            junit = args.out / "cuda-tests.xml"
            test_env = {**env, "SPP_CURATE_CUDA_TESTS": "cpu" if args.cpu else "required"}
            # On the CPU the kill-and-resume test is the suite's own (tests/test_stages.py), run there already.
            selection = (["-k", "barrier or beside"] if args.smoke else
                         ["-k", "not killed_on_the_device"] if args.cpu else [])
            step = run_step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                                           "tests/test_cuda.py", *selection],
                            caps["cuda_tests"], test_env, log)
            report["cuda_tests"] = {**junit_summary(junit), "seconds": step["seconds"],
                                    **({"error": step["error"]} if "error" in step else {})}
            save()

        if {"embed_b32", "embed_l14"} & only:
            n_b, n_l = (48, 0) if args.smoke else (400, 200) if args.cpu else (64_000, 12_000)
            t0 = time.perf_counter()
            workers = min(16, os.cpu_count() or 2)
            generate_jpegs(work / "jpeg-b", n_b, workers)
            generate_jpegs(work / "jpeg-l", n_l, workers)
            log(f"generated {n_b + n_l:,} ImageNet-like JPEGs in {time.perf_counter() - t0:.1f} s")
            settings = {
                "embed_b32": (work / "jpeg-b", ["--encoder", "openclip:ViT-B-32", "--batch-size", "1024"]),
                "embed_l14": (work / "jpeg-l", ["--encoder", "openclip:ViT-L-14", "--batch-size", "512"]),
            }
            if args.cpu:  # small models at small sizes: the rehearsal proves the path, not the figure
                settings = {"embed_b32": (work / "jpeg-b", ["--encoder", "openclip:ViT-S-32", "--image-size", "64",
                                                            "--batch-size", "32"]),
                            "embed_l14": (work / "jpeg-l", ["--encoder", "openclip:ViT-B-32", "--image-size", "64",
                                                            "--batch-size", "32"])}
            seconds = ["--model-seconds", "2" if args.smoke else "4" if args.cpu else "15"]
            for name, (root, opts) in settings.items():
                if name not in only or (args.smoke and name == "embed_l14"):  # the same path as embed_b32
                    continue
                step = run_step(name, [py, "bench/scale.py", "--full", "--root", str(root), *opts, *seconds,
                                       "--skip-previous-index", "--copy-threshold", "none"], caps[name], env, log)
                report[name] = step
                got = step.get("result", {})
                if name == "embed_b32" and got:
                    report.update(embed_img_s=got.get("embed_img_s"), model_only_img_s=got.get("model_only_img_s"),
                                  embed_over_model=got.get("embed_over_model"),
                                  feed_img_s_per_worker=got.get("feed_img_s_per_worker"))
                if name == "embed_l14" and got:
                    report.update(l14_embed_img_s=got.get("embed_img_s"), l14_model_only_img_s=got.get("model_only_img_s"),
                                  l14_embed_over_model=got.get("embed_over_model"))
                save()

        if "knn" in only:
            opts = ["--full"] if not args.cpu else ["--exact", "--n", "5000" if args.smoke else "20000", "--k", "32",
                                                    "--baseline-queries", "200"]
            step = run_step("knn", [py, "bench/mine.py", *opts], caps["knn"], env, log)
            report["knn"] = step
            report["knn_exact_s"] = step.get("result", {}).get("search_s")
            # the same blocked products alone, timed in the same run: how near the search is to its roofline
            report["knn_roofline"] = step.get("result", {}).get("roofline")
            save()

        if "trainer" in only:
            opts = ["--full"] if not args.cpu else ["--quick", "--steps", "1" if args.smoke else "2",
                                                         *(["--limit", "600"] if args.smoke else [])]
            step = run_step("trainer", [py, "bench/trainer.py", *opts], caps["trainer"], env, log)
            report["trainer"] = step
            got = step.get("result", {})
            report["trainer_pairs_s"] = got.get("both_trainer_pairs_s", got.get("trainer_img_s"))
            save()

        if "eval" in only:
            root = tiled_fashion_mnist(work / "fmnist", *((2000, 1000) if args.smoke else (5_000, 1_000) if args.cpu
                                                         else (60_000, 10_000)))
            step = run_step("eval", eval_step(root, work, args.cpu, args.smoke), caps["eval"], env, log)
            report["eval"] = step
            report["eval_img_s"] = step.get("result", {}).get("eval_img_s")
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    cuda = report.get("cuda_tests", {})
    if cuda.get("failed") or cuda.get("errors") or cuda.get("error") or not cuda.get("passed", 1):
        failed.append("cuda_tests")
    report["failed_steps"] = sorted(set(failed))
    save()
    log(f"wrote {report_path} in {report['wall_s']} s; failed steps: {', '.join(report['failed_steps']) or 'none'}")
    summary = {k: report.get(k) for k in ("device", "embed_img_s", "model_only_img_s", "embed_over_model",
                                          "knn_exact_s", "knn_roofline", "trainer_pairs_s", "eval_img_s", "failed_steps")}
    print(json.dumps(summary))
    return 1 if report["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
