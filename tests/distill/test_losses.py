import torch
import torch.nn as nn

from efficientml.distill import TeacherLoss, kd_loss
from efficientml.train import TrainConfig, fit


def test_kd_loss_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t = torch.softmax(t / 4, -1)
    ref = (p_t * (p_t.log() - torch.log_softmax(s / 4, -1))).sum(-1).mean() * 16
    torch.testing.assert_close(kd_loss(s, t, 4.0), ref)
    assert kd_loss(t, t).abs().item() < 1e-6


def test_teacher_loss_sees_the_students_batch_and_trains_towards_the_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(64, 4)
    data = [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]
    with TeacherLoss(teacher, student, temperature=2.0) as kd:
        out = student(x)
        torch.testing.assert_close(kd(student, out, None), kd_loss(out, teacher(x).detach(), 2.0))
        before = kd_loss(student(x), teacher(x), 2.0).item()
        fit(student, data, TrainConfig(epochs=30, lr=0.1, optimizer="sgd", schedule="constant", warmup_frac=0.0),
            loss_fn=lambda logits, y: logits.sum() * 0, extra_loss=kd, progress=False)
    assert kd_loss(student(x), teacher(x), 2.0).item() < 0.2 * before
    assert not student._forward_pre_hooks                       # closed on exit
    assert all(not p.requires_grad for p in teacher.parameters())
