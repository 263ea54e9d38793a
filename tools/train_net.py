#!/usr/bin/env python
"""Train or evaluate DiffusionInst: ``tools/train_net.py --config-file CFG [--eval-only] [--resume] [KEY VALUE ...]``.

Mistakes (config, data, checkpoints) stop the run with one line naming what to fix (``--debug`` shows the traceback).
Checkpoints are written atomically; every evaluation is kept in ``OUTPUT_DIR/inference/<dataset>/results.json``.
"""
import logging
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (detectron2 compatibility shims and registrations come first)
import torch  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from diffusioninst import DiffusionInstDatasetMapper, build_optimizer, get_diffusioninst_cfg  # noqa: E402
from diffusioninst.checkpoint import DiffusionInstCheckpointer, load_weights  # noqa: E402
from diffusioninst.data import get_detection_dataset_shared, register_datasets_from_cfg  # noqa: E402
from diffusioninst.ema import unwrap_model  # noqa: E402
from diffusioninst.engine import DiffusionInstTrainer, EvalHook, check_resume  # noqa: E402
from diffusioninst.errors import (  # noqa: E402
    USER_ERROR_EXIT, HideUserErrorTracebacks, UserError, debug_requested, report_user_error, run_tool,
)
from diffusioninst.evaluation import build_evaluator  # noqa: E402
from diffusioninst.modeling.test_time_augmentation import DiffusionInstWithTTA  # noqa: E402
from diffusioninst.runtime import configure_runtime  # noqa: E402


class Trainer(DiffusionInstTrainer):
    """DiffusionInst's data (mapper), optimizer, evaluators and test-time augmentation, on the engine's trainer
    (atomic checkpoints, EMA, mixed precision, loss and memory checks, saved results)."""

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader over the training set, loaded and serialized once per machine."""
        dataset = get_detection_dataset_shared(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return build_detection_train_loader(cfg, mapper=DiffusionInstDatasetMapper(cfg, is_train=True), dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(dataset=get_detection_dataset_shared([dataset_name], filter_empty=False),
                                           mapper=DiffusionInstDatasetMapper(cfg, is_train=False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model, **info):
        """Multi-scale + flip test-time augmentation; metric names get a "_TTA" suffix."""
        evaluators = [build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, DiffusionInstWithTTA.from_config(cfg, unwrap_model(model)), evaluators,
                       results_dir="inference_TTA", **info)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def setup(args):
    cfg = get_diffusioninst_cfg(args.config_file, args.opts)
    if args.resume and not args.eval_only:
        check_resume(cfg)  # before anything in OUTPUT_DIR (config.yaml, logs) is written
    register_datasets_from_cfg(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="diffusioninst")
    logging.getLogger("detectron2.engine.train_loop").addFilter(HideUserErrorTracebacks())
    configure_runtime(cfg)
    return cfg


def evaluate(cfg, args):
    """--eval-only: MODEL.WEIGHTS (with --resume, the last checkpoint), with its EMA weights if MODEL_EMA.ENABLED."""
    model = Trainer.build_model(cfg)
    checkpointer = DiffusionInstCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    resume = args.resume and checkpointer.has_checkpoint()
    path = checkpointer.get_checkpoint_file() if resume else cfg.MODEL.WEIGHTS
    load_weights(model, path, use_ema=cfg.MODEL_EMA.ENABLED, allow_pickle=cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
                 source="the last checkpoint (--resume)" if resume else "MODEL.WEIGHTS",
                 require_complete=not args.allow_random_weights)
    res = Trainer.test(cfg, model, weights=path, ema=cfg.MODEL_EMA.ENABLED)
    if cfg.TEST.AUG.ENABLED:
        res.update(Trainer.test_with_TTA(cfg, model, weights=path, ema=cfg.MODEL_EMA.ENABLED))
    verify_results(cfg, res)
    return res


def run(args):
    """One process's work. With several processes, each reports its own user error and exits."""
    try:
        cfg = setup(args)
        if args.eval_only:
            return evaluate(cfg, args)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        if cfg.TEST.AUG.ENABLED:
            trainer.register_hooks([EvalHook(0, lambda: trainer.test_with_TTA(
                cfg, trainer.model, iteration=min(trainer.iter, trainer.max_iter - 1)))])
        return trainer.train()
    except UserError as exc:
        if comm.get_world_size() == 1 or debug_requested(sys.argv):
            raise
        if comm.is_main_process():
            report_user_error(exc, "train_net.py")
        sys.exit(USER_ERROR_EXIT)


def main(argv=None) -> int:
    """The command line; returns the exit status (a user error is printed as one line)."""
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="--eval-only: evaluate even with MODEL.WEIGHTS empty or not matching the model")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")

    def cli(argv):
        args = parser.parse_args(argv)
        print("Command Line Args:", args)
        get_diffusioninst_cfg(args.config_file, args.opts)  # config mistakes are reported once, before any process
        try:
            launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
        except torch.multiprocessing.ProcessExitedException as exc:  # a worker reported its error and exited
            return exc.exit_code
        return 0

    return run_tool(cli, argv, "train_net.py")


if __name__ == "__main__":
    sys.exit(main())
