"""Vector-tier measurements: SSCD separation and speed, Redis vector index throughput, latency, memory.

Run ``python -m imgdedup.bench.vector_bench {separation,speed,redis,vadd} --help``. The numbers in
the README's vector-tier tables came from the commands listed there. Inputs are seeded, so reruns differ
only by machine load; speeds are the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

CORPUS = Path(__file__).resolve().parents[3].parent / "shared" / "corpus" / "base"
#: Variant name -> how it was made; each is a near duplicate of its base (a true positive pair).
VARIANTS = ("jpeg50", "half", "crop80", "flip", "border10", "caption")
#: Similarity thresholds whose recall over all variants the separation table reports.
THRESHOLDS = (0.5, 0.6, 0.7, 0.75)


def make_variants(image: Image.Image, seed: int = 0) -> dict[str, Image.Image]:
    """The edits of `VARIANTS` applied to one RGB image: JPEG q50, half size, a random 80%-area crop,
    mirror, a black border of 10% of each side, and a caption band over the bottom sixth."""
    rng = random.Random(seed)
    w, h = image.size
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=50)
    side = 0.8 ** 0.5
    cw, ch = round(w * side), round(h * side)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    pad = (round(w * 0.1), round(h * 0.1))
    return {
        "jpeg50": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "half": image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS),
        "crop80": image.crop((x0, y0, x0 + cw, y0 + ch)),
        "flip": ImageOps.mirror(image),
        "border10": ImageOps.expand(image, border=pad + pad, fill=(0, 0, 0)),
        "caption": _caption(image, "Breaking: look at this amazing picture!"),
    }


def _caption(image: Image.Image, text: str) -> Image.Image:
    """A meme-style caption: white text on a dark band over the bottom sixth of the image."""
    out = image.copy()
    w, h = out.size
    band = max(12, h // 6)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, h - band, w, h), fill=(20, 20, 20))
    font = ImageFont.load_default(size=max(8, band // 2))
    draw.text((w // 20, h - band + band // 4), text, fill=(255, 255, 255), font=font)
    return out


def load_corpus(corpus: Path = CORPUS) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(corpus.glob("*.jpg"))]


# --- SSCD separation ---------------------------------------------------------------------------------------


def separation(embedder, bases: list[Image.Image]) -> dict:
    """Cosine between every pair of distinct bases and between each base and each of its variants."""
    base_vectors = embedder.embed(bases)
    sims = base_vectors @ base_vectors.T
    distinct = sims[np.triu_indices(len(bases), 1)]
    edits = [make_variants(image, seed=i) for i, image in enumerate(bases)]
    variants = {}
    for name in VARIANTS:
        vectors = embedder.embed([edit[name] for edit in edits])
        own = (vectors * base_vectors).sum(axis=1)
        rank1 = float(((vectors @ base_vectors.T).argmax(axis=1) == np.arange(len(bases))).mean())
        variants[name] = {"min": own.min(), "p5": np.quantile(own, 0.05), "median": np.median(own), "rank1": rank1}
        variants[name]["all"] = own
    positives = np.concatenate([v.pop("all") for v in variants.values()])
    recall = {t: float((positives > t).mean()) for t in (distinct.max(), *THRESHOLDS)}
    return {"distinct": {"max": distinct.max(), "p99": np.quantile(distinct, 0.99), "mean": distinct.mean()},
            "variants": variants, "recall": recall}


def _separation_main(args) -> None:
    from imgdedup.embedders.sscd import SSCDEmbedder

    bases = load_corpus()
    print(f"{len(bases)} bases, {len(bases) * (len(bases) - 1) // 2} distinct pairs, {len(bases)} pairs per variant")
    for size in args.sizes:
        for policy in args.policies:
            result = separation(SSCDEmbedder(args.model, size, args.threads, policy), bases)
            d, r = result["distinct"], result["recall"]
            print(f"\n{args.model} size={size} policy={policy}: distinct max={d['max']:.3f} p99={d['p99']:.3f} "
                  f"mean={d['mean']:.3f}; recall of variants at >max distinct: {r[d['max']]:.3f}, "
                  + ", ".join(f">{t}: {r[t]:.3f}" for t in THRESHOLDS))
            print("  variant   min    p5     median  own-base-first")
            for name, v in result["variants"].items():
                print(f"  {name:9s} {v['min']:.3f}  {v['p5']:.3f}  {v['median']:.3f}   {v['rank1']:.2f}")


# --- SSCD speed --------------------------------------------------------------------------------------------


def _best_rate(run, n_images: int, repeat: int) -> float:
    run()  # warm-up: onnxruntime allocates its buffers for a new shape on the first call
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def _speed_row(embedder, bases: list[Image.Image], batch: int, repeat: int) -> tuple[float, float]:
    """(img/s of the model alone on prepared pixels, img/s of embed() from decoded images incl. resizing)."""
    pixels = embedder.prepare(bases)
    chunks = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
    groups = [bases[i:i + batch] for i in range(0, len(bases), batch)]
    model_only = _best_rate(lambda: [embedder.run(c) for c in chunks], len(bases), repeat)
    full = _best_rate(lambda: [embedder.embed(g) for g in groups], len(bases), repeat)
    return model_only, full


def _speed_main(args) -> None:
    from imgdedup.embedders.sscd import SSCDEmbedder

    bases = load_corpus()
    print(f"{args.model}, {args.threads} threads; img/s, best of {args.repeat}")
    print("size  batch  model-only  with-resize (from the decoded corpus JPEGs, mostly 1024x768)")
    for size in args.sizes:
        embedder = SSCDEmbedder(args.model, size, args.threads)
        for batch in args.batches:
            model_only, full = _speed_row(embedder, bases, batch, args.repeat)
            print(f"{size:4d}  {batch:5d}  {model_only:10.0f}  {full:11.0f}")


# --- Redis vector indexes ----------------------------------------------------------------------------------


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _memory(client) -> int:
    """Redis' ``used_memory`` less the Lua engine's heap (which it includes): a script's garbage waits
    there for Lua's collector, and would show up in, or hide, a component's bytes per image."""
    info = client.info("memory")
    return int(info["used_memory"]) - int(info.get("used_memory_vm_eval", info.get("used_memory_lua", 0)))


def _fill(index, ns: str, count: int, dim: int, batch: int, seed: int) -> tuple[float, np.ndarray]:
    """Add `count` random unit vectors; (vectors/s, a sample of 1000 of them to query with)."""
    rng = np.random.default_rng(seed)
    sample = None
    start = time.perf_counter()
    for first in range(0, count, batch):
        vectors = _unit(rng, min(batch, count - first), dim)
        index.add(ns, "bench", [(f"img-{first + i}", v) for i, v in enumerate(vectors)])
        if sample is None:
            sample = vectors[:1000]
    return count / (time.perf_counter() - start), sample


def _latencies(index, ns: str, queries: np.ndarray, per_call: int, k: int) -> tuple[np.ndarray, list]:
    """Seconds per query call of `per_call` vectors, and the answers."""
    times, answers = [], []
    for first in range(0, len(queries), per_call):
        start = time.perf_counter()
        answers += index.query(ns, "bench", queries[first:first + per_call], k)
        times.append(time.perf_counter() - start)
    return np.array(times), answers


def bench_backend(client, index, label: str, args) -> None:
    ns = f"bench-{label}"
    before = _memory(client)
    rate, sample = _fill(index, ns, args.count, args.dim, args.batch, args.seed)
    per_vector = (_memory(client) - before) / args.count
    noisy = sample + 0.03 * np.random.default_rng(1).standard_normal(sample.shape, dtype=np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    one, answers = _latencies(index, ns, noisy[:args.queries], 1, args.k)
    many, _ = _latencies(index, ns, noisy[:args.queries], 16, args.k)
    recall = np.mean([hits[0][0] == f"img-{i}" for i, hits in enumerate(answers)])
    print(f"{label:22s} {args.count:8d} {rate:8.0f}/s {per_vector:8.0f} B  "
          f"{np.median(one) * 1e3:6.2f} {np.quantile(one, 0.99) * 1e3:6.2f} ms  "
          f"{np.median(many) * 1e3:6.2f} {np.quantile(many, 0.99) * 1e3:6.2f} ms  "
          f"{16 / np.median(many):6.0f} q/s  {recall:.3f}", flush=True)
    client.flushall()


def _redis_main(args) -> None:
    import redis

    from imgdedup import devstack
    from imgdedup.keys import Keys
    from imgdedup.vectorindex.redisearch import RediSearchIndex
    from imgdedup.vectorindex.vectorsets import VectorSetIndex

    with tempfile.TemporaryDirectory() as workdir:
        server = devstack.start_redis(devstack.free_port(), Path(workdir), persist=False,
                                      modules=(devstack.redisearch_module(),))
        try:
            client = redis.Redis.from_url(server.address)
            keys = Keys("bench")
            print(f"{args.count} random unit {args.dim}-d vectors per namespace, adds in pipelines of {args.batch}, "
                  f"{args.queries} queries (k={args.k}) near stored vectors; one client")
            print("backend                   vectors     add    mem/vec   1 query p50 p99   16 queries p50 p99"
                  "   throughput recall@1")
            for backend in args.backends:
                if backend == "redisearch":
                    index = RediSearchIndex(client, keys)
                else:
                    quant, shards = backend.split(":") if ":" in backend else (backend, args.shards)
                    index = VectorSetIndex(client, keys, int(shards), creation_flags=(quant, "M", 16))
                bench_backend(client, index, backend if backend == "redisearch" else f"vset {backend}", args)
        finally:
            server.stop()


def _vadd_rate(address: str, vectors: np.ndarray, connections: int, options: tuple, batch: int) -> float:
    """VADDs/s into one fresh vector set, ``connections`` clients each adding its share in pipelines.
    The first tenth is added by one client, untimed, so every run starts from the same graph size."""
    import redis

    def add(lo: int, hi: int) -> None:
        client = redis.Redis.from_url(address)
        for first in range(lo, hi, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(first + batch, hi)):
                pipe.execute_command("VADD", "vadd-bench", "FP32", vectors[i].tobytes(), f"img-{i}", *options,
                                     "Q8", "M", 16)
            pipe.execute()

    warm = len(vectors) // 10
    add(0, warm)
    bounds = np.linspace(warm, len(vectors), connections + 1).astype(int)
    threads = [threading.Thread(target=add, args=(int(a), int(b))) for a, b in pairwise(bounds)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = (len(vectors) - warm) / (time.perf_counter() - start)
    redis.Redis.from_url(address).delete("vadd-bench")
    return rate


def _vadd_main(args) -> None:
    """VADD throughput with CAS over several connections against one connection, in the same run."""
    from imgdedup import devstack

    vectors = _unit(np.random.default_rng(args.seed), args.count, args.dim)
    with tempfile.TemporaryDirectory() as workdir:
        server = devstack.start_redis(devstack.free_port(), Path(workdir), persist=False, modules=())
        try:
            base = _vadd_rate(server.address, vectors, 1, (), args.batch)
            print(f"{args.count:,} random unit {args.dim}-d vectors (Q8, M 16), the last 90% timed")
            print(f"1 connection, no CAS (baseline)   {base:7.0f} VADD/s")
            for n in args.connections:
                for options in ((), ("CAS",)):
                    rate = _vadd_rate(server.address, vectors, n, options, args.batch)
                    label = f"{n} connections, {'CAS' if options else 'no CAS'}"
                    print(f"{label:33s} {rate:7.0f} VADD/s  {rate / base:.2f}x", flush=True)
        finally:
            server.stop()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sep = sub.add_parser("separation", help="SSCD cosine of distinct bases vs their variants, per size and policy")
    speed = sub.add_parser("speed", help="SSCD img/s per input size and batch size")
    for p in (sep, speed):
        p.add_argument("--model", default="sscd_distilled", choices=("sscd_distilled", "sscd"))
        p.add_argument("--sizes", type=_ints, default=[160, 224, 288])
        p.add_argument("--threads", type=int, default=2)
    sep.add_argument("--policies", type=lambda s: s.split(","), default=["crop", "squash", "pad"])
    speed.add_argument("--batches", type=_ints, default=[1, 16])
    speed.add_argument("--repeat", type=int, default=5)
    red = sub.add_parser("redis", help="VADD/VSIM and RediSearch throughput, latency and memory on a local Redis")
    red.add_argument("--count", type=int, default=100_000)
    red.add_argument("--dim", type=int, default=512)
    red.add_argument("--batch", type=int, default=500, help="vectors per add pipeline")
    red.add_argument("--queries", type=int, default=1000)
    red.add_argument("--k", type=int, default=10)
    red.add_argument("--shards", type=int, default=4)
    red.add_argument("--seed", type=int, default=0)
    red.add_argument("--backends", type=lambda s: s.split(","), default=["Q8", "NOQUANT", "Q8:1", "redisearch"],
                     help="vector-set quantisation[:shards] entries and/or 'redisearch'")
    vadd = sub.add_parser("vadd", help="VADD/s with CAS over several connections against one connection")
    vadd.add_argument("--count", type=int, default=25_000)
    vadd.add_argument("--dim", type=int, default=512)
    vadd.add_argument("--batch", type=int, default=64, help="vectors per add pipeline")
    vadd.add_argument("--connections", type=_ints, default=[1, 3])
    vadd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"separation": _separation_main, "speed": _speed_main, "redis": _redis_main, "vadd": _vadd_main}[args.command](args)


if __name__ == "__main__":
    main()
