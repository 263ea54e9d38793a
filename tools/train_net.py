#!/usr/bin/env python
"""Train or evaluate DiffusionInst: ``tools/train_net.py --config-file CFG [--eval-only] [--resume] [KEY VALUE ...]``."""
import logging
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, verify_results  # noqa: E402

from diffusioninst import DiffusionInstDatasetMapper, add_diffusioninst_config, build_optimizer  # noqa: E402
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402
from diffusioninst.ema import EMAHook, ModelEMA, unwrap_model  # noqa: E402
from diffusioninst.modeling.test_time_augmentation import DiffusionInstWithTTA  # noqa: E402


class Trainer(DefaultTrainer):
    """DefaultTrainer with DiffusionInst's mapper, optimizer, evaluators, model EMA and test-time augmentation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
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

    def state_dict(self):
        """Also the optimizer and AMP scaler state, which v0.6's DefaultTrainer leaves out of checkpoints."""
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # idempotent where detectron2 already restored it
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        """Default hooks; with MODEL_EMA.ENABLED the EMA is updated before checkpointing and used to evaluate."""
        ret = super().build_hooks()
        self.model_ema = None
        if not self.cfg.MODEL_EMA.ENABLED:
            return ret
        self.model_ema = ModelEMA(self.model, self.cfg.MODEL_EMA.DECAY, self.cfg.MODEL_EMA.DEVICE)
        self.checkpointer.add_checkpointable("model_ema", self.model_ema)
        ret.insert(2, EMAHook(self.model_ema, self.model))  # right after the LR scheduler, before checkpoints

        def test_with_ema():
            with self.model_ema.apply_to(self.model):
                self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_with_ema) if isinstance(h, hooks.EvalHook) else h
                for h in ret]

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with multi-scale + flip test-time augmentation; metric names get a "_TTA" suffix."""
        evaluators = [cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, DiffusionInstWithTTA.from_config(cfg, unwrap_model(model)), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def setup(args):
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_datasets_from_cfg(cfg)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(f"SOLVER.AMP.ENABLED needs a GPU (MODEL.DEVICE is {cfg.MODEL.DEVICE!r}); set it to False")
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def evaluate(cfg, args):
    """--eval-only: load MODEL.WEIGHTS (or the last checkpoint with --resume); with MODEL_EMA.ENABLED, its EMA."""
    model = Trainer.build_model(cfg)
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    path = checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint() else cfg.MODEL.WEIGHTS
    extra = checkpointer.load(path, checkpointables=[])
    if cfg.MODEL_EMA.ENABLED:
        if "model_ema" in extra:
            unwrap_model(model).load_state_dict(extra["model_ema"])
        else:
            logging.getLogger("diffusioninst").warning(
                "MODEL_EMA.ENABLED is set but %s holds no EMA weights; evaluating its model weights", path
            )
    res = Trainer.test(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        res.update(Trainer.test_with_TTA(cfg, model))
    verify_results(cfg, res)
    return res


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
