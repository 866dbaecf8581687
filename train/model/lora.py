"""Which modules LoRA adapts: one pattern for the trainer (:mod:`mvtrain.model.setup`) and the
memory model's parameter count (:mod:`mvtrain.memory.params`)."""

LORA_TARGETS = (
    r".*(language_model|llm)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)
"""The LLM's projections: ``model.language_model.*`` (4.6 native), ``llm.model.*`` (2.6)."""
