"""Dataset loading at full size: this project's checked loading against plain detectron2's, each in a fresh process.

Both sides load a builtin dataset (``coco_2017_train``, ``lvis_v1_train``, ...) from the same files under
``$DETECTRON2_DATASETS`` the way training does: plain detectron2 calls
``get_detection_dataset_dicts(names, filter_empty=True)`` on its own registration (``load_coco_json`` /
``load_lvis_json``); ours first runs ``register_datasets_from_cfg(cfg)`` (which installs the checks), then the same
call. Each side reports wall time of the call, peak RSS of its process (``ru_maxrss``) and RSS after the imports,
the records returned and a digest of their content, so that the two sides can be compared record for record.

``--ranks N`` measures the training set's memory across N processes of one machine (detectron2's ``launch``, GLOO on
CPU), built as each trainer builds it: plain detectron2 (every rank loads and serializes its own copy,
``DatasetFromList``) against ours (local rank 0 loads it and the others map its copy,
``get_detection_dataset_shared``). Every rank then reads every record once (touching every page, as an epoch does,
and giving a digest), and reports its resident memory (RSS, and PSS, which divides a shared page among the processes
that map it) over its own baseline after the imports, while all ranks still live.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("plain", "ours")

__all__ = ["IMPLS", "format_data_report", "format_ranks_report", "measure_in_subprocess", "measure_ranks",
           "record_digest", "run_data_benchmark"]


def _canonical(value: Any) -> Any:
    """A key-order independent form of a record's value (dicts as sorted items)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        return [_canonical(v) for v in value]
    return value


def record_digest(records: Iterable[dict]) -> str:
    """sha256 of the records' content in order (dict key order ignored)."""
    h = hashlib.sha256()
    for record in records:
        h.update(repr(_canonical(record)).encode())
    return h.hexdigest()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _smaps_rollup() -> Dict[str, int]:
    """Rss, Pss and the other totals of /proc/self/smaps_rollup, in bytes."""
    values = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return values


def _config(name: str, opts: Sequence[str]):
    sys.path.insert(0, ROOT)
    import diffusioninst  # noqa: F401  (compat shims; registers nothing on the builtin datasets)
    from diffusioninst import get_diffusioninst_cfg

    num_classes = 1203 if name.startswith("lvis") else 80
    return get_diffusioninst_cfg(None, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
                                        "MODEL.DiffusionInst.NUM_CLASSES", str(num_classes), "MODEL.DEVICE", "cpu",
                                        *opts])


def _worker(impl: str, name: str, opts: Sequence[str]) -> Dict[str, Any]:
    """One measurement in this (fresh) process; DETECTRON2_DATASETS must be set before detectron2 is imported."""
    cfg = _config(name, opts)
    from detectron2.data import get_detection_dataset_dicts

    from diffusioninst.data import register_datasets_from_cfg

    base_rss = _rss_bytes()
    start = time.perf_counter()
    if impl == "ours":
        register_datasets_from_cfg(cfg)
    records = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "dataset": name, "seconds": seconds, "peak_rss": peak, "base_rss": base_rss,
            "records": len(records), "annotations": sum(len(r.get("annotations", ())) for r in records),
            "digest": record_digest(records), "opts": list(opts)}


def measure_in_subprocess(impl: str, name: str, root: str, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """Run :func:`_worker` in a fresh interpreter with ``DETECTRON2_DATASETS=root``; its result."""
    env = {**os.environ, "DETECTRON2_DATASETS": root}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.data_loading import _worker; "
            "print('RESULT ' + json.dumps(_worker(sys.argv[2], sys.argv[3], sys.argv[4:])))")
    proc = subprocess.run([sys.executable, "-c", code, ROOT, impl, name, *opts], env=env, capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"data benchmark ({impl}, {name}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_data_benchmark(root: str, names: Sequence[str], repeats: int = 1, opts: Sequence[str] = (),
                       log=print) -> List[Dict[str, Any]]:
    """Plain, then ours (``repeats`` times each, alternating), for every dataset in ``names``; one row each."""
    rows = []
    for name in names:
        runs: Dict[str, List[Dict[str, Any]]] = {impl: [] for impl in IMPLS}
        for k in range(repeats):
            for impl in IMPLS:
                result = measure_in_subprocess(impl, name, root, opts if impl == "ours" else ())
                log(f"[data] {name} {impl} run {k + 1}: {result['seconds']:.1f} s, peak RSS "
                    f"{result['peak_rss'] / 2**30:.2f} GiB, {result['records']} records")
                runs[impl].append(result)
        plain, ours = (min(runs[i], key=lambda r: r["seconds"]) for i in IMPLS)
        rows.append({
            "dataset": name, "plain": plain, "ours": ours, "runs": runs,
            "time_ratio": ours["seconds"] / plain["seconds"], "rss_ratio": ours["peak_rss"] / plain["peak_rss"],
            "same_records": all(r["digest"] == plain["digest"] for i in IMPLS for r in runs[i]),
        })
    return rows


def _rank_worker(impl: str, name: str, opts: Sequence[str], out: str) -> None:
    """One rank of :func:`measure_ranks` (under detectron2's launch): build the training set as the trainer does, read
    every record, measure while every rank is alive, write ``out/rank<k>.json``."""
    import gc

    cfg = _config(name, opts if impl == "ours" else ())
    from detectron2.data import DatasetFromList, get_detection_dataset_dicts
    from detectron2.utils import comm

    from diffusioninst.data import get_detection_dataset_shared, register_datasets_from_cfg
    from diffusioninst.runtime import malloc_trim

    gc.collect()
    malloc_trim()
    base = _smaps_rollup()
    start = time.perf_counter()
    if impl == "ours":
        register_datasets_from_cfg(cfg)
        dataset = get_detection_dataset_shared(cfg.DATASETS.TRAIN, filter_empty=True)
    else:
        dataset = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=True)
    if isinstance(dataset, list):  # as build_detection_train_loader wraps a list
        dataset = DatasetFromList(dataset, copy=False)
    seconds = time.perf_counter() - start
    digest = record_digest(dataset[k] for k in range(len(dataset)))  # every record read once, as in an epoch
    gc.collect()
    malloc_trim()  # heap the loading freed is not the dataset's
    comm.synchronize()
    after = _smaps_rollup()
    comm.synchronize()  # every rank measured while the others still map the file
    result = {"impl": impl, "dataset": name, "rank": comm.get_rank(), "seconds": seconds, "records": len(dataset),
              "digest": digest, "type": type(dataset).__name__,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              **{f"{k.lower()}_increase": after[k] - base[k] for k in ("Rss", "Pss")}}
    with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(result, f)


def measure_ranks(impl: str, name: str, root: str, ranks: int, opts: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Launch ``ranks`` processes (one machine) that each build the training set ``name`` the ``impl`` way; their
    :func:`_rank_worker` results, by rank."""
    import tempfile

    env = {**os.environ, "DETECTRON2_DATASETS": root}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import diffusioninst; from detectron2.engine import launch; "
            "from benchmarks.data_loading import _rank_worker; launch(_rank_worker, int(sys.argv[2]), "
            "dist_url='auto', args=(sys.argv[3], sys.argv[4], sys.argv[6:], sys.argv[5]))")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", code, ROOT, str(ranks), impl, name, out, *opts], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{ranks}-rank data benchmark ({impl}, {name}) failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        results = []
        for k in range(ranks):
            with open(os.path.join(out, f"rank{k}.json")) as f:
                results.append(json.load(f))
    return results


def format_ranks_report(name: str, single: Sequence[Dict[str, Any]], shared: Sequence[Dict[str, Any]]) -> str:
    """The memory of one plain rank against N ranks sharing one copy (totals of PSS and RSS increases)."""
    gib = 2**30
    one = single[0]
    total_pss, total_rss = sum(r["pss_increase"] for r in shared), sum(r["rss_increase"] for r in shared)
    lines = [f"{name}, the training set's resident memory after loading and one read of every record (GiB):", "",
             "| | ranks | records | PSS increase, all ranks | RSS increase, all ranks | per rank (PSS) | "
             "peak RSS, all ranks | same records |", "|---|---|---|---|---|---|---|---|",
             f"| plain detectron2, one process | 1 | {one['records']:,} | {one['pss_increase'] / gib:.2f} | "
             f"{one['rss_increase'] / gib:.2f} | {one['pss_increase'] / gib:.2f} | {one['peak_rss'] / gib:.2f} | |",
             f"| ours, one copy per machine | {len(shared)} | {shared[0]['records']:,} | {total_pss / gib:.2f} "
             f"({total_pss / one['pss_increase']:.2f}x one plain rank) | {total_rss / gib:.2f} | "
             + ", ".join(f"{r['pss_increase'] / gib:.2f}" for r in shared)
             + f" | {sum(r['peak_rss'] for r in shared) / gib:.2f} | "
             f"{'yes' if all(r['digest'] == one['digest'] for r in shared) else 'NO'} |"]
    return "\n".join(lines)


def format_data_report(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table: time, peak RSS, records, ratios, and whether the records are the same."""
    lines = ["| dataset | plain detectron2 | ours (all checks) | time ratio | peak RSS ratio | records | same records |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        p, o = row["plain"], row["ours"]
        lines.append(f"| {row['dataset']} | {p['seconds']:.1f} s, {p['peak_rss'] / 2**30:.2f} GiB | "
                     f"{o['seconds']:.1f} s, {o['peak_rss'] / 2**30:.2f} GiB | {row['time_ratio']:.2f}x | "
                     f"{row['rss_ratio']:.2f}x | {o['records']:,} ({o['annotations']:,} annotations) | "
                     f"{'yes' if row['same_records'] else 'NO'} |")
    return "\n".join(lines)

