"""Lightning callbacks of lit_reason, reusable in any project exposing the small protocols they document."""

from lit_reason.callbacks.evaluation import EvalAccuracy
from lit_reason.callbacks.export import ExportPolicy, save_policy
from lit_reason.callbacks.mcts_refresh import MCTSTargetRefresh
from lit_reason.callbacks.rounds import IterativeRounds, RoundSchedule
from lit_reason.callbacks.value_calibration import ValueCalibration
from lit_reason.callbacks.resume import ResumeState  # exact resume (issue #14)
from lit_reason.callbacks.tracking import RunSummary, StepAxis, StepProgressBar  # tracking (issue #14)

__all__ = ["EvalAccuracy", "ExportPolicy", "IterativeRounds", "MCTSTargetRefresh", "RoundSchedule", "ValueCalibration", "save_policy",
           "ResumeState", "RunSummary", "StepAxis", "StepProgressBar"]
