"""Megatron-Core's distributed optimizer over a torch optimizer (no Apex, no Transformer Engine).

Without Apex or TE, ``DistributedOptimizer`` keeps a torch Adam/AdamW inside and moves the
iteration count between torch's per-parameter ``state[p]["step"]`` and the param groups'
``"step"`` of its checkpoint.  Two things go wrong on that branch, on every backend:

- **Loading.**  ``load_checkpoint`` first asks ``optimizer.sharded_state_dict(is_loading=True)``
  for the template to load into, which calls ``state_dict()`` on an optimizer that has not
  stepped: torch holds no ``"step"`` yet, and ``state_dict`` asserts that exactly one step
  value exists (``assert len(steps) == 1``).  So every ``--use-distributed-optimizer`` run
  saved without Apex/TE could not be resumed.  An optimizer that never stepped has taken 0
  steps: that is the template's value, and the loaded checkpoint's replaces it.
- **The step after loading.**  ``load_state_dict`` then gives every parameter's state the
  *same* step tensor.  torch's fused and foreach Adam add 1 to each parameter's step tensor
  in place, so one shared tensor advanced once per parameter per step, and the bias
  correction of every resumed step was wrong.  Each parameter gets a copy of its own, as
  torch's own ``load_state_dict`` gives it.
- **Copying the loaded state in.**  ``_set_main_param_and_optimizer_states`` copies each
  loaded tensor over the optimizer's, "step" included.  But the parameter-state formats keep
  no step (dp_reshardable holds it as a non-persistent object: the template's own tensor, 0
  from the template load above), so the step that ``load_state_dict`` had just set from the
  checkpoint's param groups was overwritten with 0, and every resumed run restarted Adam's
  bias correction.  The step comes from the param groups alone: the copy is handed the
  optimizer's own step tensor, a copy onto itself.  Also, in fp32 the main parameters are
  views of the model's own parameters (leaves that require grad), and the copy ran outside
  ``no_grad``, which autograd refuses ("a view of a leaf Variable that requires grad is being
  used in an in-place operation"); its sibling loaders run under ``torch.no_grad()``, and so
  does it here.

With Apex or TE installed megatron takes its other branch, which these wrappers leave alone.
"""

from __future__ import annotations

import importlib

import torch


def _torch_branch() -> bool:
    """Whether megatron took its no-Apex/TE branch (the module's own flag, read at call time)."""
    return not importlib.import_module("megatron.core.optimizer.distrib_optimizer").HAVE_APEX_OR_TE


def state_dict_wrapper(original):
    def state_dict(self):
        if not _torch_branch():
            return original(self)
        inner = self.optimizer
        added = []  # (param, whether it had a state entry) given a zero step for this call only
        if not any("step" in s for s in inner.state.values()):
            for group in inner.param_groups:
                for p in group["params"]:
                    had_state = p in inner.state
                    inner.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    added.append((p, had_state))
        try:
            return original(self)
        finally:
            for p, had_state in added:
                if had_state:
                    del inner.state[p]["step"]
                else:
                    del inner.state[p]
    return state_dict


def load_state_dict_wrapper(original):
    def load_state_dict(self, state_dict):
        out = original(self, state_dict)
        if _torch_branch():
            seen = set()
            for s in self.optimizer.state.values():
                step = s.get("step")
                if isinstance(step, torch.Tensor):
                    if id(step) in seen:
                        s["step"] = step.clone()
                    seen.add(id(s["step"]))
        return out
    return load_state_dict


def set_param_state_wrapper(original):
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if _torch_branch() and "step" in tensors:
            own = _own_step(self, model_param)
            if own is not None:  # copied onto itself: the step load_state_dict set stays
                tensors = dict(tensors, step=own)
        with torch.no_grad():
            return original(self, model_param, tensors)
    return set_main_param_and_optimizer_states


def _own_step(optimizer, model_param):
    where = getattr(optimizer, "model_param_group_index_map", {}).get(model_param)
    if where is None:
        return None
    group_index, group_order = where
    main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
    return optimizer.optimizer.state.get(main_param, {}).get("step")
