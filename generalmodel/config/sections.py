"""The typed config tree: one pydantic section per stage (data, model, optim, train, storage, ray,
parallel, tracking) under `Config`. Defaults live here; presets and overrides are applied by `loading`."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from generalmodel import UserError
from generalmodel.tokens import MIN_VOCAB_SIZE
from models import REGISTRY
from models.llama import LlamaConfig


class ConfigError(UserError):
    """A bad preset, key or value."""


# A list option that also takes a single value: --prompt="text" means ["text"].
Strings = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


def _custom_resources(v: dict[str, float]) -> dict[str, float]:
    builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(v)
    if builtin:
        raise ValueError(f"{sorted(builtin)} have options of their own; name custom resources only")
    bad = {k: n for k, n in v.items() if not n > 0}
    if bad:
        raise ValueError(f"resource amounts must be > 0, got {bad}")
    return v


# Custom Ray resources a process reserves ({name: amount}): only nodes started with them (`ray start
# --resources='{"rollout": 8}'`, a KubeRay group's rayStartParams) can hold it.
Resources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where datasets and checkpoints live. Credentials default to the standard AWS env vars."""

    root: str = Field(
        ".generalmodel/store",
        description="The embedded default store: relative dataset/checkpoint names live under it "
        "(a local path, file:// or s3://bucket/prefix).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint of an S3-compatible server, e.g. http://127.0.0.1:7480 "
        "(default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS).",
    )
    region: str | None = Field(
        None, description="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)."
    )
    access_key_id: SecretStr | None = Field(
        None, description="S3 access key (default: $AWS_ACCESS_KEY_ID). Never logged."
    )
    secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key (default: $AWS_SECRET_ACCESS_KEY). Never logged."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout in seconds.")
    request_timeout_s: float = Field(60.0, gt=0, description="S3 request timeout in seconds.")
    retry_timeout_s: float = Field(
        120.0,
        ge=0,
        description="How long a running job's store I/O (checkpoints, shard reads, exports) retries a failing "
        "S3 endpoint, with backoff, before the run fails.",
    )

    def resolved(self) -> StorageConfig:
        """A copy with env-var defaults filled in, so that Ray tasks on other nodes (which do
        not share the driver's environment) see the same endpoint and credentials."""
        env = os.environ
        root = self.root
        if "://" not in root:  # processes with another cwd (Ray workers) must see the same path
            root = os.path.abspath(root)
        return self.model_copy(
            update={
                "root": root,
                "endpoint_url": self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                "region": self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                "access_key_id": self.access_key_id or _secret(env.get("AWS_ACCESS_KEY_ID")),
                "secret_access_key": self.secret_access_key or _secret(env.get("AWS_SECRET_ACCESS_KEY")),
            }
        )


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


# Names of generalmodel.data.quality.FILTERS (the config is checked before the data layer is imported).
QUALITY_FILTERS = ("gopher_quality", "gopher_repetition", "c4")


class DataConfig(Section):
    """Corpus preparation: source → tokenizer → packed Parquet shards + manifest."""

    source: str = Field(
        "sotu",
        description="The corpus: 'sotu' (built in), a local file/dir/glob or s3:// prefix of "
        ".txt/.jsonl/.parquet files, a datasets.save_to_disk dir, or 'hf:OWNER/NAME' (online).",
    )
    text_field: str = Field("text", description="Text column of .jsonl/.parquet/HF sources.")
    hf_config: str = Field("default", description="Config (subset) of an hf: source.")
    hf_split: str = Field("train", description="Split of an hf: source or a saved DatasetDict.")
    output: str | None = Field(
        None,
        description="Dataset URI to write (default: <storage.root>/datasets/<source name>); "
        "relative paths live under storage.root.",
    )
    overwrite: bool = Field(False, description="Replace an existing dataset at data.output.")
    tokenizer: str | None = Field(
        None,
        description="Use this tokenizer instead of training one: a tokenizer.json (path or URI) or a directory "
        "holding one (e.g. a Hugging Face model's); it needs an end-of-sequence token. `bytes`: one token per "
        "UTF-8 byte (263 tokens with the special ones; byte-level models).",
    )
    vocab_size: int = Field(8192, description="BPE vocabulary size, special tokens included.")
    seq_len: int = Field(256, gt=0, description="Tokens per training example (rows hold seq_len+1).")
    val_fraction: float = Field(
        0.02, ge=0, lt=1, description="Fraction of documents (by content hash) in the val split."
    )
    tokenizer_sample_mb: float = Field(
        64.0, gt=0, description="Text (MB) the tokenizer is trained on: a deterministic sample."
    )
    shard_input_mb: float = Field(
        64.0,
        gt=0,
        description="Upper bound on the raw text (MB) behind one output shard; small corpora "
        "use smaller shards so that every CPU gets work.",
    )
    format: Literal["text", "chat", "preference"] = Field(
        "text",
        description="What the source holds: text documents (pretraining), chat conversations (SFT: rows of "
        "`messages: [{role, content}]`) or preference pairs (DPO: `prompt`/`chosen`/`rejected`, strings or "
        "message lists). Chat and preference sources are .jsonl/.parquet files or hf: datasets.",
    )
    messages_field: str = Field("messages", description="chat: the column holding a row's list of messages.")
    tools: bool = Field(
        False,
        description="chat: the conversations use tools (a row's `tools`, assistants' `tool_calls`, `tool` turns; "
        "see docs/tools.md): the SFT job adds the tool tokens to a tokenizer that lacks them.",
    )
    truncation: Literal["right", "drop"] = Field(
        "right",
        description="chat/preference rows longer than seq_len+1 tokens: 'right' cuts the end (the response, for "
        "pairs; a row left with no supervised token is dropped), 'drop' drops the row. Both are counted.",
    )
    packing: bool = Field(
        False,
        description="chat: several whole conversations per row (first fit; later ones attend to earlier ones in "
        "the row, as packed pretraining documents do) instead of one conversation per padded row.",
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="chat/preference: a malformed row is an error naming its file and line, or (skip) is "
        "skipped and counted in the manifest.",
    )
    split_key: str | None = Field(
        None,
        description="chat/preference: rows with the same value of this field land in the same split (e.g. a "
        "source document id, for a held-out split by document); default: each row by its content.",
    )
    dedup: Literal["none", "exact", "near"] = Field(
        "none",
        description="text: drop duplicate documents across the whole corpus (the first is kept): exact (the same "
        "text up to case, punctuation and spacing) or near (exact, and MinHash-LSH near duplicates).",
    )
    dedup_threshold: float = Field(
        0.75, gt=0, le=1, description="near: the estimated Jaccard similarity (of word shingles) that is a duplicate."
    )
    dedup_ngram: int = Field(5, gt=0, description="near: words per shingle.")
    dedup_num_perm: int = Field(128, ge=16, description="near: MinHash permutations (precision vs memory).")
    filters: Strings = Field(
        default_factory=list,
        description="text: heuristic quality filters a document must pass: gopher_quality, gopher_repetition, c4.",
    )
    decontaminate: Strings = Field(
        default_factory=list,
        description="text: evaluation files (.jsonl: every string of every row; or text) whose word n-grams a "
        "training document must not share (e.g. a HellaSwag-format task file).",
    )
    decontaminate_ngram: int = Field(13, gt=0, description="Words per n-gram of decontamination.")
    removed_samples: int = Field(3, ge=0, description="Removed documents kept in the manifest per reason.")
    difficulty: Literal["none", "compression", "length"] = Field(
        "none",
        description="text: score each document (compression: its zlib-compressed size over its size, low = "
        "repetitive = easy; length: its words) and keep those whose score is in difficulty_quantiles: a "
        "curriculum prepares one dataset per bucket and mixes them by stage (docs/data.md).",
    )
    difficulty_quantiles: tuple[float, float] = Field(
        (0.0, 1.0),
        description="difficulty: the [low, high) quantiles of the score (over the corpus sample the driver reads, "
        "the same for every bucket) a document must fall between, e.g. [0, 0.33] for the easiest third.",
    )

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in QUALITY_FILTERS]
        if unknown:
            raise ValueError(f"no filter named {unknown[0]!r}; filters: {', '.join(QUALITY_FILTERS)}")
        return names

    @model_validator(mode="after")
    def _text_only(self) -> DataConfig:
        if self.format != "text" and (
            self.dedup != "none" or self.filters or self.decontaminate or self.difficulty != "none"
        ):
            raise ValueError(
                "data.dedup, data.filters, data.decontaminate and data.difficulty are for text; "
                f"format is {self.format!r}"
            )
        low, high = self.difficulty_quantiles
        if not 0 <= low < high <= 1:
            raise ValueError(f"data.difficulty_quantiles {[low, high]}: need 0 <= low < high <= 1")
        return self

    @field_validator("vocab_size")
    @classmethod
    def _vocab_holds_bytes(cls, v: int) -> int:
        if v < MIN_VOCAB_SIZE:
            raise ValueError(f"must be at least {MIN_VOCAB_SIZE} (256 byte tokens + the special tokens)")
        if v > 2**32:
            raise ValueError("must fit in uint32")
        return v


class RayConfig(Section):
    """How jobs reach Ray, and the training worker group."""

    address: str | None = Field(
        None,
        description="Ray cluster address ('auto', ray://host:10001, host:6379); "
        "default: $RAY_ADDRESS, else a local cluster started for this job.",
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local cluster started when no address is given.")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (data-parallel ranks); elastic: the most.")
    min_workers: int | None = Field(
        None,
        gt=0,
        description="Elastic (Ray Train's elastic scaling): the fewest workers the run goes on with when nodes "
        "are lost; it grows back to num_workers when they return. The global batch stays batch_size x "
        "grad_accum x num_workers (each rank accumulates more micro-batches), so every size from min_workers "
        "to num_workers must divide num_workers x grad_accum. null: a fixed group of num_workers.",
    )
    resize_interval_s: float = Field(
        60.0,
        ge=0,
        description="Elastic: how often a healthy run looks for room to grow (a resize restarts "
        "the worker group from its last checkpoint).",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each train worker reserves.")
    use_gpu: bool = Field(False, description="One GPU per train worker (NCCL); else CPU and gloo.")
    worker_resources: Resources = Field(
        {},
        description="Custom Ray resources each train worker reserves besides its CPUs/GPU, e.g. {learner: 1}: only "
        "nodes that advertise them hold the workers (with rl.rollout_resources, RL's learner and rollouts on nodes "
        "of their own).",
    )
    max_failures: int = Field(
        2, ge=-1, description="Restarts of the worker group from the last checkpoint after a failure (-1: no limit)."
    )
    verbose: bool = Field(
        False,
        description="Stream every Ray worker's own output (tracebacks, Ray's logs) to this console. Off: "
        "the workers' log lines are forwarded and a failure's tracebacks go to a log file.",
    )

    @model_validator(mode="after")
    def _elastic_range(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"ray.min_workers={self.min_workers} is more than ray.num_workers={self.num_workers}")
        return self


class ParallelConfig(Section):
    """How the train workers (ray.num_workers ranks) are laid out as a device mesh. Every rank is a
    data-parallel rank: `replicate` groups of `shard` ranks. FSDP2 shards the weights, gradients
    and optimizer state over the ranks of a group and keeps one copy per group: replicate=1 is
    plain FSDP over all ranks; replicate>1 is HSDP (gradients reduce-scattered inside a group,
    all-reduced across groups). Put a group on one node (shard = the workers of a node) so that
    the per-layer all-gathers stay on the fast links and only the gradient all-reduce crosses nodes."""

    replicate: int = Field(1, description="Data-parallel replicas (HSDP across nodes); -1: the world size / shard.")
    shard: int = Field(-1, description="Ranks each replica shards over (FSDP2); -1: the world size / replicate.")
    expert: int = Field(
        1,
        description="Expert-parallel degree: the routed experts of every MoE layer split over groups of this many "
        "ranks inside each shard group (tokens sent to them and back by all-to-all); FSDP2 shards each rank's "
        "experts over the rest of its shard group. 1: the experts are sharded like any weight.",
    )
    tensor: int = Field(
        1,
        description="Tensor-parallel degree: each dense block's attention split by heads and its MLP by columns over "
        "groups of this many consecutive ranks (innermost: on one node), the head by vocabulary; those ranks see the "
        "same batch. replicate x shard x tensor = the world size. 1: no tensor parallelism.",
    )
    sequence_parallel: bool = Field(
        True,
        description="With parallel.tensor > 1: the residual stream between the split layers is split along the "
        "sequence over the tensor ranks (norms and residual adds on 1/tensor of the positions; each block's "
        "all-reduces become an all-gather and a reduce-scatter). False: replicated on every tensor rank.",
    )
    shard_within_node: bool = Field(
        False,
        description="Refuse a mesh whose shard groups would span nodes (checked before the workers start "
        "against the nodes' capacity, and on the workers against Ray Train's node ranks).",
    )

    @field_validator("expert", "tensor")
    @classmethod
    def _inner_degree(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be a positive number of ranks (1: not split)")
        return v

    @field_validator("replicate", "shard")
    @classmethod
    def _degree(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of ranks, or -1 (the world size / the other degree)")
        return v

    @model_validator(mode="after")
    def _one_free(self):
        if self.replicate == -1 and self.shard == -1:
            raise ValueError("parallel.replicate and parallel.shard cannot both be -1: give one of them")
        return self


class OptimConfig(Section):
    """The optimizer (AdamW, or Muon for the hidden matrices) and the learning-rate schedule."""

    name: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW for every parameter; muon: Muon for the blocks' weight matrices and MoE expert "
        "stacks, AdamW (optim.lr) for embeddings, head, norms and biases.",
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW's; every group's unless set below).")
    embed_lr: float | None = Field(None, gt=0, description="Peak LR of the token (and position) embedding; null: lr.")
    head_lr: float | None = Field(None, gt=0, description="Peak LR of an untied output head; null: lr.")
    muon_lr: float = Field(0.02, gt=0, description="muon: peak LR of the matrices (scaled per muon_scaling).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum.")
    muon_scaling: Literal["keller", "moonlight"] = Field(
        "keller",
        description="muon: update scale per matrix: keller √max(1, rows/cols); moonlight 0.2·√max(rows, cols), "
        "which matches AdamW's update RMS (AdamW's LR and weight decay carry over).",
    )
    muon_weight_decay: float | None = Field(
        None, ge=0, description="muon: decoupled weight decay of the matrices (× muon_lr); null: weight_decay."
    )
    muon_ns_steps: int = Field(5, gt=0, le=20, description="muon: orthogonalisation iterations.")
    muon_orthogonalizer: Literal["newton_schulz", "polar_express"] = Field(
        "newton_schulz",
        description="muon: newton_schulz repeats Muon's published quintic; polar_express (arXiv 2505.16932) uses "
        "a quintic per iteration, each the minimax-best for where the singular values are by then.",
    )
    muon_ns_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",
        description="muon: precision of the Newton–Schulz iteration. bfloat16 is the published recipe; "
        "float32 makes runs on different meshes agree to fp32 rounding (bf16 amplifies it to ~1%).",
    )
    grad_filter: Literal["none", "ema"] = Field(
        "none",
        description="Grokfast (arXiv 2405.20233), its EMA filter: ema adds grad_filter_lambda times an exponential "
        "moving average of each gradient back to it before the optimizer (AdamW or Muon) uses it, amplifying its "
        "slow component; none: off.",
    )
    embed_head_every: int = Field(
        1,
        ge=1,
        description="The speedrun's accumulation for the embedding and the untied head: they step every N "
        "optimizer steps, on the mean of those steps' (clipped) gradients; every other weight steps every step. "
        "train.checkpoint_every must be a multiple of N (a checkpoint never holds half a window).",
    )
    grad_filter_alpha: float = Field(0.98, ge=0, lt=1, description="grad_filter ema: the average's decay per step.")
    grad_filter_lambda: float = Field(2.0, ge=0, description="grad_filter ema: the amplification (the paper: 2-5).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay for matrices (not norms, biases).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm to this (0: off).")
    schedule: Literal["cosine", "wsd", "linear", "constant"] = Field(
        "cosine", description="After warmup: cosine or linear decay, WSD (stable, then decay), or constant."
    )
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: fraction of the steps spent decaying.")


class TrainConfig(Section):
    """The training loop."""

    dataset: str | None = Field(
        None, description="Dataset URI (default: the data section's output, prepared if missing)."
    )
    init_from: str | None = Field(
        None,
        description="Start from this model instead of a random init: models:/NAME/VERSION (or /latest), "
        "models:/NAME@ALIAS, runs:/ID, an export directory, or a transformers Llama/GPT-2 directory. The model "
        "config and tokenizer come from it.",
    )
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    seed: int = Field(0, description="Seeds the model init and the data order.")
    eval_every: int = Field(50, gt=0, description="Evaluate on the val split every N steps (and at the end).")
    eval_batches: int = Field(8, gt=0, description="Val batches per evaluation (per worker).")
    log_every: int = Field(10, gt=0, description="Report metrics every N steps.")
    checkpoint_every: int = Field(100, ge=0, description="Checkpoint every N steps (0: only at the end).")
    checkpoint_dir: str | None = Field(
        None, description="Checkpoint URI (default: <storage.root>/checkpoints/<train.run_name>)."
    )
    run_name: str = Field("pretrain", description="Names the run, its checkpoints and its MLflow run.")
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto: continue an unfinished run from its newest complete checkpoint (a finished run is "
        "refused); never: start fresh (refused where checkpoint_dir already holds checkpoints).",
    )
    keep_last: int = Field(
        3, ge=1, description="Complete checkpoints kept; older ones are deleted after a newer one is published."
    )
    sample_prompts: list[str] = Field(
        ["Fellow citizens,", "The state of the Union"],
        description="Prompts the pretrain job samples from the registered model at the end ([]: none).",
    )
    answer_eval: int = Field(
        200,
        ge=0,
        description="SFT/DPO jobs: held-out rows whose last answer is generated by the model before and after "
        "training and compared with the row's (exact match; 0: off).",
    )
    max_bad_steps: int = Field(
        5, gt=0, description="Stop after this many steps in a row with a NaN/inf loss or gradient (each is skipped)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    compile: Literal["none", "regional", "full"] = Field(
        "none", description="torch.compile: regional (each block; fast to compile) or full (the whole model)."
    )
    attention: Literal["auto", "flash", "efficient", "cudnn", "math", "flex"] = Field(
        "auto",
        description="auto: SDPA picks per shape; flash/efficient/cudnn/math: that SDPA backend only "
        "(benchmarks/gpu_train.py times them); flex: FlexAttention with block masks, so sliding-window "
        "layers skip what is outside their window (GQA layers; fast under train.compile).",
    )
    document_mask: bool = Field(
        False,
        description="Packed rows hold several documents: each attends only within itself and its positions "
        "restart at 0 (text: a document ends with its EOS; chat: the conversations data.packing put in a row). "
        "false: a row is one sequence, later documents see earlier ones.",
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="0: the head and cross-entropy over all positions at once (compiled with the model under "
        "train.compile); N: in chunks of N positions with the gradient made in the same pass, never more than "
        "N x vocab logits (models/loss.py).",
    )
    token_selection: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Rho-1 (selective language modelling): the fraction of each row's supervised tokens "
        "the loss keeps, those whose loss most exceeds train.selection_reference's on the same token (0.6: 60%); "
        "1: every token, the plain loss. Validation losses stay over every token.",
    )
    selection_reference: str | None = Field(
        None,
        description="Rho-1: the reference model (models:/NAME/VERSION, runs:/ID, an export directory), tokenized "
        "like the dataset; its loss on every token is computed once by a Ray Data pass and stored beside the "
        "dataset (reused by later runs).",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations in backward: every block (full) or every ac_every-th (selective)."
    )
    ac_every: int = Field(2, gt=0, description="Selective activation checkpointing: blocks 0, k, 2k, ... recompute.")
    fp8: Literal["none", "tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        "none", description="fp8 linears via torchao (CUDA, compute capability >= 8.9; the 'gpu' extra)."
    )
    fp8_min_dim: int = Field(
        2048, gt=0, description="fp8: linears with in or out features below this stay bf16 (too small to gain)."
    )
    metrics_log: str | None = Field(
        None, description="Also append every report as a JSON line to this local file (rank 0)."
    )
    window_warmup_steps: int = Field(
        0,
        ge=0,
        description="The speedrun's window-size warmup: the sliding-window layers' window grows linearly from "
        "train.window_warmup_start to model.window over this many steps, in multiples of the start (0: off).",
    )
    window_warmup_start: int = Field(
        64, gt=0, description="The window at step 0 of the warmup, and the step its size grows by (tokens)."
    )
    batch_warmup_steps: int = Field(
        0,
        ge=0,
        description="A batch-size schedule: the micro-batches each rank accumulates per optimizer step grow "
        "linearly from train.batch_warmup_start x train.grad_accum (rounded up) to train.grad_accum over this "
        "many steps; the rows of a micro-batch, so every compiled shape, stay (0: off).",
    )
    batch_warmup_start: float = Field(
        0.25, gt=0, le=1, description="The global batch at step 0 of the batch warmup, as a share of the full one."
    )
    adapter: Literal["none", "svf"] = Field(
        "none",
        description="svf: Transformer2's singular-value fine-tuning of train.init_from: its weights stay frozen, a "
        "vector scaling the singular values of each linear in train.adapter_targets trains, and the registry stores "
        "only the vectors, as a version naming its base (models/svf.py; docs/adapters.md).",
    )
    adapter_targets: list[str] = Field(
        ["blocks.*"],
        min_length=1,
        description="train.adapter: the linear layers adapted, as fnmatch patterns of module names "
        "(blocks.*: every linear of every block; blocks.*.mlp.*: the MLPs only).",
    )
    fail_at_step: int | None = Field(
        None, description="Testing aid: rank 0 raises once at this step (a run that did not resume)."
    )
    nan_grad_at_step: int | None = Field(
        None, description="Testing aid: rank 0 writes NaN into a gradient at this step (the step must be skipped)."
    )

    @field_validator("compile", "activation_checkpointing", mode="before")
    @classmethod
    def _booleans(cls, v: Any, info) -> Any:
        """The earlier boolean forms: true = per block (regional compile, full checkpointing)."""
        if isinstance(v, bool):
            return ("regional" if info.field_name == "compile" else "full") if v else "none"
        return v

    @model_validator(mode="after")
    def _selection_has_a_reference(self) -> TrainConfig:
        if self.token_selection < 1 and self.selection_reference is None:
            raise ValueError(
                f"token_selection={self.token_selection} keeps the tokens whose loss most exceeds a reference "
                "model's: set train.selection_reference (models:/NAME/VERSION, runs:/ID or an export directory)"
            )
        if self.token_selection == 1 and self.selection_reference is not None:
            raise ValueError(
                "selection_reference is set but token_selection is 1 (every token counts, the reference is "
                "unused): set train.token_selection below 1, e.g. 0.6, or drop the reference"
            )
        return self

    @model_validator(mode="after")
    def _adapter_has_a_base(self) -> TrainConfig:
        if self.adapter != "none" and self.init_from is None:
            raise ValueError(
                f"adapter={self.adapter!r} adapts a trained model and keeps its weights: set train.init_from "
                "(e.g. models:/llama-tiny/1)"
            )
        if self.adapter != "none" and self.fp8 != "none":
            raise ValueError(f"adapter={self.adapter!r} with fp8={self.fp8!r}: the adapted linears stay bf16; drop one")
        return self

    @model_validator(mode="after")
    def _fp8_needs_cuda(self) -> TrainConfig:
        if self.fp8 != "none" and self.device == "cpu":
            raise ValueError(
                f"fp8={self.fp8!r} needs a CUDA GPU with fp8 tensor cores; device is 'cpu' (use fp8: none)"
            )
        return self


class MixtureStage(Section):
    """A later stage of a mixture: its weights from a step or a token count of the run on."""

    weights: dict[str, float] = Field(description="Dataset name -> weight (relative; a name left out weighs 0).")
    start_step: int | None = Field(None, gt=0, description="The stage starts at this optimizer step.")
    start_tokens: int | None = Field(None, gt=0, description="The stage starts after this many training tokens.")

    @model_validator(mode="after")
    def _one_start(self) -> MixtureStage:
        if (self.start_step is None) == (self.start_tokens is None):
            raise ValueError("a stage starts at start_step or at start_tokens (exactly one of them)")
        return self

    @property
    def start(self) -> tuple[str, int]:
        return ("step", self.start_step) if self.start_step is not None else ("tokens", self.start_tokens)


class MixtureConfig(Section):
    """Several prepared datasets read as one stream (one tokenizer and row length), in proportions that
    may change by stage: a curriculum, e.g. an annealing stage that up-weights curated data at the end.
    Each worker reads only its rows of each dataset; the stream is a function of train.seed and the
    stages, so a run resumes exactly mid-stage and at another world size."""

    datasets: dict[str, str] = Field(
        default_factory=dict,
        description="Name -> prepared dataset URI (relative names live under storage.root), e.g. "
        "{web: datasets/web, books: datasets/books}; empty: no mixture (train.dataset or the data section's).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="The first stage's weights, name -> weight (relative; a name left out weighs 0); "
        "empty: equal weights.",
    )
    stages: list[MixtureStage] = Field(
        default_factory=list,
        description="Later stages in order, each {weights: {...}, start_step: N} or {..., start_tokens: N}.",
    )
    exhausted: Literal["repeat", "error"] = Field(
        "repeat",
        description="A dataset whose train rows are all used: repeat it (a new epoch in a new order, counted "
        "per dataset) or stop the run with an error naming it.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MixtureConfig:
        if not self.datasets:
            if self.weights or self.stages:
                raise ValueError("mixture.weights and mixture.stages need mixture.datasets")
            return self
        for name in self.datasets:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"mixture dataset name {name!r}: use letters, digits, '_' and '-' (it names metrics)")
        stages = [("mixture.weights", self.weights or dict.fromkeys(self.datasets, 1.0))]
        stages += [(f"mixture.stages[{i}].weights", s.weights) for i, s in enumerate(self.stages)]
        for where, weights in stages:
            unknown = sorted(set(weights) - set(self.datasets))
            if unknown:
                raise ValueError(f"{where}: {unknown[0]!r} is not in mixture.datasets ({', '.join(self.datasets)})")
            bad = {k: w for k, w in weights.items() if not w >= 0 or w == float("inf")}
            if bad:
                raise ValueError(f"{where}: weight {bad} must be a finite number >= 0")
            if sum(weights.values()) <= 0:
                raise ValueError(f"{where}: the weights are all zero; at least one dataset needs a weight > 0")
        units = {s.start[0] for s in self.stages}
        if len(units) > 1:
            raise ValueError("mixture.stages: give every stage's start in the same unit (start_step or start_tokens)")
        starts = [s.start[1] for s in self.stages]
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"mixture.stages: the starts {starts} must increase, stage after stage")
        return self

    def stage_weights(self) -> list[dict[str, float]]:
        """Each stage's weights over every dataset (in mixture.datasets order), normalised to sum to 1."""
        out = []
        for weights in [self.weights or dict.fromkeys(self.datasets, 1.0), *(s.weights for s in self.stages)]:
            total = sum(weights.values())
            out.append({name: weights.get(name, 0.0) / total for name in self.datasets})
        return out


class DpoConfig(Section):
    """Direct preference optimisation (the objective of a preference dataset; jobs/dpo.py)."""

    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: -log σ(β·margin) (DPO); ipo: (margin/len - 1/(2β))² on length-normalised log-ratios "
        "(IPO, as TRL computes it).",
    )
    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference.")
    sft_weight: float = Field(
        0.0, ge=0, description="Adds this times the chosen responses' mean token NLL to the loss (RPO; 0: off)."
    )
    reference: Literal["precomputed", "online"] = Field(
        "precomputed",
        description="precomputed: the reference's log-probs come from one Ray Data pass over the dataset, stored "
        "beside it (the reference never occupies training memory); online: a frozen copy runs on every worker.",
    )


class RlConfig(Section):
    """Reinforcement learning with verifiable rewards (GRPO; jobs/rl.py). The prompts are data.source
    (rows with `prompt`: a string or a message list, plus the fields the verifiers read, e.g.
    `answer`); a step samples rl.group_size completions for each of rl.prompts_per_step prompts."""

    prompt_field: str = Field("prompt", description="The column holding a row's prompt (a string or messages).")
    eval_source: str | None = Field(
        None,
        description="Held-out prompts (same format as data.source); default: the val split of data.source "
        "(data.val_fraction, data.split_key).",
    )
    eval_prompts: int = Field(
        256,
        ge=0,
        description="Held-out prompts scored (greedy) at each evaluation, taken at even strides over the "
        "held-out set (0: none).",
    )
    eval_every: int = Field(10, gt=0, description="Held-out accuracy every N steps (and at step 0 and the end).")
    eval_samples: int = Field(
        0,
        ge=0,
        description="At the first and the last held-out evaluation, also sample k completions per prompt (at "
        "rl.temperature): pass@1 sampled and pass@k beside the greedy accuracy (k = 8 and 32 where k < n, "
        "estimated from the n samples, and n), and the share of the starting model's greedy -> pass@8 gap (pass@n "
        "under 8) the run closed (0: greedy only).",
    )
    prompts_per_step: int = Field(16, gt=0, description="Prompts per step, over all learner ranks.")
    group_size: int = Field(8, gt=1, description="Completions sampled per prompt (G): the group advantages compare.")
    skip_uniform_for: int = Field(
        0,
        ge=0,
        description="Skip a training prompt for this many steps after a group of it got equal rewards (all right "
        "or all wrong: no gradient); then it is tried again (a curriculum by pass rate). 0: every prompt in turn.",
    )
    oversample: float = Field(
        1.0,
        ge=1,
        description="DAPO's dynamic sampling: sample the groups of this many times rl.prompts_per_step prompts and "
        "train on rl.prompts_per_step of them, those with unequal rewards first (1: off; costs this many times "
        "the rollouts).",
    )
    max_new_tokens: int = Field(32, gt=0, description="Completion budget (tokens, the end-of-turn token included).")
    temperature: float = Field(1.0, gt=0, description="Rollout temperature; the learner's policy is softmax(logits/T).")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"exact_number": 1.0},
        description="Verifier -> weight; the reward is the weighted sum. Built in: exact_number (the last number of "
        "the completion equals the row's `answer`), answer_format (the completion is 'The answer is N.'), "
        "math_verify (the math-verify extra); or 'module:function' taking (prompt, completion, **fields).",
    )
    scale_rewards: bool = Field(
        True, description="Divide the group-centred rewards by the group's std (GRPO); false: Dr. GRPO's advantages."
    )
    loss_type: Literal["token", "sequence", "dr_grpo"] = Field(
        "token",
        description="token: mean over every completion token of the step (DAPO); sequence: per-sequence mean, then "
        "the mean over sequences (the GRPO paper); dr_grpo: the token sum over (sequences x rl.max_new_tokens).",
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip: [1 - eps, 1 + eps_high].")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); default clip_eps.")
    prime: bool = Field(
        False,
        description="PRIME: dense per-token rewards from an implicit process reward model (a copy of the starting "
        "model trained online on the outcomes, beside the policy; generalmodel/post/rl/prime.py), their "
        "return-to-go added to the outcome advantage. Costs ~2x the learner's compute.",
    )
    prime_beta: float = Field(0.05, gt=0, description="rl.prime: β of the implicit reward β·log(π_φ/π_ref).")
    prime_lr: float | None = Field(None, gt=0, description="rl.prime: the PRM's learning rate (default optim.lr).")
    prime_weight: float = Field(1.0, ge=0, description="rl.prime: weight of the process advantage.")
    updates_per_batch: int = Field(
        1, gt=0, description="Optimizer updates on each step's rollouts (>1: PPO-style reuse, the ratio clipped)."
    )
    beta: float = Field(
        0.0, ge=0, description="KL penalty to the frozen starting model (k3 estimator); 0: no reference is kept."
    )
    mode: Literal["on_policy", "off_policy"] = Field(
        "on_policy",
        description="on_policy: a step's rollouts come from the weights it updates; off_policy: step k+1's are "
        "generated (by the weights before step k) while step k trains, and the ratio corrects for the lag.",
    )
    max_staleness: int = Field(
        1,
        ge=1,
        description="off_policy: steps k+1 … k+N's rollouts are asked for while step k trains, so a step's samples "
        "come from weights at most N updates old (the ratio corrects for it); 1: one step ahead.",
    )
    rollout_workers: int = Field(2, gt=0, description="Rollout actors (each holds a copy of the policy).")
    weight_sync: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How each new policy version reaches the rollout actors: object_store (one ray.put, one get "
        "per actor) or collective (a gloo broadcast from the learner's rank 0 over a group of its own).",
    )
    rollout_cpus: float = Field(1.0, gt=0, description="CPUs each rollout actor reserves.")
    rollout_gpus: float = Field(0.0, ge=0, description="GPUs each rollout actor reserves (0: CPU rollouts).")
    rollout_resources: Resources = Field(
        {},
        description="Custom Ray resources each rollout actor reserves, e.g. {rollout: 1}: only nodes that advertise "
        "them hold the actors (a node group of their own; ray.worker_resources keeps the learner off it).",
    )
    rollout_slots: int = Field(64, gt=0, description="Sequences a rollout actor decodes in one batch.")
    tools: Strings = Field(
        [],
        description="Built-in tools (calculator) the prompts declare and whose calls rollouts run (docs/tools.md): a "
        "rollout is the policy's turns with the tools' results between them (not trained on); the verifiers score "
        "the last turn. rl.max_new_tokens is per turn.",
    )
    tool_rounds: int = Field(3, gt=0, description="rl.tools: turns a rollout may take (calls, then the answer).")
    kill_rollout_at_step: int | None = Field(
        None,
        description="Testing aid: one rollout actor's process exits while this step's rollouts run (it is replaced).",
    )


class CoconutConfig(Section):
    """Chain of continuous thought (Coconut, Hao et al. 2024; jobs/coconut.py). The rows of
    data.source are worked conversations (`messages`, the last one the assistant's) with their
    reasoning steps (a list of strings the assistant's answer starts with, in order); stage k of
    coconut.stages replaces the first k steps with k·coconut.thoughts_per_step continuous thoughts."""

    steps_field: str = Field("steps", description="The column holding a row's reasoning steps (a list of strings).")
    thoughts_per_step: int = Field(2, gt=0, description="Continuous thoughts that replace one language step (c).")
    stages: int = Field(3, gt=0, description="Stages 1..K, each train.steps / K steps; stage k replaces k steps.")
    drop_remaining: bool = Field(
        True,
        description="The last stage also drops the language steps left after its K (the answer follows the "
        "thoughts); decoding then runs K·c thoughts and answers.",
    )
    reset_optimizer: bool = Field(True, description="Clear the optimizer's state at each stage's start (the paper).")


class QuietStarConfig(Section):
    """Quiet-STaR (Zelikman et al. 2024; jobs/quiet_star.py): after every token of the rows of
    data.source (chat conversations; the assistant's tokens are scored), the model thinks a short
    thought, and a mixing head weighs its prediction of the next tokens after the thought against the
    one without; the thoughts learn by REINFORCE on how much they help."""

    thought_tokens: int = Field(4, gt=0, description="Tokens of each thought (between its start and end tokens).")
    lookahead: int = Field(2, gt=0, description="Future tokens a thought is scored on (teacher-forced after it).")
    samples: int = Field(2, gt=1, description="Thoughts sampled per position: their mean reward is the baseline.")
    temperature: float = Field(1.0, gt=0, description="The thoughts' sampling temperature.")
    policy_weight: float = Field(1.0, ge=0, description="Weight of the REINFORCE term on the thoughts.")


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


class TrackingConfig(Section):
    """MLflow."""

    uri: str | None = Field(
        None, description="MLflow tracking URI: http://host:port, or default sqlite under .generalmodel/."
    )
    experiment: str = Field("generalmodel", description="MLflow experiment name.")
    registered_model: str = Field("generalmodel", description="Registry name the final model is registered under.")

    @field_validator("uri")
    @classmethod
    def _a_store_mlflow_3_serves(cls, uri: str | None) -> str | None:
        scheme = (uri or "").partition("://")[0].split("+")[0].lower() if uri and "://" in uri else ""
        if uri is not None and scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"{uri!r} is not an MLflow tracking store this platform uses: give http(s)://HOST:PORT "
                f"(a tracking server) or sqlite:////ABS/PATH/mlflow.db (MLflow 3 retired the file store "
                f"of plain paths and file:// URIs); schemes: {', '.join(TRACKING_SCHEMES)}"
            )
        return uri


_DEFAULT_MODEL = LlamaConfig
ModelConfig = Annotated[Union[tuple(spec.config_cls for spec in REGISTRY.values())], Field(discriminator="name")]  # noqa: UP007


class Config(Section):
    """The whole run config."""

    data: DataConfig = DataConfig()
    model: ModelConfig = Field(
        default_factory=lambda: _DEFAULT_MODEL(), description="The model: a registered name and its fields."
    )
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    parallel: ParallelConfig = ParallelConfig()
    tracking: TrackingConfig = TrackingConfig()
    dpo: DpoConfig = DpoConfig()
    rl: RlConfig = RlConfig()
    coconut: CoconutConfig = CoconutConfig()
    quiet_star: QuietStarConfig = QuietStarConfig()
    mixture: MixtureConfig = MixtureConfig()
    # The model keys the preset and overrides gave (load_config): what train.init_from checks.
    _model_keys: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def explicit_model_keys(self) -> frozenset[str]:
        return self._model_keys

    @model_validator(mode="after")
    def _one_training_set(self) -> Config:
        if self.mixture.datasets and self.train.dataset:
            raise ValueError(
                "train.dataset and mixture.datasets both name what to train on: give one (a mixture of one "
                "dataset is mixture.datasets={NAME: URI})"
            )
        if self.train.window_warmup_steps and getattr(self.model, "window", None) is None:
            raise ValueError(
                "train.window_warmup_steps grows the sliding-window layers' window, and the model has none: "
                "set model.window (and model.global_every for the long/short pattern) or drop the warmup"
            )
        if self.train.batch_warmup_steps and self.train.grad_accum == 1:
            raise ValueError(
                "train.batch_warmup_steps grows the micro-batches a rank accumulates per step up to "
                "train.grad_accum=1, so it has nothing to grow: give train.grad_accum > 1 (and a smaller "
                "train.batch_size for the same global batch)"
            )
        if self.train.batch_warmup_steps and self.mixture.datasets:
            raise ValueError(
                "train.batch_warmup_steps with mixture.datasets: the mixture's schedule counts steps of a fixed "
                "batch; use one of them"
            )
        every, saves = self.optim.embed_head_every, self.train.checkpoint_every
        if every > 1 and saves % every:
            raise ValueError(
                f"optim.embed_head_every={every} holds the embedding's and head's gradients over {every} steps, "
                f"and train.checkpoint_every={saves} would save in the middle of a window: use a multiple of {every}"
            )
        expert, experts = self.parallel.expert, getattr(self.model, "moe_experts", 0)
        if expert > 1 and not experts:
            raise ValueError(
                f"parallel.expert={expert} spreads the routed experts over ranks, and model {self.model.name!r} has "
                f"none (model.moe_experts=0): use parallel.expert=1 or an MoE model"
            )
        if expert > 1 and self.model.name == "moeut":
            raise ValueError(
                f"parallel.expert={expert}: expert parallel is not built for model 'moeut' (its σ-MoE experts are "
                f"shared by several layers); use parallel.expert=1"
            )
        if expert > 1 and experts % expert:
            raise ValueError(
                f"parallel.expert={expert} does not divide model.moe_experts={experts}: every rank of an expert "
                f"group holds the same number of experts"
            )
        if self.parallel.tensor > 1:
            problems = _tensor_parallel_problems(self.model, self.train, self.parallel.tensor)
            if problems:
                raise ValueError(f"parallel.tensor={self.parallel.tensor}: " + "; ".join(problems))
        return self


def _tensor_parallel_problems(model, train: TrainConfig, tensor: int) -> list[str]:
    """Why `model` cannot be split over `tensor` ranks: what tensor parallel does not cover (named),
    and sizes it does not divide."""
    unsplit = [
        (model.name == "moeut", "MoEUT's SwitchHead attention and shared layers (model.name=moeut) are not split"),
        (getattr(model, "attention", None) == "mla", "MLA attention (model.attention=mla) is not split by heads"),
        (
            getattr(model, "moe_experts", 0),
            "MoE layers (model.moe_experts) are not tensor-parallel: use parallel.expert",
        ),
        (getattr(model, "memory_layers", ()), "memory layers (model.memory_layers) are not tensor-parallel"),
        (getattr(model, "long_memory_layers", ()), "long-memory layers (model.long_memory_layers) are not split"),
        (getattr(model, "value_embeds", 0), "value embeddings (model.value_embeds) are not split by heads"),
    ]
    out = [why for found, why in unsplit if found]
    if train.fp8 != "none":
        out.append(f"train.fp8={train.fp8} with tensor parallel is not built")
    if train.adapter != "none":
        out.append(f"an adapter (train.adapter={train.adapter}) wraps the linear layers tensor parallel splits")
    if train.compile != "none" and train.activation_checkpointing != "none":
        out.append(
            f"train.compile={train.compile} with train.activation_checkpointing={train.activation_checkpointing}: "
            "torch 2.13's compiler cannot trace a recomputed block of split weights (it saves a DeviceMesh for "
            "the backward); use one of the two"
        )
    sizes = {
        "model.n_heads": getattr(model, "n_heads", 0),
        "model.n_kv_heads (key/value heads)": getattr(model, "kv_heads", 0),
        "the MLP's hidden width": getattr(model, "hidden", 0),
        "model.vocab_size": model.vocab_size,
    }
    out += [f"{name}={n} is not a multiple of it" for name, n in sizes.items() if n % tensor]
    return out
