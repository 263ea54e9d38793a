#!/usr/bin/env python
"""Train or evaluate DiffusionInst: ``tools/train_net.py --config-file CFG [--eval-only] [--resume] [KEY VALUE ...]``.

Config mistakes, bad data, missing, corrupt, unsafe or mismatched checkpoints stop the run with one line that names
what to fix (``--debug`` shows the traceback). Checkpoints
are written atomically; a NaN/Inf loss stops training before anything of that state is saved; CUDA
out-of-memory errors say which keys reduce memory; every finished evaluation is kept in
``OUTPUT_DIR/inference/<dataset>/results.json`` (and ``results_history.jsonl``).
"""
import contextlib
import logging
import os
import sys
import weakref
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from diffusioninst import (  # noqa: E402
    DiffusionInstDatasetMapper, add_diffusioninst_config, build_optimizer,
)
from diffusioninst.checkpoint import (  # noqa: E402
    DiffusionInstCheckpointer, architecture, check_optimizer_state, check_resume, load_weights,
)
from diffusioninst.config import check_config, merge_config  # noqa: E402
from diffusioninst.errors import (  # noqa: E402
    USER_ERROR_EXIT, HideUserErrorTracebacks, UserError, debug_requested, report_user_error, run_tool,
)
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402
from diffusioninst.runtime import configure_runtime  # noqa: E402
from diffusioninst.ema import EMAHook, ModelEMA, unwrap_model  # noqa: E402
from diffusioninst.evaluation import LVISEvaluator  # noqa: E402
from diffusioninst.engine import (  # noqa: E402
    EvalHook, LossCheck, amp_grad_scaler, mixed_precision_step, out_of_memory_error, save_eval_results,
    training_amp_dtype,
)
from diffusioninst.modeling.test_time_augmentation import DiffusionInstWithTTA  # noqa: E402


class Trainer(DefaultTrainer):
    """DefaultTrainer with DiffusionInst's mapper, optimizer, evaluators, model EMA and test-time augmentation,
    atomic checkpoints, a non-finite-loss check and explained CUDA out-of-memory errors."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.amp_dtype = training_amp_dtype(cfg)
        self.device_type = torch.device(cfg.MODEL.DEVICE).type
        if self.amp_dtype is not None:
            self._trainer.grad_scaler = amp_grad_scaler(self.amp_dtype, self.device_type)
        me = weakref.proxy(self)  # no reference cycle through the model's forward hook
        self.loss_check = LossCheck(self._trainer.model, lambda: me.iter, lambda: me._last_checkpoint())

    def _last_checkpoint(self) -> str:
        return self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""

    def train(self):
        """DefaultTrainer.train; a run killed between its last periodic checkpoint and model_final resumes with no
        iteration left: model_final is then written from the restored state before the final evaluation."""
        if self.start_iter >= self.max_iter and not os.path.isfile(os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")):
            self.checkpointer.save("model_final", iteration=self.max_iter - 1)
        return super().train()

    def run_step(self):
        try:
            if self.amp_dtype is None:
                super().run_step()
            else:  # detectron2's AMPTrainer, with SOLVER.AMP.DTYPE
                self._trainer.iter = self.iter
                mixed_precision_step(self._trainer, self.amp_dtype, self.device_type)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory_error(self.cfg, "training", exc, self.iter, self._last_checkpoint()) from exc

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "lvis":
            return LVISEvaluator(dataset_name, ("bbox", "segm"), True, output_folder)
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
        if "_trainer" in state_dict:
            check_optimizer_state(self.optimizer, state_dict["_trainer"].get("optimizer"))
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # idempotent where detectron2 already restored it
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        """Default hooks; with MODEL_EMA.ENABLED the EMA is updated before checkpointing and used to evaluate.

        DefaultTrainer.__init__ calls this right after creating its DetectionCheckpointer; it is replaced here by
        the atomic DiffusionInstCheckpointer before the checkpoint hook is built from it.
        """
        self.checkpointer = DiffusionInstCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, allow_pickle=self.cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
            architecture=architecture(self.cfg), trainer=weakref.proxy(self))
        ret = super().build_hooks()
        self.model_ema = None
        if self.cfg.MODEL_EMA.ENABLED:
            self.model_ema = ModelEMA(self.model, self.cfg.MODEL_EMA.DECAY, self.cfg.MODEL_EMA.DEVICE)
            self.checkpointer.add_checkpointable("model_ema", self.model_ema)
            ret.insert(2, EMAHook(self.model_ema, self.model))  # right after the LR scheduler, before checkpoints
        return [EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate) if isinstance(h, hooks.EvalHook) else h
                for h in ret]

    def _evaluate(self):
        """Evaluation during/after training (with the EMA weights if enabled), saved with the iteration."""
        ema = self.model_ema.apply_to(self.model) if self.model_ema is not None else contextlib.nullcontext()
        with ema:
            self._last_eval_results = self.test(self.cfg, self.model, iteration=min(self.iter, self.max_iter - 1),
                                                ema=self.model_ema is not None)
        return self._last_eval_results

    @classmethod
    def test(cls, cfg, model, evaluators=None, *, results_dir="inference", **info):
        """DefaultTrainer.test, plus: metrics written to OUTPUT_DIR/<results_dir>/<dataset>/results.json (with
        ``info``, e.g. iteration and weights) and out-of-memory errors explained."""
        try:
            results = super().test(cfg, model, evaluators)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory_error(cfg, "evaluation", exc) from exc
        if comm.is_main_process() and cfg.DATASETS.TEST:
            per_dataset = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
            for path in save_eval_results(per_dataset, os.path.join(cfg.OUTPUT_DIR, results_dir), **info):
                logging.getLogger("diffusioninst").info("Evaluation results saved to %s", path)
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model, **info):
        """Evaluate with multi-scale + flip test-time augmentation; metric names get a "_TTA" suffix."""
        evaluators = [cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, DiffusionInstWithTTA.from_config(cfg, unwrap_model(model)), evaluators,
                       results_dir="inference_TTA", **info)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def build_config(args):
    """The config of the command line (file + overrides), checked; not frozen. Raises ConfigError with what to fix."""
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    check_config(cfg)
    return cfg


def setup(args):
    cfg = build_config(args)
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
    """--eval-only: load MODEL.WEIGHTS (or the last checkpoint with --resume); with MODEL_EMA.ENABLED, its EMA."""
    model = Trainer.build_model(cfg)
    checkpointer = DiffusionInstCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    if args.resume and checkpointer.has_checkpoint():
        path, source = checkpointer.get_checkpoint_file(), "the last checkpoint (--eval-only --resume)"
    else:
        path, source = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
    load_weights(model, path, use_ema=cfg.MODEL_EMA.ENABLED, source=source,
                 allow_pickle=cfg.MODEL.WEIGHTS_ALLOW_PICKLE, require_complete=not args.allow_random_weights)
    res = Trainer.test(cfg, model, weights=path, ema=cfg.MODEL_EMA.ENABLED)
    if cfg.TEST.AUG.ENABLED:
        res.update(Trainer.test_with_TTA(cfg, model, weights=path, ema=cfg.MODEL_EMA.ENABLED))
    verify_results(cfg, res)
    return res


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks([EvalHook(0, lambda: trainer.test_with_TTA(
            cfg, trainer.model, iteration=min(trainer.iter, trainer.max_iter - 1)))])
    return trainer.train()


def worker(args):
    """main() in each launched process; with several processes, a user error is reported by the process itself."""
    try:
        return main(args)
    except UserError as exc:
        if comm.get_world_size() == 1 or debug_requested(sys.argv):
            raise
        if comm.is_main_process():
            report_user_error(exc, "train_net.py")
        sys.exit(USER_ERROR_EXIT)


def get_parser():
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="--eval-only: evaluate even with MODEL.WEIGHTS empty or not matching the model")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    return parser


def cli(argv):
    args = get_parser().parse_args(argv)
    print("Command Line Args:", args)
    build_config(args)  # config mistakes are reported here, once, before any process is started
    try:
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except torch.multiprocessing.ProcessExitedException as exc:  # a worker reported its error and exited
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(cli, prog="train_net.py"))
