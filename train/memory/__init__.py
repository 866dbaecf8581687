"""Memory model of a fine-tuning run: parameters, static memory, activations, budgets.

* :mod:`.params` -- :func:`count_parameters` (meta device / analytic for the 2.6 family),
  :func:`load_config_only`.
* :mod:`.static` -- :func:`static_memory` per GPU under ZeRO 0/1/2 (agrees with DeepSpeed's
  estimator).
* :mod:`.activations` -- :class:`ActivationModel` from the config (:func:`activation_model`).
* :mod:`.saved_tensors` -- :func:`measure_saved_bytes`, the ground truth it is tested against.
* :mod:`.budgets` -- :func:`plan_budgets`, :func:`predicted_peak_bytes`, :class:`Overhead`.
* :mod:`.probe_fit` -- a ``mvtrain probe`` fit as an activation model, and its setup check.
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
