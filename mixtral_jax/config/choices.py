"""Every set of named choices a config key takes, each declared once as a Registry.

Config validation (`config/checks.py`), the CLI's help and the generated config reference
(`docs/configs.md`) read the names from here; the implementations register themselves in the
modules that hold them (named beside each registry below), so this module imports no model code.
"""

from __future__ import annotations

from mixtral_jax.config.errors import ConfigError, did_you_mean
from mixtral_jax.config.registry import Registry

# Implemented in models/routing.py: builder (MoEConfig) -> router(logits, bias) -> Routing.
ROUTERS = Registry("model.moe.router", {
    "topk_softmax": "Mixtral: softmax over the k largest logits",
    "softmax_topk": "GShard / Switch: softmax over all E, keep the k largest (renormalize: rescale them to sum 1)",
    "sigmoid_topk": "DeepSeek-V3: sigmoid scores, keep the k largest (the loss-free bias shifts only the choice)",
    "expert_choice": "Zhou et al. 2022: each expert takes its top C = ceil(N * capacity_factor / E) tokens "
                     "(not causal)",
}, module="mixtral_jax.models.routing")
# Implemented in models/dispatch.py: builder (MoEConfig, Kernels) -> dispatch(x, routing, experts).
DISPATCHERS = Registry("model.moe.dispatch", {
    "dropless": "sort token-slots by expert, grouped matmul, unsort: nothing dropped, FLOPs grow with k",
    "capacity": "GShard: C = ceil(k N / E * capacity_factor) slots per expert, the lowest-weight overflow dropped",
    "dense": "every expert on every token (the reference: E/k x the FLOPs)",
}, module="mixtral_jax.models.dispatch")
# Implemented in kernels/backend.py: name -> (backend, interpret) -> the grouped SwiGLU the MoE runs.
GROUPED_KERNELS = Registry("model.grouped_kernel", {
    "auto": "the backend's default (Kernels.for_backend): pallas on NVIDIA GPUs, ragged_dot on TPU, cpu on CPU",
    "tokamax": "tokamax.ragged_dot: its Mosaic / Triton kernels on GPU and TPU, XLA's ragged dot elsewhere "
               "(pip install 'mixtral_jax[gpu]')",
    "pallas": "our Pallas (Triton) grouped matmul, rows padded per expert to whole blocks: NVIDIA GPUs only",
    "ragged_dot": "jax.lax.ragged_dot, rows sorted by expert (XLA's native ragged dot on TPU)",
    "cpu": "each expert's rows in matmuls of a few static sizes (XLA:CPU, which has no grouped matmul)",
}, module="mixtral_jax.kernels.backend")
# Implemented in models/routing.py: (batch, seq) -> the groups the load-balancing loss averages over.
AUX_LOSS_SCOPES = Registry("model.moe.aux_loss_scope", {
    "batch": "Switch / GShard: f and P over the global batch",
    "sequence": "f and P per sequence, then averaged",
}, module="mixtral_jax.models.routing")
# Implemented in models/layers.py: name -> jnp dtype.
DTYPES = Registry("model.dtype", {
    "float32": "32-bit float",
    "bfloat16": "bfloat16 (8-bit exponent)",
    "float16": "IEEE half precision",
}, module="mixtral_jax.models.layers")
# Implemented in models/transformer.py: name -> jax.checkpoint policy (None: save nothing).
REMAT_POLICIES = Registry("model.remat", {
    "none": "no rematerialisation: keep every activation the backward pass needs",
    "full": "save nothing, recompute the whole layer in the backward pass",
    "dots_saveable": "keep matmul outputs (grouped-matmul kernels included), recompute the rest",
}, module="mixtral_jax.models.transformer")
# Implemented in models/attention.py: name -> attention function.
QK_NORMS = Registry("model.qk_norm", {
    "none": "queries and keys as projected (Mistral, Mixtral)",
    "head": "RMSNorm over each head's head_dim, one weight shared by the heads (Qwen3, Dots1)",
    "full": "RMSNorm over the whole query / key projection (OLMoE)",
}, module="mixtral_jax.models.attention")
ATTENTION_IMPLS = Registry("model.attention_impl", {
    "plain": "our einsum attention (scores materialised)",
    "dot_product": "jax.nn.dot_product_attention's library kernel where one supports the shapes (cuDNN flash "
                   "on NVIDIA GPUs, 16-bit; packed documents as cuDNN's segment layout on Hopper), else plain",
}, module="mixtral_jax.models.attention")
# Implemented in data/sources.py: a source kind -> how to read and fingerprint its documents.
# A `data.source` value is `python_source` or `KIND:ARGUMENT`.
DATA_SOURCES = Registry("data.source", {
    "python_source": "the Python standard library's own source (embedded corpus, built once)",
    "tfds": "tfds:NAME[/CONFIG]: a tensorflow-datasets dataset read through array_record",
    "jsonl": "jsonl:PATH: JSON lines (a file, directory or glob), text under data.text_key",
    "text": "text:DIR: every text file under a directory, one document each",
    "instruct": "instruct:PATH: instruction data ({prompt, response} or {messages}), loss on answers only",
    "tokens": "tokens:DIR: a pre-tokenized cache built by `mixtral-jax tokenize` (its tokenizer comes with it)",
}, module="mixtral_jax.data.sources")

SOURCE_FORMS = ("python_source or KIND:ARGUMENT with KIND one of "
                + ", ".join(name for name in DATA_SOURCES if name != "python_source"))


def parse_source(source: str) -> tuple[str, str]:
    """A `data.source` value -> (kind, argument): `python_source` takes none, every other kind
    `KIND:ARGUMENT` with a non-blank argument. ConfigError naming the key otherwise."""
    kind, sep, arg = source.partition(":")
    if kind not in DATA_SOURCES or (kind == "python_source") == bool(sep) or (sep and not arg.strip()):
        raise ConfigError(f"config key 'data.source': '{source}' must be {SOURCE_FORMS}"
                          f"{did_you_mean(kind, DATA_SOURCES.names)}")
    return kind, arg


# Implemented in training/optim.py: (OptimConfig, decay steps) -> the schedule after warmup.
SCHEDULES = Registry("optim.schedule", {
    "cosine": "linear warmup, then cosine decay to lr x min_lr_ratio",
    "linear": "linear warmup, then linear decay to lr x min_lr_ratio",
    "constant": "linear warmup, then constant",
}, module="mixtral_jax.training.optim")
NONFINITE_POLICIES = Registry("train.on_nonfinite", {
    "skip": "drop the update, count it, go on (stop after max_consecutive_nonfinite in a row)",
    "stop": "stop at the first non-finite step",
})
FREEZE = Registry("finetune.freeze", {
    "none": "train every weight",
    "router": "router weights get no update and no optimizer state",
    "all_but_experts": "only the expert FFNs train (MoE)",
})
LORA_TARGETS = Registry("finetune.lora.targets", {
    "attention": "the attention projections",
    "experts": "the MoE experts' weights",
    "shared_experts": "the shared experts' weights",
    "mlp": "the dense FFN's weights",
})
WANDB_MODES = Registry("logging.wandb", {
    "off": "no wandb",
    "offline": "wandb writes locally (sync later)",
    "online": "wandb uploads as it goes",
})

# Every config key whose value is one of a registry's names (lists: every element is).
CHOICE_KEYS: dict[str, Registry] = {
    "model.dtype": DTYPES, "model.param_dtype": DTYPES, "model.remat": REMAT_POLICIES,
    "model.attention_impl": ATTENTION_IMPLS, "model.grouped_kernel": GROUPED_KERNELS, "model.qk_norm": QK_NORMS, "model.moe.router": ROUTERS, "model.moe.dispatch": DISPATCHERS,
    "model.moe.router_dtype": DTYPES, "model.moe.aux_loss_scope": AUX_LOSS_SCOPES, "optim.schedule": SCHEDULES,
    "train.on_nonfinite": NONFINITE_POLICIES, "logging.wandb": WANDB_MODES, "finetune.freeze": FREEZE,
    "finetune.lora.targets": LORA_TARGETS,
}
