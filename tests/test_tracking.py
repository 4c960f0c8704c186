"""The progress bar of ``lit_reason.callbacks.tracking``: its total and count are training batches
(online iterations), derived from ``max_steps`` and the optimiser steps one batch takes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lit_reason.callbacks.tracking import StepAxis, StepProgressBar
from lit_reason.methods import GRPO

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_bar_counts_online_iterations_up_to_max_steps(embedded_arithmetic):
    # 2 prompts x 2 samples = 4 sequences, minibatch 2, 1 epoch: 2 optimiser steps per iteration, so
    # max_steps 6 is 3 iterations (Lightning's own bar would show the sampler's length, here 100)
    module = GRPO(policy=embedded_arithmetic, task={"name": "arithmetic", "n_train": 100, "n_validation": 4,
                                                    "n_test": 4},
                  prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=2, epochs_per_iteration=1,
                  max_new_tokens=40, temperature=1.0, progress=False, seed=0)
    bar = StepProgressBar()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[bar, StepAxis()])
    trainer.fit(module)
    assert trainer.global_step == 6
    assert bar._steps_per_batch == 2.0
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.n == 3
    assert bar.train_progress_bar.format_dict["rate"] is None or bar.train_progress_bar.format_dict["rate"] > 0
