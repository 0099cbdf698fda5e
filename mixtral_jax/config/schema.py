"""The typed run configuration: one dataclass per section, every key with its default.

`config/reference.py` generates docs/configs.md from these classes and their comments; the
choices a key takes are declared in `config/choices.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense FFN
    top_k: int = 2
    router: str = "topk_softmax"
    renormalize: bool = False  # softmax_topk only: rescale the k weights to sum to 1
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    aux_loss_scope: str = "batch"  # batch (Switch/GShard, global batch) | sequence (per sequence, averaged)
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # > 0 turns on loss-free balancing
    jitter: float = 0.0
    router_dtype: str = "float32"


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: Optional[int] = 128  # null = dim // n_heads; may differ from it (as in HF configs)
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None  # None = full causal attention
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # layers per iteration of the layer scan: 1 = a loop, compile time flat in depth; n_layers =
    # fully unrolled, static per-layer weight slices (CPU step 0.94x at 4 layers), compile grows
    scan_unroll: int = 1
    # plain: our einsum attention (scores materialised) | dot_product: jax.nn.dot_product_attention's
    # library kernel where one supports the shapes (cuDNN flash on NVIDIA GPUs, 16-bit; on Hopper
    # with packed documents as cuDNN's segment layout, kernels/packed_attention.py), else plain
    attention_impl: str = "dot_product"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # head_dim: null means dim // n_heads, resolved here, once, so every reader sees a number.
        # (Left null only when dim is not a multiple of n_heads: validation then names the key.)
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing sentencepiece model; None = train one (cached)
    train_bytes: int = 8_000_000  # how much training text the BPE trainer sees
    byte_fallback: bool = True


@dataclass
class DataConfig:
    source: str = "python_source"
    text_key: str = "text"
    seq_len: int = 256
    batch_size: int = 8
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: bool = True
    num_workers: int = 0
    shuffle_buffer_docs: int = 0  # 0 = full global shuffle of documents


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    init_from: Optional[str] = None
    on_nonfinite: str = "skip"  # skip: drop the update, count it, go on | stop: stop at the first bad step
    max_consecutive_nonfinite: int = 10  # skip policy: stop after this many bad steps in a row


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = off; > 0 trains low-rank adapters only (base weights frozen)
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])  # of attention | experts | mlp


@dataclass
class FinetuneConfig:
    freeze: str = "none"  # none | router | all_but_experts (full fine-tuning of the rest)
    router_lr_scale: float = 1.0  # the router's learning rate = optim.lr x this
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class MeshConfig:
    data: int = -1  # within a slice (ICI); -1 = fill the slice's remaining devices
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    # Across slices (DCN) for multi-slice TPU / multi-node runs: each axis is ici x dcn in total;
    # the product of the dcn_ values must equal the number of slices (processes on GPU clusters).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1


@dataclass
class CostConfig:
    hardware: str = "auto"
    peak_tflops: Optional[float] = None
    price_per_device_hour: float = 2.0


@dataclass
class LoggingConfig:
    wandb: str = "off"
    wandb_project: str = "mixtral_jax"
    progress: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


