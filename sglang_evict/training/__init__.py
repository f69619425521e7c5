"""Training the retention gates (METHOD.md "Training"): only the gates learn, the LLM is frozen.

    config       TrainConfig from a file and overrides
    gated_attention  retention-gated attention (the decay added to the logit), capacity loss
    student      the gates attached to the frozen model (retention-gated attention)
    loss         one sequence's loss (KL to the teacher, CE, capacity) and its backward
    checkpoints  atomic checkpoint files and RNG states
    trainer      the run: optimizer, schedule, data cursor, resume, export
    plots        the loss curve
    cli          `sglang-evict train`
Data: `sglang_evict.training.data`.
"""

from sglang_evict.training.checkpoints import CHECKPOINT_FILE, DEFAULT_GATES_DIR, EXPORT_FILE
from sglang_evict.training.cli import main
from sglang_evict.training.config import TrainConfig, TrainConfigError, load_config
from sglang_evict.training.loss import StepLosses, forward_backward, resolve_precision
from sglang_evict.training.student import GateAttachment, load_base_model, student_logits
from sglang_evict.training.trainer import Trainer, export_checkpoint, train

__all__ = [
    "CHECKPOINT_FILE", "DEFAULT_GATES_DIR", "EXPORT_FILE", "GateAttachment", "StepLosses",
    "TrainConfig", "TrainConfigError", "Trainer", "export_checkpoint", "forward_backward",
    "load_base_model", "load_config", "main", "resolve_precision", "student_logits", "train",
]
