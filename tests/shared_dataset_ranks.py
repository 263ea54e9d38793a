"""Run by tests/test_shared_dataset.py: N processes started by detectron2's ``launch`` (GLOO on CPU) load a dataset with
``get_detection_dataset_shared`` and each writes what it saw to ``OUT/rank<k>.json``.

  python tests/shared_dataset_ranks.py OUT DATASET [--num-processes 2] [--hold SECONDS]

``$DETECTRON2_DATASETS`` must hold the dataset. With ``--hold`` every rank then sleeps (for a test to kill one). A rank
whose loading raises writes the error instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rank_main(out: str, dataset: str, hold: float) -> None:
    import diffusioninst  # noqa: F401
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import comm

    from benchmarks.data_loading import record_digest
    from diffusioninst import get_diffusioninst_cfg
    from diffusioninst.data import SerializedRecords, get_detection_dataset_shared, register_datasets_from_cfg

    cfg = get_diffusioninst_cfg(None, ["DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
                                       "MODEL.DiffusionInst.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu"])
    register_datasets_from_cfg(cfg)
    loads = []
    get = DatasetCatalog.get
    DatasetCatalog.get = lambda name: (loads.append(name), get(name))[1]  # counts the loads of this process
    try:
        records = get_detection_dataset_shared(cfg.DATASETS.TRAIN, filter_empty=True)
    except Exception as exc:  # noqa: BLE001  (the test reads what each rank raised)
        with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
            json.dump({"rank": comm.get_rank(), "loads": loads, "error": f"{type(exc).__name__}: {exc}"}, f)
        return
    info = {"rank": comm.get_rank(), "pid": os.getpid(), "loads": loads, "type": type(records).__name__,
            "records": len(records), "digest": record_digest(list(records)),
            "thing_classes": MetadataCatalog.get(dataset).get("thing_classes"),
            "class_image_count": MetadataCatalog.get(dataset).get("class_image_count")}
    if isinstance(records, SerializedRecords):
        info["inode"] = os.fstat(records._fd).st_ino
    with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(info, f)
    if hold:
        time.sleep(hold)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("dataset")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--hold", type=float, default=0.0)
    args = parser.parse_args()
    import diffusioninst  # noqa: F401  (the GLOO launch on CPU)
    from detectron2.engine import launch

    launch(rank_main, args.num_processes, dist_url="auto", args=(args.out, args.dataset, args.hold))


if __name__ == "__main__":
    main()
