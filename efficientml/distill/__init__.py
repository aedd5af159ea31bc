"""Knowledge distillation: losses that plug into :func:`efficientml.train.fit`."""

from efficientml.distill.losses import TeacherLoss, kd_loss

__all__ = ["TeacherLoss", "kd_loss"]
