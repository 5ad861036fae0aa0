"""recipes.pretrain with a fault injected, for the tests: FAULT=crash_in_save stops every
rank half-way through the save at iteration SAVE_CRASH_ITER (after shards are written,
before the rename); FAULT=nan makes the loss NaN at iteration NAN_ITER."""

import os
import sys

from megatron.core import dist_checkpointing

from recipes.train import pretrain, training

fault = os.environ["FAULT"]
if fault == "crash_in_save":
    crash_iter = int(os.environ["SAVE_CRASH_ITER"])
    real_save = dist_checkpointing.save

    def save(state, path, *a, **k):
        real_save(state, path, *a, **k)
        if state["progress"]["iteration"] == crash_iter:
            # dies between writing the shards and the rename (not os._exit: that would orphan
            # dist_checkpointing's helper processes, which keep the test's pipes open)
            raise SystemExit(17)

    dist_checkpointing.save = save
elif fault == "nan":
    nan_iter, calls = int(os.environ["NAN_ITER"]), {"n": 0}
    real_loss = training.lm_loss

    def lm_loss(output_tensor, loss_mask, cp_group=None):
        calls["n"] += 1
        loss, stats = real_loss(output_tensor, loss_mask, cp_group)
        if calls["n"] > (nan_iter - 1) * int(os.environ["NMB"]):
            loss = loss * float("nan")
            stats = {"lm loss": loss.detach().clone()}
        return loss, stats

    training.lm_loss = lm_loss

if __name__ == "__main__":
    pretrain.main(sys.argv[1:])
