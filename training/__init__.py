"""maskmix training: the masked-diffusion model, objective, data mixture and DeepSpeed trainer.

Modules, one job each:
  model.py      bidirectional transformer (RMSNorm, RoPE, SwiGLU, SDPA without a causal mask)
  diffusion.py  masking process, NELBO training loss, ELBO evaluation estimator, sampler
  data.py       MixtureSampler (domain-weighted packing of manifest shards) and eval sequences
  trainer.py    the DeepSpeed training loop, checkpoints and exact resume
  evaluate.py   per-domain likelihood bounds (nats/token, bits/byte) from a checkpoint

Heavy dependencies (DeepSpeed, MLflow) are imported by trainer.py / evaluate.py only, so
``from training.model import MaskedDiffusionTransformer`` stays cheap.
"""

from training.model import PRESETS, MaskedDiffusionTransformer, ModelArgs, build_model_args

__all__ = ["PRESETS", "MaskedDiffusionTransformer", "ModelArgs", "build_model_args"]
