"""`imgdedup bench` (and `make bench`): every speed claim of the project as a ratio against a baseline
measured in the same run, on the same files, on this machine.

Sections (``--only``): hash (worker with SSCD off vs the decode floor and an imagededup-style loop),
sscd (worker with SSCD on vs the raw decode + model loop), mih (pHash radius queries vs a NumPy scan),
vsim and memory (Vector Set queries vs exact NumPy top-k; Redis bytes per image by component).
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import click

from imgdedup import devstack, roundtrip
from imgdedup.bench import report
from imgdedup.bench.report import Row, cost_row, latency_row, rate_row

SECTIONS = ("hash", "sscd", "mih", "vsim", "memory")
P99_TARGET_MS = 50.0
MIH_P99_TARGET_MS = 1.0
MEMORY_TARGET_B = 1536


@dataclass
class Sizes:
    images: int  # distinct image files (bases first, then variants)
    events: int  # events of the saturation run (the images again and again, each pass in a new namespace)
    paced_s: float  # seconds of paced load for the latency figures
    paced_rate: float | None  # offered events/s of the paced load (None: half the saturated rate)
    hashes: int  # pHashes stored for the MIH queries
    vectors: list[int]  # VSIM sizes; the first also sizes the memory figures
    queries: int  # single queries per latency figure (MIH adds queries // 20 batches of 64)
    records: int  # images indexed through IndexStore.index for the record memory figure
    repeat: int  # runs of each baseline loop, best kept


QUICK = Sizes(
    images=312,
    events=1000,
    paced_s=5,
    paced_rate=None,
    hashes=100_000,
    vectors=[10_000],
    queries=200,
    records=1000,
    repeat=1,
)
FULL = Sizes(
    images=2418,
    events=5000,
    paced_s=20,
    paced_rate=None,
    hashes=1_000_000,
    vectors=[100_000, 1_000_000],
    queries=1000,
    records=5000,
    repeat=3,
)


def _sizes(quick: bool, **given) -> Sizes:
    base = QUICK if quick else FULL
    return Sizes(**{k: (v if given.get(k) is None else given[k]) for k, v in vars(base).items()})


def _echo(text: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')} load {report.load()}] {text}", err=True)


# --- sections ----------------------------------------------------------------------------------------


def bench_stream(
    stack, settings, files: list[Path], roots: list[Path], sizes: Sizes, out: Path, inline: bool, sscd: bool
) -> dict:
    """One worker process through Kafka (saturated, then paced at half that rate) plus its baselines."""
    from imgdedup.bench import baselines, kafka_floor, stream

    phase = "sscd" if sscd else "hash"
    s = stream.stream_settings(settings, roots, sscd)
    _echo(
        f"{phase}: one worker on {sizes.events} events over {len(files)} images (saturation), "
        f"then {sizes.paced_s:g}s paced at "
        + (f"{sizes.paced_rate:g} ev/s" if sizes.paced_rate else "half that rate")
    )
    probe = [p.read_bytes() for p in files[: baselines.PROBE_FILES]]
    probe_before = baselines.speed_probe(probe, s)
    result = stream.run_stream(
        s,
        files,
        events=sizes.events,
        log_path=out / f"worker-{phase}.log",
        paced_seconds=sizes.paced_s,
        inline=inline,
        server_pids=stack.pids,
        rate=sizes.paced_rate,
    )
    result["speed_probe"] = {"before": probe_before, "after": baselines.speed_probe(probe, s), "files": len(probe)}
    warning = baselines.probe_warning(probe_before, result["speed_probe"]["after"])
    if warning:
        _echo(f"{phase}: WARNING {warning}")
    stack.clean(stack.client(), s.key_prefix)
    rate = result["paced"]["target_rate"]
    _echo(f"{phase}: the Kafka path alone at {rate:.0f} ev/s for {sizes.paced_s:g}s (no worker)")
    result["kafka_floor"] = kafka_floor.run_kafka_floor(s, rate, sizes.paced_s)
    blobs = [p.read_bytes() for p in files]
    _echo(f"{phase}: baseline loops on the same {len(blobs)} files (best of {sizes.repeat})")
    if sscd:
        from imgdedup.embedders.registry import build_embedders

        embedder = next(e for e in build_embedders(s) if e.name == "sscd")
        result["baseline"] = baselines.sscd_baseline(blobs, s, embedder, sizes.repeat)
    else:
        result["baselines"] = baselines.hash_baselines(blobs, s, sizes.repeat)
    return result


def _paced_label(r: dict) -> str:
    lat = r["paced"]
    half = abs(lat["target_rate"] - r["saturation"]["events_per_s"] / 2) < 1e-6
    return f"at {lat['target_rate']:.0f} ev/s" + (" (half of max)" if half else " (fixed)")


def _server_rows(section: str, sat: dict) -> list[Row]:
    """CPU per event in the saturation window: the worker's threads by kind, then the bench's own Redis
    and Tansu (not on --external)."""
    names = {
        "worker main": "worker main thread",
        "worker pools": "worker decode/fetch threads",
        "worker librdkafka": "worker librdkafka threads",
        "worker processes": "worker decoder processes",
        "redis": "Redis",
        "kafka": "Tansu broker",
    }
    return [
        Row(
            section,
            f"{names[name]} CPU per event (saturated)",
            sat["cpu_s"][name] / sat["window_events"] * 1000,
            "ms",
        )
        for name in names
        if name in sat["cpu_s"] and (name != "worker processes" or sat["cpu_s"][name] > 0)  # 0: threads only
    ]


def _probe_row(section: str, r: dict) -> Row:
    """How much the machine's speed changed across the worker run (see baselines.speed_probe)."""
    probe = r["speed_probe"]
    return rate_row(section, f"machine speed after the worker run: decode floor on {probe['files']} files",
                    probe["after"], "img/CPU-s", "the same just before the worker run", probe["before"])


def _gc_rows(section: str, r: dict, at: str) -> list[Row]:
    """Full garbage collections in the worker: each holds the GIL while it walks the heap, stalling
    every event in flight (the worker freezes its start-up heap to keep them short)."""
    return [
        Row(section, "worker full GC passes, start-up + saturated run", r["saturation"]["worker_full_gc"], ""),
        Row(section, f"worker full GC passes during the paced run {at}", r["paced"]["worker_full_gc"], ""),
    ]


def _inside_rows(section: str, r: dict, at: str) -> list[Row]:
    """Where the paced run's time goes inside the worker, from its own histograms (means over the run):
    processing runs from taking an event off Kafka to its verdict's acknowledgement; fetch, decode and
    hash are per event (in parallel), the index and produce stages per batch."""
    means = r["paced"]["worker_means"]
    rows = [Row(section, f"worker events per batch, mean, paced {at}", means["batch_size"], "")]
    cpu = r["paced"].get("worker_cpu_ms_per_event", {})
    for kind, name in (("main", "main thread"), ("processes", "decoder processes")):
        if cpu.get(kind):  # processes: 0 when the worker decodes on threads
            rows.append(Row(section, f"worker {name} CPU per event, paced", cpu[kind], "ms"))
    for name, value in means.items():
        if name != "batch_size" and value is not None:
            what = name.removesuffix("_s").replace("_", " ")
            rows.append(Row(section, f"worker {what} ms, mean, paced", value * 1000, "ms"))
    return rows


def _latency_rows(section: str, r: dict, at: str, p99_target_ms: float | None = None) -> list[Row]:
    """p50 and p99 of the paced run, each against the Kafka path alone at the same rate (kafka_floor.py):
    the share of the latency that the broker hops and clients take before any work of the worker."""
    lat, floor = r["paced"]["latency_ms"], r["kafka_floor"]["latency_ms"]
    base = "Kafka path alone, same rate"
    return [
        latency_row(section, f"event->verdict p50 {at}", lat["p50"], base, floor["p50"]),
        latency_row(section, f"event->verdict p99 {at}", lat["p99"], base, floor["p99"], max_ms=p99_target_ms),
    ]


def _drift_rows(section: str, r: dict) -> list[Row]:
    """The paced run's last quarter against its first: on the Tansu broker the same rate costs more as
    the topics fill (stream.fresh_topics), so a p99 that grows with the broker's CPU is the broker's."""
    q = r["paced"]["quarters"]
    first = "the same, first quarter"
    rows = [latency_row(section, "event->verdict p99, last quarter of the paced run", q["p99_ms"][-1], first,
                        q["p99_ms"][0])]
    if "kafka_cores" in q:  # not with --external: the broker is not a process of this machine's
        rows.append(rate_row(section, "Kafka broker CPU cores, last quarter of the paced run", q["kafka_cores"][-1],
                             "cores", first, q["kafka_cores"][0]))
    return rows


def hash_rows(r: dict) -> list[Row]:
    sat, base = r["saturation"], r["baselines"]
    at = _paced_label(r)
    return [
        rate_row(
            "hash",
            "worker events/s, saturated, 1 worker",
            sat["events_per_s"],
            "ev/s",
            "imagededup-style loop, 1 thread",
            base["imagededup"]["per_s"],
            3.0,
        ),
        rate_row(
            "hash",
            "worker events per CPU-second",
            sat["events_per_worker_cpu_s"],
            "ev/CPU-s",
            "decode floor per CPU-second",
            base["floor"]["per_cpu_s"],
            0.9,
        ),
        rate_row(
            "hash",
            "worker events/s, saturated, 1 worker",
            sat["events_per_s"],
            "ev/s",
            "decode floor, 1 thread",
            base["floor"]["per_s"],
        ),
        rate_row(
            "hash",
            "worker events per CPU-second",
            sat["events_per_worker_cpu_s"],
            "ev/CPU-s",
            "imagededup-style loop per CPU-second",
            base["imagededup"]["per_cpu_s"],
        ),
        rate_row(
            "hash",
            "worker events per CPU-second",
            sat["events_per_worker_cpu_s"],
            "ev/CPU-s",
            f"decode floor per CPU-second, {base['floor_both_cores']['copies']} copies at once",
            base["floor_both_cores"]["per_cpu_s"],
        ),
        Row("hash", "worker CPU cores used (saturated)", sat["worker_cores"], "cores"),
        *_server_rows("hash", sat),
        *_latency_rows("hash", r, at, P99_TARGET_MS),
        *_drift_rows("hash", r),
        *_gc_rows("hash", r, at),
        *_inside_rows("hash", r, at),
        _probe_row("hash", r),
    ]


def sscd_rows(r: dict) -> list[Row]:
    sat, base = r["saturation"], r["baseline"]
    at = _paced_label(r)
    absolute = sat["events_per_s"]
    return [
        rate_row(
            "sscd",
            "worker events/s, saturated, 1 worker",
            absolute,
            "ev/s",
            f"decode + SSCD loop ({base['threads']} model threads)",
            base["per_s"],
            0.7,
        ),
        Row(
            "sscd",
            "worker events/s, saturated (absolute)",
            absolute,
            "ev/s",
            target=">= 150 ev/s",
            met=absolute >= 150,
        ),
        Row("sscd", "worker CPU cores used (saturated)", sat["worker_cores"], "cores"),
        *_server_rows("sscd", sat),
        *_latency_rows("sscd", r, at),
        *_drift_rows("sscd", r),
        *_gc_rows("sscd", r, at),
        *_inside_rows("sscd", r, at),
        _probe_row("sscd", r),
    ]


def bench_mih(stack, settings, sizes: Sizes, seed: int) -> dict:
    from imgdedup.bench.mih_bench import run_mih

    prefix = f"benchmih{uuid.uuid4().hex[:6]}"
    _echo(
        f"mih: {sizes.hashes:,} hashes through PHashIndex.add, then queries at radius {settings.phash_radius}"
    )
    client = stack.client()
    packing = roundtrip.standalone_client(settings.redis_url.get_secret_value())
    try:
        return run_mih(
            client,
            prefix,
            settings.mih_tables,
            settings.mih_bucket_cap_bytes,
            settings.phash_radius,
            sizes.hashes,
            sizes.queries,
            max(1, sizes.queries // 20),
            seed=seed,
            packing_client=packing,
        )
    finally:
        packing.close()
        stack.clean(client, prefix)


def mih_rows(r: dict) -> list[Row]:
    n = f"@{r['hashes']:,}, r={r['radius']}"
    brute = "NumPy bitwise_count scan"
    b = r["batch_size"]
    return [
        Row("mih", f"pHash tables, Redis memory per stored hash {n}", r["table_bytes_per_hash"], "B"),
        latency_row(
            "mih", f"query p50, 1 per round trip {n}", r["mih_1_ms"]["p50"], brute, r["brute_1_ms"]["p50"]
        ),
        latency_row(
            "mih",
            f"query p99, 1 per round trip {n}",
            r["mih_1_ms"]["p99"],
            brute,
            r["brute_1_ms"]["p99"],
            max_ms=MIH_P99_TARGET_MS,
        ),
        Row("mih", f"Redis server time per query (commandstats) {n}", r["server_us_per_query"], "us"),
        latency_row(
            "mih",
            f"round trip p50, {b} queries {n}",
            r["mih_batch_ms"]["p50"],
            f"{brute} x {b}",
            r["brute_batch_ms"]["p50"],
        ),
        latency_row(
            "mih",
            f"round trip p99, {b} queries {n}",
            r["mih_batch_ms"]["p99"],
            f"{brute} x {b}",
            r["brute_batch_ms"]["p99"],
        ),
        cost_row(
            "mih",
            f"client CPU per query, {b} per pipeline as the worker sends them {n}",
            r["pipelined_cpu_us"]["packed"],
            "us",
            "the same, MGETs packed by redis-py",
            r["pipelined_cpu_us"]["redis-py"],
        ),
        Row(
            "mih",
            f"queries whose answer differs from brute force (of {r['checked_queries']})",
            r["mismatched_queries"],
            "",
            target="= 0 (exact recall)",
            met=r["mismatched_queries"] == 0,
        ),
    ]


def bench_index(stack, settings, sizes: Sizes, budget_s: float, seed: int, grow: bool) -> dict:
    from imgdedup.bench.index_bench import run_index

    prefix = f"benchidx{uuid.uuid4().hex[:6]}"
    s = settings.model_copy(update={"key_prefix": prefix})
    wanted = sizes.vectors if grow else sizes.vectors[:1]
    _echo(
        f"vsim/memory: {wanted[0]:,} images (pHash tables, {s.vector_backend} vectors, records)"
        + (f"; up to {wanted[-1]:,} vectors if the fill fits {budget_s:g}s" if len(wanted) > 1 else "")
    )
    client = stack.client()
    url = settings.redis_url.get_secret_value()
    record_clients = {"worker": roundtrip.standalone_client(url),
                      "redis-py": roundtrip.standalone_client(url, fast_packing=False)}
    try:
        return run_index(client, s, wanted, sizes.queries, sizes.records, budget_s, seed=seed,
                         record_clients=record_clients)
    finally:
        for c in record_clients.values():
            c.close()
        stack.clean(client, prefix)


def vsim_rows(r: dict) -> list[Row]:
    rows = []
    for v in r["vsim"]:
        n = f"@{v['vectors']:,}, k={v['k']}, {r['shards']} shards"
        brute = "NumPy exact top-k"
        rows += [
            latency_row(
                "vsim",
                f"p50, 1 query per round trip {n}",
                v["vsim_1_ms"]["p50"],
                brute,
                v["brute_1_ms"]["p50"],
            ),
            latency_row(
                "vsim",
                f"p99, 1 query per round trip {n}",
                v["vsim_1_ms"]["p99"],
                brute,
                v["brute_1_ms"]["p99"],
            ),
            latency_row("vsim", f"round trip p50, {v['batch']} queries {n}", v["vsim_batch_ms"]["p50"]),
            latency_row("vsim", f"round trip p99, {v['batch']} queries {n}", v["vsim_batch_ms"]["p99"]),
            Row("vsim", f"recall@1 vs exact top-k {n}", v["recall_at_1"], ""),
        ]
    for s in r["vsim_skipped"]:
        rows.append(
            Row(
                "vsim",
                f"@{s['vectors']:,}: skipped, fill projected at {s['projected_fill_s']:.0f}s "
                f"(> --vsim-budget {s['budget_s']:g}s)",
                None,
                "",
            )
        )
    return rows


def memory_rows(r: dict) -> list[Row]:
    m = r["memory"]
    n = f"@{m['images']:,} images"
    return [
        Row("memory", f"pHash tables per image {n}", m["phash_tables_b"], "B"),
        Row("memory", f"SSCD vector per image ({r['backend']}) {n}", m["sscd_vector_b"], "B"),
        Row(
            "memory",
            f"record + SHA-256 set + commit order per image (sample of {m['record_sample']:,})",
            m["record_b"],
            "B",
        ),
        cost_row(
            "memory",
            "client CPU per image, IndexStore.index of the record sample, the worker's command packer",
            m["index_cpu_us_per_image"]["worker"],
            "us",
            "the same, commands packed by redis-py",
            m["index_cpu_us_per_image"]["redis-py"],
        ),
        Row(
            "memory",
            f"total Redis memory per image {n}",
            m["total_b"],
            "B",
            target=f"<= {MEMORY_TARGET_B} B",
            met=m["total_b"] <= MEMORY_TARGET_B,
        ),
    ]


# --- the command -------------------------------------------------------------------------------------


def _parse_only(value: str) -> list[str]:
    picked = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in picked if s not in SECTIONS]
    if unknown:
        raise click.BadParameter(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return picked


def _ints(value: str | None) -> list[int] | None:
    return [int(x) for x in value.split(",")] if value else None


@click.command("bench")
@click.option(
    "--quick", is_flag=True, help="Small sizes (100k hashes, 10k vectors, 312 events): under 2 minutes."
)
@click.option(
    "--only", default=",".join(SECTIONS), show_default=True, help="Comma-separated sections to run."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Where bench.json, bench.md, worker logs and the variant cache go.",
)
@click.option(
    "--images", type=int, help="Distinct image files: corpus plus variants (default 2418; quick 312)."
)
@click.option("--events", type=int, help="Events of each saturation run (default 5000; quick 1000).")
@click.option(
    "--paced-seconds", type=float, help="Seconds of paced load for the latency figures (default 20)."
)
@click.option(
    "--paced-rate",
    type=float,
    help="Offered events/s for the latency figures (default: half the saturated rate measured just before).",
)
@click.option(
    "--hashes", type=int, help="pHashes stored for the MIH queries (default 1,000,000; quick 100,000)."
)
@click.option(
    "--vectors",
    help="VSIM sizes, comma-separated; the first also sizes the memory figures "
    "(default 100000,1000000; quick 10000).",
)
@click.option(
    "--vsim-budget",
    type=float,
    default=240.0,
    show_default=True,
    help="Seconds the fill to a further VSIM size may take (projected from the measured VADD rate).",
)
@click.option("--queries", type=int, help="Queries per latency figure (default 1000; quick 200).")
@click.option(
    "--records", type=int, help="Images indexed through IndexStore.index for the record memory figure."
)
@click.option("--repeat", type=int, help="Runs of each baseline loop, best kept (default 3; quick 1).")
@click.option("--inline", is_flag=True, help="Events carry the image bytes (base64) instead of file:// URIs.")
@click.option(
    "--external",
    is_flag=True,
    help="Use the configured Kafka and Redis instead of starting a "
    "throw-away Tansu + Redis (only the bench's own keys are touched).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def bench_command(
    ctx,
    quick,
    only,
    out_dir,
    images,
    events,
    paced_seconds,
    paced_rate,
    hashes,
    vectors,
    vsim_budget,
    queries,
    records,
    repeat,
    inline,
    external,
    seed,
):
    """Throughput, latency and memory of the worker and its indexes, each against a same-run baseline."""
    from imgdedup.bench.data import bench_files, corpus_dir
    from imgdedup.bench.stack import bench_stack
    from imgdedup.cli import settings_from

    devstack.stop_servers_on_sigterm()
    settings = settings_from(ctx)
    sections = _parse_only(only)
    sizes = _sizes(
        quick,
        images=images,
        events=events,
        paced_s=paced_seconds,
        paced_rate=paced_rate,
        hashes=hashes,
        vectors=_ints(vectors),
        queries=queries,
        records=records,
        repeat=repeat,
    )
    meta = {
        "machine": report.machine(),
        "load_before": report.load(),
        "command": " ".join(["imgdedup", *sys.argv[1:]]),
        "sections": sections,
        "sizes": vars(sizes),
        "quick": quick,
        "inline": inline,
        "external": external,
        "loads": {},
    }
    rows, details = [], {}
    with bench_stack(settings, external) as stack:
        if {"hash", "sscd"} & set(sections):
            bases = sorted(corpus_dir().glob("*.jpg"))
            if not bases:
                raise click.ClickException(f"no *.jpg in the shared corpus at {corpus_dir()}")
            cache = out_dir / "bench-variants"
            _echo(f"preparing {sizes.images} distinct images (variants cached in {cache})")
            files = bench_files(bases, sizes.images, cache, seed)
            roots = [corpus_dir(), cache]
        for section in sections:
            if section == "hash":
                details["hash"] = bench_stream(
                    stack, stack.settings, files, roots, sizes, out_dir, inline, False
                )
                rows += hash_rows(details["hash"])
            elif section == "sscd":
                details["sscd"] = bench_stream(
                    stack, stack.settings, files, roots, sizes, out_dir, inline, True
                )
                rows += sscd_rows(details["sscd"])
            elif section == "mih":
                details["mih"] = bench_mih(stack, stack.settings, sizes, seed)
                rows += mih_rows(details["mih"])
            elif section in ("vsim", "memory") and "index" not in details:
                details["index"] = bench_index(
                    stack, stack.settings, sizes, vsim_budget, seed, "vsim" in sections
                )
                rows += vsim_rows(details["index"]) if "vsim" in sections else []
                rows += memory_rows(details["index"]) if "memory" in sections else []
            meta["loads"][section] = report.load()
    meta["load_after"] = report.load()
    json_path, md_path = report.write(out_dir, rows, details, meta)
    click.echo(report.text_table(rows))
    click.echo(
        f"\nload average before {meta['load_before']}, after {meta['load_after']} "
        f"(1/5/15 min; {meta['machine']['cores']} cores); wrote {json_path} and {md_path}"
    )
