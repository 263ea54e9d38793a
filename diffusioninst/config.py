"""Config defaults for DiffusionInst; every key the model, data and training code reads lives here."""
from detectron2.config import CfgNode as CN


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
    d.USE_NMS = True  # per-class NMS on the final (or ensembled) predictions
    d.NMS_THRESH = 0.5  # IoU threshold of that NMS
    d.BOX_RENEWAL = True  # between steps, drop boxes scoring below RENEWAL_THRESHOLD and refill with noise
    d.RENEWAL_THRESHOLD = 0.5  # score threshold of box renewal
    d.USE_ENSEMBLE = True  # with SAMPLE_STEP > 1, pool the predictions of every step before NMS
    d.ENSEMBLE_LAST_STEP = True  # include the last step in the ensemble (False: the original's behaviour)
    d.INFERENCE_SEED = 0  # seeds each image's sampling noise from (seed, image_id) so evaluation is repeatable; -1: unseeded

    # Swin backbones.
    from .modeling.backbone.swin import add_swin_config

    add_swin_config(cfg)

    # Model EMA (original key names): an average of the weights, used for evaluation and saved in checkpoints.
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False  # keep an EMA of the weights and evaluate with it
    cfg.MODEL_EMA.DECAY = 0.999  # EMA decay per iteration
    cfg.MODEL_EMA.DEVICE = ""  # device of the EMA copy ("" = the model's)

    # Optimizer.
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW or SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # backbone lr = BASE_LR * this

    # Data.
    cfg.DATASETS.COCO_INSTANCES = ()  # extra COCO-format datasets: ((name, json_file, image_root), ...)
    cfg.DATASETS.SKIP_INVALID = False  # skip (with a warning) bad images and annotations of unknown images/classes
    cfg.DATASETS.CHECK_IMAGE_FILES = True  # at dataset load, check each listed image file exists (a stat per image)
    cfg.INPUT.CROP_RESIZE_SIZES = (400, 500, 600)  # shortest-edge sizes of the crop path before RandomCrop

    # Test-time augmentation (original keys).
    cfg.TEST.AUG.MIN_SIZES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800)
    cfg.TEST.AUG.CVPODS_TTA = True  # cvpods-style TTA with per-scale box-size filters
    cfg.TEST.AUG.SCALE_FILTER = True  # keep only boxes inside SCALE_RANGES for each scale
    cfg.TEST.AUG.SCALE_RANGES = (
        [96, 10000], [96, 10000], [64, 10000], [64, 10000], [64, 10000], [0, 10000], [0, 10000],
        [0, 256], [0, 256], [0, 192], [0, 192], [0, 96], [0, 10000],
    )  # (min, max) box sizes kept at each of MIN_SIZES
