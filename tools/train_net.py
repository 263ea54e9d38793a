#!/usr/bin/env python
"""Train or evaluate DiffusionInst: ``tools/train_net.py --config-file CFG [--eval-only] [KEY VALUE ...]``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402  (compat shims and registrations come first)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, LVISEvaluator  # noqa: E402

from diffusioninst import DiffusionInstDatasetMapper, add_diffusioninst_config, build_optimizer  # noqa: E402
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402


class Trainer(DefaultTrainer):
    """DefaultTrainer with DiffusionInst's data mapper, optimizer and evaluators."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "lvis":
            return LVISEvaluator(dataset_name, cfg, True, output_folder)
        return COCOEvaluator(dataset_name, ("bbox", "segm"), True, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DiffusionInstDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DiffusionInstDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def setup(args):
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_datasets_from_cfg(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
