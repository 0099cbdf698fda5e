"""The typed run configuration: one dataclass per section, every key with its default.

`config/reference.py` generates docs/configs.md from these classes and their comments; the
choices a key takes are declared in `config/choices.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union


@dataclass
class RunConfig:
    name: str = "run"  # the run directory's name under out_dir
    out_dir: str = "runs"  # where run directories live
    seed: int = 0  # model init, data order and router noise


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense FFN
    top_k: int = 2  # experts per token (token-choice routers)
    expert_hidden_dim: Optional[int] = None  # SwiGLU width of each routed expert; null = model.hidden_dim (Mixtral)
    shared_experts: int = 0  # experts every token passes through (DeepSeekMoE, Qwen2-MoE), run as one wide SwiGLU
    shared_hidden_dim: Optional[int] = None  # width of each shared expert; null = the routed experts' width
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)
    first_dense_layers: int = 0  # the first k layers keep the dense FFN (DeepSeek's first_k_dense_replace)
    sparse_every: int = 1  # of the rest, layer i is sparse when (i + 1) % sparse_every == 0 (Qwen decoder_sparse_step)
    dense_layers: list[int] = field(default_factory=list)  # further layer indices with the dense FFN (Qwen mlp_only_layers)
    router: str = "topk_softmax"  # how tokens pick experts
    renormalize: bool = False  # softmax_topk / sigmoid_topk: rescale the k weights to sum to 1
    n_groups: int = 1  # group-limited routing: experts split into this many equal groups (DeepSeek n_group)
    topk_groups: int = 1  # ... of which each token may use the best this many (sum of each group's top-2 scores)
    routed_scaling: float = 1.0  # multiplies the k routing weights (DeepSeek-V3's routed_scaling_factor)
    dispatch: str = "dropless"  # how routed tokens reach the experts
    capacity_factor: float = 1.25  # capacity dispatch and expert choice: slots per expert over the mean load
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss (1.0 at perfect balance)
    aux_loss_scope: str = "batch"  # what f and P of the load-balancing loss are computed over
    z_loss_coef: float = 0.001  # weight of the router z-loss mean(logsumexp(logits)^2)
    bias_update_rate: float = 0.0  # > 0 turns on loss-free balancing
    selection_bias: bool = False  # keep the per-expert selection bias even without updates (imported DeepSeek-V3 / Dots1)
    bias_recenter: bool = False  # after each loss-free update, shift every layer's bias to zero mean
    jitter: float = 0.0  # multiplicative noise in [1 - j, 1 + j] on the router input (training only)
    router_dtype: str = "float32"  # the router's weight and logits


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # at least the tokenizer's vocabulary
    dim: int = 4096  # model (residual stream) width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key / value heads (grouped-query attention); divides n_heads
    head_dim: Optional[int] = 128  # null = dim // n_heads; may differ from it (as in HF configs)
    hidden_dim: int = 14336  # SwiGLU width of the dense FFN and of each expert
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    sliding_window: Optional[int] = None  # positions a token sees, itself included; null = full causal attention
    max_seq_len: int = 4096  # longest sequence (data.seq_len, generation without a window)
    tie_embeddings: bool = False  # the LM head reuses the input embedding
    qk_norm: str = "none"  # RMSNorm on queries and keys before RoPE: none, head (per head: Qwen3), full (OLMoE)
    qkv_bias: bool = False  # a bias on the q / k / v projections (Qwen2)
    dtype: str = "float32"  # compute dtype of the matmuls (norms, softmax, router stay float32)
    param_dtype: str = "float32"  # storage dtype of the parameters (and AdamW's moments)
    remat: str = "none"  # what each layer saves for the backward pass
    # layers per iteration of the layer scan: 1 = a loop, compile time flat in depth; n_layers =
    # fully unrolled (static per-layer weight slices: faster CPU steps, compile time grows with depth);
    # auto = fully unrolled on CPU up to 8 layers, else a loop (Kernels.max_unrolled_layers)
    scan_unroll: Union[int, str] = "auto"
    attention_impl: str = "dot_product"  # which attention kernel runs
    grouped_kernel: str = "auto"  # which grouped matmul the MoE experts run (dropless and capacity dispatch)
    # FP8 (e4m3) matmul inputs, scaled per row / per output channel, straight-through gradients: the
    # expert matmuls and the dense projections (the router stays in its own dtype); docs/performance.md
    fp8: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # head_dim: null means dim // n_heads, resolved here, once, so every reader sees a number.
        # (Left null only when dim is not a multiple of n_heads: validation then names the key.)
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    @property
    def expert_width(self) -> int:
        """SwiGLU width of one routed expert."""
        return self.moe.expert_hidden_dim or self.hidden_dim

    @property
    def shared_width(self) -> int:
        """Total SwiGLU width of the shared experts (0 = none): they run as one FFN."""
        return self.moe.shared_experts * (self.moe.shared_hidden_dim or self.expert_width)

    @property
    def n_sparse_layers(self) -> int:
        """How many layers are sparse, counted without listing them (configs may name billions
        of layers: `params` answers for any size)."""
        if not self.is_moe:
            return 0
        moe, every = self.moe, self.moe.sparse_every
        count = max(0, self.n_layers // every - moe.first_dense_layers // every)
        exempt = {i for i in moe.dense_layers
                  if moe.first_dense_layers <= i < self.n_layers and (i + 1) % every == 0}
        return count - len(exempt)

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its FFN is the MoE block (False: the dense FFN of hidden_dim)."""
        moe, dense = self.moe, set(self.moe.dense_layers)
        return tuple(self.is_moe and i >= moe.first_dense_layers and (i + 1) % moe.sparse_every == 0
                     and i not in dense for i in range(self.n_layers))


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing sentencepiece model; None = train one (cached)
    train_bytes: int = 8_000_000  # how much training text the BPE trainer sees
    byte_fallback: bool = True  # unknown characters become byte pieces (as Mistral's tokenizer)


@dataclass
class MixtureSource:
    name: str = ""  # the source's name in metrics (data/tokens/NAME, eval_loss/NAME)
    source: str = ""  # any data.source value (python_source, jsonl:PATH, tokens:DIR, ...)
    weight: float = 1.0  # its share of training tokens (weights are normalised to sum to 1)


@dataclass
class DataConfig:
    source: str = "python_source"  # where documents come from
    # several sources in place of data.source (leave that at its default), each {name: metric suffix,
    # source: a data.source value, weight: its share of training tokens (normalised to sum 1)};
    # logs data/tokens/NAME and eval_loss/NAME (docs/data.md)
    mixture: list[MixtureSource] = field(default_factory=list)
    text_key: str = "text"  # the text field of tfds and jsonl records
    seq_len: int = 256  # tokens per training row
    batch_size: int = 8  # rows per step, over all devices and processes
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: bool = True  # pack documents into full rows (attention never crosses a document)
    num_workers: int = 0  # grain worker processes (0 = in the training process)
    shuffle_buffer_docs: int = 0  # 0 = full global shuffle of documents


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr x this
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "cosine"  # the decay after warmup
    weight_decay: float = 0.1  # AdamW decay on matrices (not norm scales)
    b1: float = 0.9  # AdamW
    b2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    clip_norm: float = 1.0  # global gradient-norm clip (0 = off)
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run
    eval_every: int = 100  # held-out loss every this many steps (and at the last)
    eval_batches: int = 8  # held-out batches per evaluation
    log_every: int = 10  # a metrics.jsonl record (means over the window) every this many steps
    checkpoint_every: int = 200  # a checkpoint every this many steps (and at the last, and on SIGINT / SIGTERM)
    keep_checkpoints: int = 3  # newest checkpoints kept
    init_from: Optional[str] = None  # a run dir (or checkpoint dir) to start from, fresh optimizer: fine-tuning
    on_nonfinite: str = "skip"  # what a step with a non-finite loss or gradient does
    max_consecutive_nonfinite: int = 10  # skip policy: stop after this many bad steps in a row
    # lm-eval-harness tasks (names, groups, tags or globs) run on the weights during training, logged
    # as downstream/TASK/METRIC; empty = none (docs/evaluation.md)
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0  # run eval_tasks every this many steps and at the last; 0 = only at the last
    eval_tasks_limit: Optional[int] = None  # at most this many documents per task; null = all
    eval_tasks_num_fewshot: Optional[int] = None  # few-shot examples per prompt; null = each task's default
    eval_tasks_include_path: Optional[str] = None  # a folder (or YAML file) of task configs of your own, for eval_tasks


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = off; > 0 trains low-rank adapters only (base weights frozen)
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])  # which weights get adapters


@dataclass
class FinetuneConfig:
    freeze: str = "none"  # which weights stay fixed in full fine-tuning
    router_lr_scale: float = 1.0  # the router's learning rate = optim.lr x this
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class MeshConfig:
    data: int = -1  # within a slice (ICI); -1 = fill the slice's remaining devices
    fsdp: int = 1  # parameters and optimizer state split over these devices (and the batch)
    expert: int = 1  # experts split over these devices (all-to-all dispatch; the batch too)
    tensor: int = 1  # hidden units split over these devices (Megatron)
    # Across slices (DCN) for multi-slice TPU / multi-node runs: each axis is ici x dcn in total;
    # the product of the dcn_ values must equal the number of slices (processes on GPU clusters).
    dcn_data: int = 1  # data-parallel replicas across slices
    dcn_fsdp: int = 1  # fsdp across slices
    dcn_expert: int = 1  # expert parallelism across slices
    dcn_tensor: int = 1  # tensor parallelism across slices


@dataclass
class CostConfig:
    hardware: str = "auto"  # the device MFU and cost are computed for (auto: the one the run is on)
    peak_tflops: Optional[float] = None  # overrides the hardware table's peak (hardware is then a label)
    price_per_device_hour: float = 2.0  # dollars, for cost_usd


@dataclass
class LoggingConfig:
    wandb: str = "off"  # wandb logging mode
    wandb_project: str = "mixtral_jax"  # the wandb project runs are logged to
    progress: bool = True  # a progress bar on the terminal


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


