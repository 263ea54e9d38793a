"""Config defaults for DiffusionInst (every key the model, data and training code reads), :func:`merge_config` (YAML
file and command-line overrides, each key and value checked first so that errors name the file, the key, the closest
valid key and the type expected) and :func:`check_config` (values the model cannot run with, refused before building).
"""
import ast
import difflib
import os
from typing import Any, List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode as CN

from .errors import UserError


def add_diffusioninst_config(cfg: CN) -> None:
    """Add DiffusionInst's keys to a detectron2 config (in place). Original-release key names are kept."""
    cfg.MODEL.DiffusionInst = CN()
    d = cfg.MODEL.DiffusionInst
    d.NUM_CLASSES = 80  # foreground classes (no background class with focal loss)
    d.NUM_PROPOSALS = 300  # noisy boxes per image, in training and inference

    # Decoder (DiffusionDet / Sparse R-CNN dynamic head).
    d.NHEADS = 8  # self-attention heads
    d.DROPOUT = 0.0  # dropout in the decoder stages
    d.DIM_FEEDFORWARD = 2048  # FFN width
    d.ACTIVATION = "relu"  # FFN activation: relu, gelu or glu
    d.HIDDEN_DIM = 256  # proposal feature width; must equal the FPN channels
    d.NUM_CLS = 1  # [Linear, LayerNorm, ReLU] blocks in the classification branch
    d.NUM_REG = 3  # [Linear, LayerNorm, ReLU] blocks in the regression branch
    d.NUM_HEADS = 6  # decoder stages
    d.NUM_DYNAMIC = 2  # dynamic 1x1 layers in the instance interaction
    d.DIM_DYNAMIC = 64  # width of the dynamic layers
    d.CPU_KERNELS = True  # on CPU: parallel/sparse RoIAlign and oneDNN Linear (diffusioninst/layers); False: plain ops
    cfg.register_deprecated_key("MODEL.DiffusionInst.ONEDNN_LINEAR")  # now part of CPU_KERNELS; old configs still load

    # Mask branch F_mask and dynamic mask head phi (CondInst without relative coordinates).
    d.MASK_IN_FEATURES = ("p2", "p3", "p4")  # FPN levels fused into F_mask (released weights: p2-p4)
    d.MASK_BRANCH_CHANNELS = 128  # width of the mask branch convs
    d.MASK_BRANCH_NUM_CONVS = 4  # 3x3 conv+BN+ReLU blocks after the fusion
    d.MASK_DIM = 8  # channels c of F_mask, the input of phi
    d.MASK_HEAD_CHANNELS = 8  # hidden width of phi
    d.MASK_HEAD_LAYERS = 3  # 1x1 conv layers of phi (8*8+8*8+8 weights + 8+8+1 biases = 153 params)
    d.MASK_THRESHOLD = 0.5  # probability threshold of the final binary masks

    # Loss.
    d.CLASS_WEIGHT = 2.0  # focal loss weight (also its matching cost)
    d.GIOU_WEIGHT = 2.0  # GIoU loss weight (also its matching cost)
    d.L1_WEIGHT = 5.0  # L1 box loss weight (also its matching cost)
    d.MASK_WEIGHT = 5.0  # dice mask loss weight lambda
    d.DEEP_SUPERVISION = True  # supervise every decoder stage
    d.MASK_DEEP_SUPERVISION = True  # also put the mask loss on every stage (paper: +2.2 AP); False: last only
    d.NO_OBJECT_WEIGHT = 0.1  # kept for original configs; unused with focal loss

    # Focal and federated loss.
    d.USE_FOCAL = True  # sigmoid focal classification loss
    d.USE_FED_LOSS = False  # federated loss (LVIS); class frequencies from the training set's metadata
    d.FED_LOSS_NUM_CLASSES = 50  # classes kept per iteration by the federated loss
    d.FED_LOSS_FREQ_WEIGHT_POWER = 0.5  # negatives sampled with probability image_count ** power
    d.ALPHA = 0.25  # focal alpha
    d.GAMMA = 2.0  # focal gamma
    d.PRIOR_PROB = 0.01  # focal prior, sets the initial classification bias

    # Label assignment.
    d.OTA_K = 5  # top-k IoUs summed into each ground truth's dynamic k
    d.CENTER_RADIUS = 2.5  # in-centre prior radius, in units of the ground-truth box size

    # Diffusion.
    d.NUM_TIMESTEPS = 1000  # T of the cosine schedule
    d.SNR_SCALE = 2.0  # signal scale of the box signal
    d.SAMPLE_STEP = 1  # DDIM steps at inference
    d.DDIM_ETA = 1.0  # DDIM eta (1: stochastic, 0: deterministic)

    # Inference.
    d.POSTPROCESS = "auto"  # "batched" (few big ops: GPUs), "sparse" (box by box: CPU), "auto": sparse on CPU_KERNELS
    d.USE_NMS = True  # per-class NMS on the final (or ensembled) predictions
    d.NMS_THRESH = 0.5  # IoU threshold of that NMS
    d.BOX_RENEWAL = True  # between steps, drop boxes scoring below RENEWAL_THRESHOLD and refill with noise
    d.RENEWAL_THRESHOLD = 0.5  # score threshold of box renewal
    d.USE_ENSEMBLE = True  # with SAMPLE_STEP > 1, pool the predictions of every step before NMS
    d.ENSEMBLE_LAST_STEP = True  # include the last step in the ensemble (False: the original's behaviour)
    d.INFERENCE_SEED = 0  # seeds each image's sampling noise from (seed, image_id) so evaluation is repeatable; -1: unseeded

    # Filter denoising (beyond the paper, off by default; GETTING_STARTED.md section "Filter denoising").
    d.FILTER_DENOISING = False  # diffuse each proposal's filters theta along with its box (same schedule and t)
    d.FILTER_SIGNAL_RANGE = 4.0  # filters are clamped to +-this and mapped to +-SNR_SCALE as their diffusion signal
    d.USE_BOX_LOSS = True  # L1 + GIoU box losses; False: no box losses, boxes are the extents of the predicted masks
    d.MASK_BOX_SEARCH_SCALE = 1.5  # without box losses: mask cells count only within the input box scaled by this

    # Swin backbones.
    from .modeling.backbone.swin import add_swin_config

    add_swin_config(cfg)

    # CPU runs: glibc keeps freed memory mapped (diffusioninst/runtime.py, applied by the tools).
    cfg.CPU_KEEP_FREED_MEMORY = True  # with MODEL.DEVICE cpu: no page faults re-mapping activations each call

    # Model EMA (original key names): an average of the weights, used for evaluation and saved in checkpoints.
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False  # keep an EMA of the weights and evaluate with it
    cfg.MODEL_EMA.DECAY = 0.999  # EMA decay per iteration
    cfg.MODEL_EMA.DEVICE = ""  # device of the EMA copy ("" = the model's)

    # Weights files: .pth are read weights-only and .pkl with an unpickler that admits only arrays and containers.
    cfg.MODEL.WEIGHTS_ALLOW_PICKLE = False  # True: unpickle MODEL.WEIGHTS without restriction (trusted files only)

    # Optimizer.
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW or SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # backbone lr = BASE_LR * this

    # Data.
    cfg.DATASETS.COCO_INSTANCES = ()  # extra COCO-format datasets: ((name, json_file, image_root), ...)
    cfg.DATASETS.LVIS_INSTANCES = ()  # extra LVIS-v1-format datasets (LVIS metrics): ((name, json_file, image_root), ...)
    cfg.DATASETS.SKIP_INVALID = False  # skip (with a warning) bad images and annotations of unknown images/classes
    cfg.DATASETS.CHECK_IMAGE_FILES = True  # at dataset load, check each listed image file exists (a stat per image)
    cfg.INPUT.CROP_RESIZE_SIZES = (400, 500, 600)  # shortest-edge sizes of the crop path before RandomCrop

    # Mixed-precision training: SOLVER.AMP.ENABLED (detectron2's key) with a choice of dtype.
    cfg.SOLVER.AMP.DTYPE = "float16"  # float16 (CUDA, with loss scaling) or bfloat16 (no scaling; CPU too)

    # Inference speed: mixed precision and memory layout.
    cfg.TEST.AMP = CN()
    cfg.TEST.AMP.ENABLED = False  # run backbone and decoder under torch.autocast at inference; boxes stay float32
    cfg.TEST.AMP.DTYPE = "float16"  # autocast dtype: float16 or bfloat16 (bfloat16 also works on CPU)
    cfg.TEST.CHANNELS_LAST = True  # at inference, backbone and mask branch convolve channels-last (faster on CPU)
    cfg.TEST.COMPILE = False  # torch.compile the backbone for inference; each new input shape compiles first

    # Test-time augmentation (original keys).
    cfg.TEST.AUG.MIN_SIZES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800)
    cfg.TEST.AUG.CVPODS_TTA = True  # cvpods-style TTA with per-scale box-size filters
    cfg.TEST.AUG.SCALE_FILTER = True  # keep only boxes inside SCALE_RANGES for each scale
    cfg.TEST.AUG.SCALE_RANGES = (
        [96, 10000], [96, 10000], [64, 10000], [64, 10000], [64, 10000], [0, 10000], [0, 10000],
        [0, 256], [0, 256], [0, 192], [0, 192], [0, 96], [0, 10000],
    )  # (min, max) box sizes kept at each of MIN_SIZES


# ----------------------------------------------------------------------------------------------------------------
# Reading configs with messages that say what to fix.


class ConfigError(UserError, ValueError):
    """A config file or override the project cannot use; the message names the key and what to change."""


class ConfigFileNotFoundError(UserError, FileNotFoundError):
    """The --config-file, or a file it inherits with _BASE_, does not exist."""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A key no one defines (still a KeyError, as detectron2 raises for unknown keys)."""


def config_keys(cfg: CN, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` as a dotted name."""
    keys = []
    for name, value in cfg.items():
        full = prefix + name
        keys += config_keys(value, full + ".") if isinstance(value, CN) else [full]
    return keys


def closest_keys(key: str, valid: Sequence[str], n: int = 1) -> List[str]:
    """The valid keys most like ``key``: by the whole dotted name and by its last part (``MODEL.NUM_PROPOSALS``
    finds ``MODEL.DiffusionInst.NUM_PROPOSALS``)."""
    key_l, leaf_l = key.lower(), key.rsplit(".", 1)[-1].lower()
    scored = []
    for k in valid:
        whole = difflib.SequenceMatcher(None, key_l, k.lower()).ratio()
        leaf = difflib.SequenceMatcher(None, leaf_l, k.rsplit(".", 1)[-1].lower()).ratio()
        scored.append((0.5 * whole + 0.5 * leaf, k))
    scored.sort(key=lambda s: -s[0])
    return [k for score, k in scored[:n] if score >= 0.6]


def _did_you_mean(key: str, valid: Sequence[str]) -> str:
    match = closest_keys(key, valid)
    return f"; did you mean {match[0]}?" if match else ""


def _read_yaml(path: str) -> dict:
    """A config file's mapping of keys; errors name the file."""
    try:
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.constructor.ConstructorError:  # detectron2 allows unsafe YAML in its configs
                f.seek(0)
                data = yaml.unsafe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} cannot be used as a detectron2 config: it holds a "
                          f"{type(data).__name__}, not a mapping of keys")
    return data or {}


def _config_chain(config_file: str) -> List[Tuple[str, dict]]:
    """``(path, mapping)`` of the YAML files that make up ``config_file``: its ``_BASE_`` files (recursively) first,
    then itself; paths resolved as detectron2 resolves them."""
    data = _read_yaml(config_file)
    bases = data.get("_BASE_")
    chain = []
    for base in [bases] if isinstance(bases, str) else list(bases or []):
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(config_file), base)
        if not os.path.isfile(base):
            raise ConfigFileNotFoundError(f"config file {config_file}: a file it inherits (_BASE_) is missing: {base}")
        chain += _config_chain(base)
    return chain + [(config_file, data)]


def _decode(value: Any) -> Any:
    """A config value as yacs reads it (from YAML or the command line): a Python literal where a string parses as
    one, else the value itself."""
    try:
        return ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        return value


def _type_problem(key: str, default: Any, value: Any, source: str) -> Optional[str]:
    """Why yacs would refuse ``value`` for ``key`` (same type, None, or tuple <-> list are accepted), or None."""
    if type(value) is type(default) or value is None or default is None or (
            isinstance(value, (tuple, list)) and isinstance(default, (tuple, list))):
        return None
    expected, got = type(default).__name__, type(value).__name__
    hint = ""
    if expected == "float" and got == "int":
        hint = f"; write it as a float, e.g. {value}.0"
    elif expected in ("tuple", "list"):
        hint = f"; write a list, e.g. ({value},) in YAML or \"({value},)\" on the command line"
    elif expected == "str":
        hint = "; quote it"
    article = "an" if expected[:1] in "aeiou" else "a"
    return f"{key} must be {article} {expected} (it is {default}) but {source} gives the {got} {value}{hint}"


def _check_value(cfg: CN, key: str, value: Any, source: str, valid: Sequence[str]) -> None:
    """Refuse an unknown key (naming the closest valid one), a group given one value, or a value of the wrong type."""
    if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
        return  # detectron2 skips deprecated keys and explains renamed ones itself
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            where = f"command-line override {key} is not a config key" if source == "the command line" else \
                f"unknown config key {key} in {source}"
            raise UnknownConfigKeyError(f"{where}{_did_you_mean(key, valid)}")
        node = node[part]
    if isinstance(node, CN):
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                _check_value(cfg, f"{key}.{sub}", sub_value, source, valid)
            return
        keys = sorted(node.keys())
        raise UnknownConfigKeyError(
            f"{'command-line override ' if source == 'the command line' else ''}{key} is a group of keys, not a key; "
            f"set one of its keys ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}) as {key}.<KEY> VALUE")
    problem = _type_problem(key, node, _decode(value), source)
    if problem:
        raise ConfigError(problem)


def merge_config(cfg: CN, config_file: Optional[str] = None, opts: Sequence = ()) -> CN:
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, after checking every key and value
    (naming the file that sets it, the closest valid key and the type expected). Raises :class:`ConfigError`
    (unknown keys: :class:`UnknownConfigKeyError`, also a KeyError) or :class:`ConfigFileNotFoundError`."""
    valid = config_keys(cfg)
    if config_file:
        if os.path.isdir(config_file):
            raise ConfigFileNotFoundError(f"config file {config_file!r} is a directory, not a YAML file (--config-file)")
        if not os.path.isfile(config_file):
            folder = os.path.dirname(config_file) or "."
            yamls = [f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))] if os.path.isdir(folder) else []
            near = difflib.get_close_matches(os.path.basename(config_file), yamls, n=3, cutoff=0.5)
            hint = f"; similar files in {folder}: {', '.join(near)}" if near else ""
            raise ConfigFileNotFoundError(f"config file {config_file!r} does not exist (--config-file){hint}")
        for path, data in _config_chain(config_file):
            for key, value in data.items():
                if key != "_BASE_":
                    _check_value(cfg, key, value, path, valid)
        _merge(lambda: cfg.merge_from_file(config_file), f"config file {config_file}")
    opts = [o if isinstance(o, str) else str(o) for o in opts]
    flags = [o for o in opts if o.startswith("--")]
    if flags:
        raise ConfigError(f"{flags[0]} comes after the KEY VALUE overrides, where it would be read as one; flags come "
                          f"first: --config-file FILE {flags[0]} ... KEY VALUE ...")
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; {opts[-1]!r} has no value (got "
                          f"{len(opts)} items)")
    for key, value in zip(opts[0::2], opts[1::2]):
        _check_value(cfg, key, value, "the command line", valid)
    if opts:
        _merge(lambda: cfg.merge_from_list(opts), "command-line overrides")
    return cfg


def _merge(merge, what: str) -> None:
    """Run detectron2's merge; what the checks above let through is reported with its own message."""
    try:
        merge()
    except (KeyError, ValueError, AssertionError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{what} cannot be used as a detectron2 config: {exc}") from exc


def get_diffusioninst_cfg(config_file: Optional[str] = None, opts: Sequence = ()) -> CN:
    """detectron2's defaults, DiffusionInst's keys, ``config_file`` and the ``KEY VALUE`` overrides, checked (not
    frozen); the config every tool builds from its command line."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    merge_config(cfg, config_file, opts)
    check_config(cfg)
    return cfg


def check_config(cfg: CN) -> None:
    """Reject values DiffusionInst cannot run with, before anything is built; one error lists every problem."""
    import torch
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    d = cfg.MODEL.DiffusionInst
    problems = []
    for key, value in (("NUM_CLASSES", d.NUM_CLASSES), ("NUM_PROPOSALS", d.NUM_PROPOSALS),
                       ("SAMPLE_STEP", d.SAMPLE_STEP), ("NUM_TIMESTEPS", d.NUM_TIMESTEPS),
                       ("NUM_HEADS", d.NUM_HEADS)):
        if value < 1:
            problems.append(f"MODEL.DiffusionInst.{key} must be at least 1, got {value}")
    if d.SAMPLE_STEP > d.NUM_TIMESTEPS >= 1:
        problems.append(
            f"MODEL.DiffusionInst.SAMPLE_STEP ({d.SAMPLE_STEP}) cannot exceed NUM_TIMESTEPS ({d.NUM_TIMESTEPS})"
        )
    if d.POSTPROCESS not in ("auto", "batched", "sparse"):
        problems.append(f"MODEL.DiffusionInst.POSTPROCESS must be auto, batched or sparse, got {d.POSTPROCESS!r}")
    if d.MASK_BOX_SEARCH_SCALE <= 0:
        problems.append(f"MODEL.DiffusionInst.MASK_BOX_SEARCH_SCALE must be positive, got {d.MASK_BOX_SEARCH_SCALE}")
    if d.FILTER_SIGNAL_RANGE <= 0:
        problems.append(f"MODEL.DiffusionInst.FILTER_SIGNAL_RANGE must be positive, got {d.FILTER_SIGNAL_RANGE}")
    if d.NHEADS < 1 or d.HIDDEN_DIM % d.NHEADS:
        problems.append(
            f"MODEL.DiffusionInst.HIDDEN_DIM ({d.HIDDEN_DIM}) must be divisible by NHEADS ({d.NHEADS})"
        )
    if "fpn" in cfg.MODEL.BACKBONE.NAME and d.HIDDEN_DIM != cfg.MODEL.FPN.OUT_CHANNELS:
        problems.append(
            f"MODEL.DiffusionInst.HIDDEN_DIM ({d.HIDDEN_DIM}) must equal MODEL.FPN.OUT_CHANNELS "
            f"({cfg.MODEL.FPN.OUT_CHANNELS}): the decoder reads the FPN features directly"
        )
    for key, registry in (("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY), ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY)):
        name = cfg.MODEL.BACKBONE.NAME if key == "MODEL.BACKBONE.NAME" else cfg.MODEL.META_ARCHITECTURE
        names = sorted(n for n, _ in registry)
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else ""
            problems.append(f"{key} {name!r} is not registered (registered: {', '.join(names)}){hint}")
    device = cfg.MODEL.DEVICE
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE not in ("float16", "bfloat16"):
        problems.append(f"SOLVER.AMP.DTYPE must be float16 or bfloat16, got {cfg.SOLVER.AMP.DTYPE!r}")
    elif cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE == "float16" and not device.startswith("cuda"):
        problems.append(f"SOLVER.AMP.ENABLED with float16 needs a GPU (MODEL.DEVICE is {device!r}); set it to "
                        "False, or SOLVER.AMP.DTYPE bfloat16")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        problems.append(f"MODEL.DEVICE {device!r} is not a device PyTorch knows; use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"MODEL.DEVICE is {device!r} but PyTorch sees no CUDA GPU; set MODEL.DEVICE cpu")
    for key, value, low in (("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, 1),
                            ("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, 1),
                            ("SOLVER.CHECKPOINT_PERIOD", cfg.SOLVER.CHECKPOINT_PERIOD, 1),
                            ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, 0)):
        if value < low:
            problems.append(f"{key} must be at least {low}, got {value}")
    if cfg.TEST.AMP.ENABLED and cfg.TEST.AMP.DTYPE not in ("float16", "bfloat16"):
        problems.append(f"TEST.AMP.DTYPE must be float16 or bfloat16, got {cfg.TEST.AMP.DTYPE!r}")
    if cfg.SOLVER.OPTIMIZER.upper() not in ("ADAMW", "SGD"):
        problems.append(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    if cfg.MODEL_EMA.ENABLED and not 0.0 <= cfg.MODEL_EMA.DECAY < 1.0:
        problems.append(f"MODEL_EMA.DECAY must be in [0, 1), got {cfg.MODEL_EMA.DECAY}")
    if cfg.OUTPUT_DIR and os.path.exists(cfg.OUTPUT_DIR) and not os.path.isdir(cfg.OUTPUT_DIR):
        problems.append(f"OUTPUT_DIR {cfg.OUTPUT_DIR} is a file, not a directory; choose another OUTPUT_DIR")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
