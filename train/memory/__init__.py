"""Memory model of a fine-tuning run: what a setup needs per GPU, and the budgets that fit.

In reading order:

* :mod:`.params` -- :func:`count_parameters` (meta device / analytic for the 2.6 family),
  :func:`load_config_only`; :mod:`.dims` -- the config dimensions the models below read.
* :mod:`.static` -- :func:`static_memory` per GPU under ZeRO 0/1/2 (agrees with DeepSpeed's
  estimator), :func:`torch_engine_static_memory` for the plain engine.
* :mod:`.activations` -- :class:`ActivationModel` from the config (:func:`activation_model`):
  the op rules of :mod:`.activations_ops` applied in :mod:`.activations_vision` and
  :mod:`.activations_llm`. :mod:`.saved_tensors` measures what it predicts on CPU.
* :mod:`.probe` measures activation peaks on a GPU and fits ``a*T + b*P + c``;
  :mod:`.probe_fit` uses such a fit as the activation model, for its own setup only.
* :mod:`.budgets` -- :func:`plan_budgets`, :func:`predicted_peak_bytes`, :class:`Overhead`.
* ``mvtrain plan``: :mod:`.setup_fit` fits a request's setup (parameters, static memory,
  activations, budgets), :mod:`.remedies` what each change would do, :mod:`.plan` puts them
  together with the epoch's steps (:func:`~.plan.make_plan` -> :class:`~.plan.MemoryPlan`,
  its JSON), :mod:`.plan_text` formats it for the terminal.

This namespace exports the building blocks; the plan modules, which also read the shard
index and the batch planner, are imported by their own names.
"""

from mvtrain.memory.activations import (
    ActivationModel,
    TrainingSetup,
    activation_model,
    predict_peak_activation_bytes,
)
from mvtrain.memory.budgets import (
    BudgetError,
    BudgetPlan,
    IndexStats,
    Overhead,
    memory_breakdown,
    plan_budgets,
    predicted_peak_bytes,
    worst_batch_peak,
)
from mvtrain.memory.params import (
    ParamCounts,
    RemoteConfig,
    count_parameters,
    load_config_only,
    meta_model,
)
from mvtrain.memory.probe_fit import ProbeFitModel, check_probe_setup, load_probe_fit
from mvtrain.memory.static import StaticMemory, static_memory, torch_engine_static_memory

__all__ = [
    "ActivationModel",
    "BudgetError",
    "BudgetPlan",
    "IndexStats",
    "Overhead",
    "ParamCounts",
    "ProbeFitModel",
    "RemoteConfig",
    "StaticMemory",
    "TrainingSetup",
    "activation_model",
    "check_probe_setup",
    "count_parameters",
    "load_config_only",
    "load_probe_fit",
    "memory_breakdown",
    "meta_model",
    "plan_budgets",
    "predict_peak_activation_bytes",
    "predicted_peak_bytes",
    "static_memory",
    "torch_engine_static_memory",
    "worst_batch_peak",
]
