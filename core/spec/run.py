"""The TrainingRun resource: the classes a manifest is read into (apiVersion/kind/metadata/spec).

Phase fields left unset inherit from the previous phase (see ``resolve.py``); which fields a manifest set is
remembered (``fields.explicit_fields``) so inheritance never confuses "unset" with "set to the default".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .fields import COUNT, DURATION, QUANTITY, spec_field
from .model import ModelSpec
from .pod_template import PodTemplateSpec
from .rope import PhaseRopeSpec

API_GROUP = "stagerun.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "TrainingRun"


@dataclass(frozen=True)
class Metadata:
    name: str = spec_field(doc="run name: a DNS-1123 label (lowercase letters, digits, '-')")
    namespace: str | None = spec_field(None, doc="Kubernetes namespace")
    labels: dict[str, str] | None = spec_field(None, doc="Kubernetes labels")
    annotations: dict[str, str] | None = spec_field(None, doc="Kubernetes annotations")
    # Fields the API server adds; accepted so `kubectl get -o yaml` output reads back.
    uid: str | None = spec_field(None, doc="set by Kubernetes")
    resource_version: str | None = spec_field(None, doc="set by Kubernetes")
    generation: int | None = spec_field(None, doc="set by Kubernetes")
    creation_timestamp: str | None = spec_field(None, doc="set by Kubernetes")


@dataclass(frozen=True)
class TokenizerTrainSpec:
    vocab_size: int = spec_field(doc="vocabulary size of the byte-level BPE to train", kind=COUNT, minimum=260)
    max_bytes: int = spec_field(
        "64M", doc="train on at most this many bytes of text, sampled evenly from the sources", kind=COUNT, minimum=1
    )


@dataclass(frozen=True)
class ChatRoleSpec:
    prefix: str = spec_field(doc="text before the message's content (special tokens written out, e.g. '<|user|>\\n')")
    suffix: str = spec_field(doc="text after the content (e.g. '<|end|>\\n'); an assistant's suffix is trained on")


@dataclass(frozen=True)
class ChatTemplateSpec:
    format: Literal["chatml", "zephyr", "llama3", "custom"] = spec_field(
        "chatml",
        doc="the system-query-response format: chatml (<|im_start|>role ... <|im_end|>: Qwen, Index-1.9B), zephyr "
        "(<|system|> / <|user|> / <|assistant|> ... </s>: StableLM 2 Zephyr), llama3 (<|start_header_id|>role"
        "<|end_header_id|> ... <|eot_id|>), or custom (the roles below)",
    )
    system: ChatRoleSpec | None = spec_field(None, doc="custom only: how a system message is written")
    user: ChatRoleSpec | None = spec_field(None, doc="custom only: how a user message is written")
    assistant: ChatRoleSpec | None = spec_field(None, doc="custom only: how an assistant message is written")
    special_tokens: tuple[str, ...] | None = spec_field(
        None, doc="custom only: the format's special tokens (added to the tokenizer, never split)"
    )


@dataclass(frozen=True)
class TokenizerSpec:
    path: str | None = spec_field(None, doc="a tokenizers JSON file (local path or fsspec URL)")
    train: TokenizerTrainSpec | None = spec_field(
        None, doc="train a byte-level BPE on the run's text sources at first start (digits split one by one)"
    )
    chat_template: ChatTemplateSpec | None = spec_field(
        None,
        doc="the chat format chat and preference sources are tokenized with: its special tokens are added to the "
        "tokenizer, and `stagerun export` writes it to tokenizer_config.json (chat_template) so transformers' "
        "apply_chat_template gives the tokens trained on",
    )


@dataclass(frozen=True)
class SourceSpec:
    path: str = spec_field(
        doc="where the data is: a pretokenized shard set (folder with manifest.json), text or JSONL files "
        "(local path, glob or fsspec URL), or a generated corpus 'builtin:python-docs' / 'builtin:python-code'"
    )
    weight: float = spec_field(
        doc="sampling weight in phases that set no weights; all sources' weights sum to 1", minimum=0
    )
    format: Literal["auto", "tokens", "text", "jsonl", "chat", "preference"] = spec_field(
        "auto",
        doc="how to read path; auto decides by content (text, JSONL or a shard set). chat: JSONL of conversations "
        "(`messages`: [{role: system|user|assistant, content}]); preference: JSONL of `prompt`, `chosen`, `rejected` "
        "(each a string or messages). Both are tokenized with spec.tokenizer.chatTemplate and keep which tokens are "
        "responses (docs/post-training.md)",
    )
    text_field: str = spec_field("text", doc="the JSONL field that holds the document text")


@dataclass(frozen=True)
class DataCacheSpec:
    size_limit: str = spec_field(
        doc="size of each pod's cache volume (e.g. 200Gi); the node's ranks share it, least recently used chunks "
        "are evicted at 7/8 of it",
        kind=QUANTITY,
    )
    medium: Literal["", "Memory"] = spec_field(
        "", doc="the emptyDir's medium: '' (the node's disk) or Memory (tmpfs, counted in the pod's memory)"
    )
    storage_class: str | None = spec_field(
        None,
        doc="a StorageClass (e.g. local NVMe): each pod gets its own ephemeral volume of sizeLimit from it instead "
        "of an emptyDir (medium must then be '')",
    )


@dataclass(frozen=True)
class DataSpec:
    sources: dict[str, SourceSpec] = spec_field(doc="named data sources")
    seed: int = spec_field(0, doc="seed of the document shuffle", minimum=0)
    cache: DataCacheSpec | None = spec_field(
        None,
        doc="a node-local cache of remote shard chunks, on a volume the operator mounts (docs/data.md); unset: "
        "tokens are read in place with no cache",
    )


@dataclass(frozen=True)
class RampPoint:
    tokens: int = spec_field(
        doc="tokens since the phase started at which this size takes effect", kind=COUNT, minimum=0
    )
    size: int = spec_field(doc="global batch size in tokens", kind=COUNT, minimum=1)


@dataclass(frozen=True)
class BatchSpec:
    size: int | None = spec_field(
        None, doc="global batch size in tokens (constant through the phase)", kind=COUNT, minimum=1
    )
    ramp: tuple[RampPoint, ...] | None = spec_field(
        None, doc="batch-size ramp: sizes in tokens taking effect at token counts since the phase start (Llama 3)"
    )


@dataclass(frozen=True)
class LRSpec:
    schedule: Literal["constant", "linear", "cosine", "wsd", "invSqrt", "continue"] = spec_field(
        "constant",
        doc="shape after warmup: constant; linear or cosine to `to`; wsd (stable, then decay); invSqrt "
        "(alpha/sqrt(t+beta), continuing the previous phase's value and slope: StableLM 2); continue (the previous "
        "phase's schedule runs on through this phase, as if the two were one)",
    )
    peak: float | None = spec_field(
        None, doc="LR after warmup; unset: the LR the previous phase ended with", minimum=0, exclusive_minimum=True
    )
    to: float | None = spec_field(None, doc="LR at the end of the schedule (linear, cosine, wsd); default 0", minimum=0)
    warmup_tokens: int = spec_field(0, doc="linear warmup from 0 to peak over this many tokens", kind=COUNT, minimum=0)
    horizon_tokens: int | None = spec_field(
        None,
        doc="linear, cosine, wsd: the tokens the shape is laid over (from the phase start), when longer than the "
        "phase (and any phases that continue it): the phase ends part-way down the curve; unset: the phase's tokens",
        kind=COUNT,
        minimum=1,
    )
    decay_fraction: float | None = spec_field(
        None,
        doc="wsd only: the last fraction of the schedule in which the LR decays to `to` (Index-1.9B)",
        minimum=0,
        maximum=1,
    )
    decay_shape: Literal["linear", "cosine", "exponential"] = spec_field(
        "linear",
        doc="wsd only: shape of the decay; exponential: to + (peak - to) x 0.5^(tokens into the decay / "
        "halfLifeTokens) (MiniCPM)",
    )
    half_life_tokens: int | None = spec_field(
        None,
        doc="wsd with decayShape exponential only (required there): tokens over which the LR's distance to `to` halves",
        kind=COUNT,
        minimum=1,
    )


@dataclass(frozen=True)
class TeacherSpec:
    checkpoint: str = spec_field(
        doc="the teacher's weights: a stagerun checkpoint root (its newest committed checkpoint) or step folder"
    )
    model: ModelSpec | None = spec_field(
        None, doc="the teacher's architecture (preset and/or fields); unset: the student's. Same vocabulary required"
    )


@dataclass(frozen=True)
class DistillSpec:
    teacher: TeacherSpec = spec_field(doc="the model whose predictions the student learns from")
    weight: float = spec_field(
        0.9,
        doc="target = weight x one-hot(teacher top-1) + (1 - weight) x one-hot(label) (AFM: 0.9)",
        minimum=0,
        maximum=1,
    )


@dataclass(frozen=True)
class ReferenceSpec:
    checkpoint: str = spec_field(
        doc="the reference model's weights: a stagerun checkpoint root (its newest committed checkpoint) or step "
        "folder, of the policy's architecture"
    )


@dataclass(frozen=True)
class DpoSpec:
    beta: float = spec_field(
        0.1,
        doc="DPO's beta: the strength of the KL anchor to the reference (Index-1.9B, Zephyr: 0.1)",
        minimum=0,
        exclusive_minimum=True,
    )
    nll_weight: float = spec_field(
        0.0,
        doc="weight of a negative log-likelihood term on the chosen responses (mean over their tokens) added to the "
        "DPO loss (Llama 3: 0.2); 0 disables",
        minimum=0,
    )
    reference: ReferenceSpec | None = spec_field(
        None,
        doc="the frozen reference model; unset: the policy's own weights at the phase's start (the checkpoint the "
        "previous phase ended with, or spec.model.init's)",
    )


@dataclass(frozen=True)
class PhaseDataSpec:
    weights: dict[str, float] | None = spec_field(None, doc="source sampling weights in this phase; they sum to 1")


@dataclass(frozen=True)
class ParallelismSpec:
    fsdp: int = spec_field(-1, doc="FSDP shard degree; -1: every rank not used by other dimensions", minimum=-1)
    data_parallel_replicate: int = spec_field(1, doc="HSDP replicas (each holds a full FSDP-sharded copy)", minimum=1)
    tensor_parallel: int = spec_field(1, doc="tensor-parallel degree (heads and MLP split across ranks)", minimum=1)
    context_parallel: int = spec_field(1, doc="context-parallel degree: ranks that split each sequence", minimum=1)


@dataclass(frozen=True)
class ResourcesSpec:
    nodes: int = spec_field(1, doc="pods (one per node)", minimum=1)
    gpus_per_node: int = spec_field(0, doc="GPUs per pod; 0 trains on CPU with the gloo backend", minimum=0)
    processes_per_node: int | None = spec_field(
        None, doc="worker processes per pod; default: gpusPerNode, or 1 on CPU", minimum=1
    )
    gpu_resource: str = spec_field("nvidia.com/gpu", doc="extended resource name of the GPUs")
    cpu: str | None = spec_field(
        None, doc="CPU request and limit of each pod (a Kubernetes quantity, e.g. 32 or '500m')", kind=QUANTITY
    )
    memory: str | None = spec_field(None, doc="memory request and limit of each pod (e.g. '512Gi')", kind=QUANTITY)
    shared_memory: str = spec_field(
        "16Gi", doc="size of the in-memory /dev/shm of each pod (NCCL and data loaders)", kind=QUANTITY
    )
    gpu_memory: str | None = spec_field(
        None,
        doc="memory of one GPU (e.g. 80Gi): `stagerun validate` warns when a phase's estimated memory per GPU "
        "exceeds it (`stagerun plan` prints the estimate); unset: no such warning",
        kind=QUANTITY,
    )

    @property
    def procs_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class AverageSpec:
    last: int = spec_field(
        doc="average the phase's final weights with those of its last - 1 committed checkpoints before them",
        minimum=2,
    )


@dataclass(frozen=True)
class HeldOutEvalSpec:
    source: str = spec_field(
        doc="a source of spec.data.sources with weight 0 in every phase, so none of its tokens is trained on: the "
        "loss is measured on its first `tokens` tokens"
    )
    tokens: int = spec_field(
        "256K", doc="tokens to measure the loss on, in sequences of the phase's seqLen", kind=COUNT, minimum=1
    )


@dataclass(frozen=True)
class NeedleEvalSpec:
    samples: int = spec_field(16, doc="haystacks per evaluation, the needle at evenly spread depths", minimum=1)
    key_tokens: int = spec_field(
        5, doc="length of the passkey the model must reproduce (distinct random token ids)", minimum=1, maximum=64
    )
    seed: int = spec_field(0, doc="seed of the filler, the passkeys and the marker tokens", minimum=0)


@dataclass(frozen=True)
class EvalSpec:
    held_out: HeldOutEvalSpec | None = spec_field(None, doc="held-out loss on a named source never trained on")
    needle: NeedleEvalSpec | None = spec_field(
        None,
        doc="needle in a haystack at the phase's seqLen, on token ids: a passkey after a marker, hidden at a depth "
        "of random filler; the marker is repeated at the end and the greedy continuation must be the passkey",
    )
    every_tokens: int | None = spec_field(
        None,
        doc="also evaluate every this many tokens of the run; unset: only at the phase's end",
        kind=COUNT,
        minimum=1,
    )


@dataclass(frozen=True)
class PhaseSpec:
    name: str = spec_field(doc="phase name: a DNS-1123 label, unique in the run")
    tokens: int = spec_field(
        doc="token budget of the phase (sft and dpo: sequence tokens, padding included)", kind=COUNT, minimum=1
    )
    kind: Literal["pretrain", "sft", "dpo"] | None = spec_field(
        None,
        doc="what the phase trains: pretrain (next-token loss on every token), sft (loss on the responses of chat "
        "sources only, whole conversations packed per sequence and masked from each other; other sources are "
        "replay and weigh by their share of loss tokens), dpo (direct preference optimisation on preference sources "
        "against a frozen reference); unset: the previous phase's (first phase: pretrain)",
    )
    dpo: DpoSpec | None = spec_field(
        None, doc="dpo phases only: beta, the NLL term, the reference; unset: the previous dpo phase's, or defaults"
    )
    seq_len: int | None = spec_field(None, doc="sequence length; unset: the previous phase's", kind=COUNT, minimum=1)
    batch: BatchSpec | None = spec_field(None, doc="global batch; unset: the size the previous phase ended with")
    micro_batch_size: int | None = spec_field(
        None, doc="sequences per rank per forward pass; unset: the previous phase's (first phase: 1)", minimum=1
    )
    lr: LRSpec | None = spec_field(None, doc="learning-rate schedule; unset: constant at the previous phase's final LR")
    optimizer: PhaseOptimizerSpec | None = spec_field(
        None,
        doc="optimizer settings from this phase on, applied in-process at its start; unset fields: the previous "
        "phase's (first phase: spec.training.optimizer and gradClip)",
    )
    data: PhaseDataSpec | None = spec_field(None, doc="data mix; unset: the previous phase's")
    rope: PhaseRopeSpec | None = spec_field(
        None,
        doc="RoPE base and scaling from this phase on, applied in-process at its start; unset fields: the previous "
        "phase's (first phase: spec.model.ropeTheta and ropeScaling)",
    )
    distill: DistillSpec | None = spec_field(
        None, doc="distil from a teacher in this phase (AFM); not inherited: each phase that distils says so"
    )
    average: AverageSpec | None = spec_field(
        None,
        doc="checkpoint averaging at the phase's end (Llama 3's anneal, Polyak): the phase-end checkpoint holds the "
        "mean weights, and the next phase starts from them; not inherited",
    )
    eval: EvalSpec | None = spec_field(
        None,
        doc="evaluation at the phase's end (and every eval.everyTokens): held-out loss, needle in a haystack "
        "(docs/manifest.md); unset: the previous phase's; eval: {} turns it off",
    )
    parallelism: ParallelismSpec | None = spec_field(None, doc="override spec.parallelism for this phase")
    resources: ResourcesSpec | None = spec_field(None, doc="override spec.resources for this phase")


@dataclass(frozen=True)
class CheckpointSpec:
    path: str | None = spec_field(
        None, doc="fsspec URL or path for checkpoints; unset locally: <run dir>/checkpoints (required on Kubernetes)"
    )
    every_tokens: int | None = spec_field(
        None, doc="save every this many tokens (always at phase ends and on SIGTERM)", kind=COUNT, minimum=1
    )
    keep: int = spec_field(3, doc="keep the newest this many checkpoints, plus every phase's last", minimum=1)
    async_save: bool | None = spec_field(
        None,
        doc="copy the state to pinned host memory, then write it in the background while training continues; "
        "unset: on with GPUs, off on CPU",
    )
    volume_claim: str | None = spec_field(
        None, doc="a PersistentVolumeClaim mounted at `path` in every pod (path must then be an absolute local path)"
    )
    credentials_secret: str | None = spec_field(
        None,
        doc="a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN, AWS_REGION, "
        "AWS_ENDPOINT_URL_S3, ...) for s3://: only these keys reach the pods, mounted as files (docs/security.md)",
    )

    def uses_async_save(self, gpu: bool) -> bool:
        return gpu if self.async_save is None else self.async_save


@dataclass(frozen=True)
class OptimizerSpec:
    type: Literal["adamw", "rmspropMomentum"] = spec_field(
        "adamw",
        doc="adamw, or rmspropMomentum (AFM): torch's RMSprop with heavy-ball momentum, plus decoupled weight decay "
        "p <- p - lr x weightDecay x p (torch's own RMSprop weight_decay is an L2 term added to the gradient, so "
        "it is left at 0)",
    )
    beta1: float = spec_field(0.9, doc="AdamW beta1 (adamw only)", minimum=0, maximum=0.999999)
    beta2: float = spec_field(
        0.95, doc="decay of the squared-gradient average: AdamW beta2, RMSprop's alpha", minimum=0, maximum=0.999999
    )
    momentum: float = spec_field(
        0.9, doc="rmspropMomentum only: heavy-ball momentum", minimum=0, exclusive_minimum=True, maximum=0.999999
    )
    eps: float = spec_field(
        1e-8, doc="added to the root of the squared-gradient average", minimum=0, exclusive_minimum=True
    )
    weight_decay: float = spec_field(0.1, doc="decoupled weight decay (not applied to norms and biases)", minimum=0)
    implementation: Literal["auto", "fused", "foreach"] = spec_field(
        "auto",
        doc="AdamW kernel: fused (one kernel per step; CUDA only, refused on CPU, where torch's fused kernel does "
        "not take sharded DTensor parameters), foreach (multi-tensor); auto: fused on GPU, foreach on CPU. "
        "rmspropMomentum: foreach (torch has no fused RMSprop)",
    )


@dataclass(frozen=True)
class PhaseOptimizerSpec:
    """The optimizer settings a phase may change in-process (the optimizer's type and kernel are the run's)."""

    beta1: float | None = spec_field(None, doc="AdamW beta1; unset: the previous phase's", minimum=0, maximum=0.999999)
    beta2: float | None = spec_field(
        None, doc="AdamW beta2 / RMSprop alpha; unset: the previous phase's", minimum=0, maximum=0.999999
    )
    momentum: float | None = spec_field(
        None,
        doc="rmspropMomentum momentum; unset: the previous phase's",
        minimum=0,
        exclusive_minimum=True,
        maximum=0.999999,
    )
    eps: float | None = spec_field(None, doc="epsilon; unset: the previous phase's", minimum=0, exclusive_minimum=True)
    weight_decay: float | None = spec_field(None, doc="decoupled weight decay; unset: the previous phase's", minimum=0)
    grad_clip: float | None = spec_field(
        None, doc="clip the global gradient norm to this, 0 disables; unset: the previous phase's", minimum=0
    )
    reset: bool | None = spec_field(
        None,
        doc="true: the phase starts with a fresh optimizer state (moments zeroed); unset or false: the state carries "
        "over from the previous phase (Index-1.9B found that better for SFT). Not inherited",
    )


@dataclass(frozen=True)
class TrainingSpec:
    seed: int = spec_field(0, doc="seed of the weight init", minimum=0)
    optimizer: OptimizerSpec = spec_field(
        default_factory=OptimizerSpec, doc="optimizer (AdamW or RMSProp with momentum) and its first phase's settings"
    )
    grad_clip: float = spec_field(1.0, doc="clip the global gradient norm to this; 0 disables", minimum=0)
    z_loss: float = spec_field(0.0, doc="weight of the z-loss (PaLM: 1e-4); 0 disables", minimum=0)
    max_z_loss: float = spec_field(0.0, doc="weight of the max-z loss (Baichuan 2: 2e-4); 0 disables", minimum=0)
    doc_masking: bool = spec_field(False, doc="attend only within each document of a packed sequence (Llama 3)")
    precision: Literal["auto", "fp32", "bf16"] = spec_field("auto", doc="auto: bf16 on GPU, fp32 on CPU")
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = spec_field(
        "auto",
        doc="recompute activations in backward: selective (keep matmul and attention outputs, recompute the rest), "
        "full (each block), none; auto: selective on GPU, none on CPU",
    )
    compile: bool | None = spec_field(None, doc="torch.compile each transformer block; unset: on with GPUs, off on CPU")
    float8: bool = spec_field(
        False, doc="float8 matmuls in the blocks' linear layers via torchao (Hopper or newer GPUs; the float8 extra)"
    )
    loss_chunk_tokens: int = spec_field(
        4096,
        doc="tokens whose logits the loss holds at a time (float32, per rank); bounds the loss's memory at large "
        "vocabularies and long sequences",
        minimum=1,
    )
    gc_every_steps: int = spec_field(
        50,
        doc="run Python's garbage collector every this many steps (automatic GC is off while training); 0: leave "
        "Python's GC alone",
        minimum=0,
    )
    log_every_steps: int = spec_field(
        1,
        doc="write metrics every this many steps (also how often the step's values are read back from the device, "
        "the one host sync of a step); checkpoint and phase-end steps are always written",
        minimum=1,
    )

    # "auto" and unset switches, decided by whether the run trains on GPUs (one place, so the trainer, the plan
    # report and the benchmarks agree).
    def uses_bf16(self, gpu: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and gpu)

    def uses_compile(self, gpu: bool) -> bool:
        return gpu if self.compile is None else self.compile

    def checkpointing_mode(self, gpu: bool) -> Literal["none", "selective", "full"]:
        if self.activation_checkpointing == "auto":
            return "selective" if gpu else "none"
        return self.activation_checkpointing

    def uses_fused_adamw(self, gpu: bool) -> bool:
        if self.optimizer.type != "adamw":
            return False  # torch has no fused RMSprop; resolution refuses implementation: fused with it
        return self.optimizer.implementation == "fused" or (self.optimizer.implementation == "auto" and gpu)


@dataclass(frozen=True)
class MetricsSpec:
    all_ranks: bool = spec_field(
        False,
        doc="every rank serves its own /metrics (port 8090 + local rank); default: "
        "rank 0 serves the training metrics, each node's local rank 0 its GPU telemetry",
    )
    peak_tflops: float | None = spec_field(
        None,
        doc="peak dense TFLOP/s of one device for MFU; unset: looked up from the GPU model (none on CPU)",
        minimum=0,
        exclusive_minimum=True,
    )


@dataclass(frozen=True)
class SchedulingSpec:
    node_selector: dict[str, str] | None = spec_field(None, doc="node labels the pods must match")
    tolerations: tuple[dict[str, Any], ...] | None = spec_field(None, doc="Kubernetes tolerations of the pods")
    affinity: dict[str, Any] | None = spec_field(None, doc="Kubernetes affinity of the pods")
    priority_class_name: str | None = spec_field(None, doc="PriorityClass of the pods")
    service_account_name: str | None = spec_field(None, doc="ServiceAccount the pods run as")
    automount_service_account_token: bool | None = spec_field(
        None,
        doc="true: mount the ServiceAccount's API token in the pods; unset: no token (the trainer never calls the "
        "Kubernetes API; docs/security.md)",
    )
    image_pull_secrets: tuple[str, ...] | None = spec_field(None, doc="names of Secrets for pulling the image")


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec = spec_field(doc="model architecture: a preset and/or explicit fields")
    tokenizer: TokenizerSpec = spec_field(doc="tokenizer: a file, or train one on the sources")
    data: DataSpec = spec_field(doc="data sources and their default weights")
    phases: tuple[PhaseSpec, ...] = spec_field(doc="training phases, run in order", map_keys=("name",))
    parallelism: ParallelismSpec = spec_field(default_factory=ParallelismSpec, doc="how ranks split the model")
    resources: ResourcesSpec = spec_field(default_factory=ResourcesSpec, doc="pods, GPUs and processes")
    checkpoint: CheckpointSpec = spec_field(default_factory=CheckpointSpec, doc="where and how often to checkpoint")
    training: TrainingSpec = spec_field(default_factory=TrainingSpec, doc="optimizer, losses, precision")
    metrics: MetricsSpec = spec_field(default_factory=MetricsSpec, doc="Prometheus metrics of the trainer")
    image: str | None = spec_field(None, doc="container image of the trainer pods (required on Kubernetes)")
    scheduling: SchedulingSpec = spec_field(default_factory=SchedulingSpec, doc="where and how the pods are placed")
    pod_template: PodTemplateSpec | None = spec_field(
        None,
        doc="additions to every trainer pod, all phases (labels, env, volumes, extra resources, security context): "
        "see docs/operator.md",
    )
    queue_name: str | None = spec_field(None, doc="Kueue LocalQueue: sets kueue.x-k8s.io/queue-name on the Jobs")
    suspend: bool = spec_field(False, doc="true: checkpoint, stop the pods and free the GPUs; false: resume")
    max_restarts: int = spec_field(10, doc="relaunches after failures before the run is Failed", minimum=0)
    hang_timeout: int = spec_field(
        1800,
        doc="restart the gang when no step completes for this long (a hung collective, a stuck read)",
        kind=DURATION,
        minimum=60,
    )
    startup_timeout: int | None = spec_field(
        None,
        doc="restart the gang when it is not running this long after its launch or its admission by a queue "
        "(pods that cannot be scheduled, created or started); unset: wait as long as it takes",
        kind=DURATION,
        minimum=60,
    )


@dataclass(frozen=True)
class TrainingRun:
    api_version: str = spec_field(doc=f"must be {API_VERSION}")
    kind: str = spec_field(doc=f"must be {KIND}")
    metadata: Metadata = spec_field(doc="name and Kubernetes metadata")
    spec: RunSpec = spec_field(doc="the run")
    status: dict[str, Any] | None = spec_field(None, doc="written by the operator; ignored on input")

    @property
    def name(self) -> str:
        return self.metadata.name
