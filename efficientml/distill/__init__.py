"""Knowledge distillation: losses that plug into :func:`efficientml.train.fit`, the feature and
relational losses of the literature, :class:`Distiller` (one config → one loss) and offline
:func:`distill` on the shared training loop; teacher-free trainers (deep mutual learning, BYOT heads,
born-again generations), NetAug for tiny models, and cutout/mixup augmentation."""

from efficientml.distill.augment import CutoutLoader, MixupLoader, cutout, mixup, mixup_loss
from efficientml.distill.born_again import born_again
from efficientml.distill.byot import HeadOutputs, SelfDistillHeads, byot_loss, byot_train
from efficientml.distill.ensemble import Ensemble
from efficientml.distill.features import (HintAdapter, ab_loss, attention_loss, attention_map,
                                          gradient_attention_loss, gradient_attention_maps, hint_loss)
from efficientml.distill.hooks import FeatureCapture, auto_layers, capture
from efficientml.distill.losses import TeacherLoss, kd_loss, kd_per_sample
from efficientml.distill.methods import METHODS, DistillConfig, Distiller, teacher_teaches
from efficientml.distill.mutual import mutual_learning, mutual_loss
from efficientml.distill.netaug import AugmentedNet, netaug_train
from efficientml.distill.offline import distill
from efficientml.distill.relations import (fsp_loss, fsp_matrix, rkd_angle_loss, rkd_distance_loss, rkd_loss,
                                           similarity_matrix, sp_loss)
from efficientml.distill.weights import WeightMatcher, weight_loss

__all__ = [
    "TeacherLoss", "kd_loss", "kd_per_sample",
    "HintAdapter", "hint_loss", "attention_map", "attention_loss", "gradient_attention_maps",
    "gradient_attention_loss", "ab_loss",
    "fsp_matrix", "fsp_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "similarity_matrix", "sp_loss",
    "WeightMatcher", "weight_loss",
    "FeatureCapture", "capture", "auto_layers",
    "METHODS", "DistillConfig", "Distiller", "teacher_teaches", "distill",
    "mutual_loss", "mutual_learning", "Ensemble", "born_again",
    "SelfDistillHeads", "HeadOutputs", "byot_loss", "byot_train",
    "AugmentedNet", "netaug_train",
    "cutout", "mixup", "mixup_loss", "CutoutLoader", "MixupLoader",
]
