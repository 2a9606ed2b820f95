"""Knowledge distillation: fine-tune a compressed student on its teacher's
softened outputs plus the labels (Hinton, Vinyals & Dean 2015)."""
from __future__ import annotations

from torch import nn

from ..errors import EdgekitError
from . import fxgraph
from .finetune import finetune


def distill(student: nn.Module, teacher: nn.Module, data, *, epochs: int = 10, temperature: float = 4.0,
            alpha: float = 0.7, lr: float = 3e-3, batch_size: int = 64, show_progress: bool = True,
            seed: int = 0) -> nn.Module:
    """Train a copy of ``student`` on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    The student keeps its pruned weights at zero and its clustered weights clustered, so distillation can
    follow any compression step. Returns the new student; ``student`` and ``teacher`` are untouched."""
    from .data import prepare

    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise EdgekitError(f"the distillation temperature must be a positive number, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise EdgekitError(f"alpha (the weight of the teacher's loss) must be in [0, 1], got {alpha!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise EdgekitError(f"epochs must be a positive integer, got {epochs!r}")
    split = prepare(data, student)
    if prepare(split, teacher).x_train.shape != split.x_train.shape:
        raise EdgekitError(f"the teacher does not run on the student's samples of shape {list(split.input_shape)}")
    new = fxgraph.clone(student)
    return finetune(new, split, epochs=epochs, lr=lr, teacher=fxgraph.clone(teacher), temperature=temperature,
                    alpha=alpha, batch_size=batch_size, seed=seed, label="distilling", show_progress=show_progress)
