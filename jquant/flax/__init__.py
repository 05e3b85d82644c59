"""QAT and PTQ in Flax training loops: schedules, a linen TrainState, an nnx wrapper, calibration, checkpoints."""

from jquant.flax.calibrate import calibrate
from jquant.flax.checkpoint import restore_checkpoint, save_checkpoint
from jquant.flax.conv_bn import ConvBN, fold_conv_bn
from jquant.flax.nnx_qat import QATModule, QState
from jquant.flax.schedule import QATSchedule, scheduled_apply
from jquant.flax.train_state import QATTrainState

__all__ = [
    "ConvBN",
    "QATModule",
    "QATSchedule",
    "QState",
    "QATTrainState",
    "calibrate",
    "fold_conv_bn",
    "restore_checkpoint",
    "save_checkpoint",
    "scheduled_apply",
]
