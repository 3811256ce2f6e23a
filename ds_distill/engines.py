"""Every DeepSpeed call of the training path lives here (checkpoint.py holds the checkpoint ones).

- `check_device` refuses a start that would silently fall back to the CPU (GPUs given to the job, torch unable to
  use them; or train.device: cuda); `describe_device` is the start-up line; `local_device_index` picks a rank's GPU
  (also under SLURM's one-GPU-per-task binding).
- `init_distributed` maps SLURM's variables when launched by plain `srun`, then starts the process group.
- `student_ds_config` / `teacher_ds_config` turn flat typed arguments into DeepSpeed JSON configs.
- `load_partitioned` loads a Hugging Face model straight into ZeRO-3 shards (never whole on one rank).
- `build_student_engine` (AdamW + warmup/cosine, clipping, accumulation; `resolve_optimizer` / `optimizer_block`:
  torch's fused AdamW or DeepSpeed's op) and `build_teacher_engine` (ZeRO-3 inference: no optimizer, eval, no grad)
  are the only `deepspeed.initialize` callers of the project; `ReplicatedTeacher` is the teacher without DeepSpeed
  (teacher.sharding: replicate).
- `gathered` / `register_external_param` are the two ZeRO-3 hooks the fused loss needs to read an lm_head weight
  outside that lm_head's own forward.
- `mark_moe_leaves` makes Mixture-of-Experts blocks ZeRO-3 leaf modules (ranks routing to different experts must
  still run the same collectives); `forget_forward_trace` drops the module order a one-off forward (the trainer's
  start-up probe) left in an engine's prefetcher.
"""
from __future__ import annotations

import contextlib
import functools
import datetime
import json
import os
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

# Imported before any zero.Init: transformers imports torch._dynamo lazily, which fails while zero.Init has
# patched the tensor constructors ("Signature mismatch ... tensor_pynew", see NOTES.md).
import torch._dynamo  # noqa: F401

import deepspeed
from deepspeed.accelerator import get_accelerator

from .errors import DistillError

_HF_DS_CONFIGS: list[Any] = []  # HfDeepSpeedConfig is held by weakref in transformers: keep ours alive


def init_distributed(timeout_s: float = 1800.0, teacher_ranks: int = 0) -> tuple[int, int, int]:
    """Start the process group (gloo on CPU, nccl on GPUs) and return (rank, world_size, local_rank).

    deepspeed/torchrun set RANK, WORLD_SIZE, LOCAL_RANK. Under plain `srun` only SLURM_* exist: map them, and take
    MASTER_ADDR from the first host of the allocation when it is not set.

    teacher_ranks K > 0 (teacher.placement: separate): the launched ranks split by role (`split_roles`), and the
    returned rank and world size are those of this rank's role group (a student sees only the students).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:
            nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
            os.environ["MASTER_ADDR"] = _first_host(nodes)
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        skip_cpu_shm_op()
        if teacher_ranks > 0:
            split_roles(teacher_ranks, timeout_s)
        try:
            deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 -- only the port-in-use case becomes a user error
            if "address already in use" not in str(e).lower() and "EADDRINUSE" not in str(e):
                raise
            from .errors import DistillError

            raise DistillError(
                f"MASTER_PORT: {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is already in use (another "
                "run on this machine?) -> pick a free port: deepspeed --master_port N, torchrun --master_port N, "
                "or MASTER_PORT=N for a single process") from None
    local_rank = int(os.environ["LOCAL_RANK"])
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_device_index(local_rank, get_accelerator().device_count()))
    return dist.get_rank(), dist.get_world_size(), local_rank


class Placement:
    """teacher.placement: separate. Of the W launched ranks, the last K (global ranks W-K .. W-1) run the teacher,
    the first S = W-K train the student; a student keeps its global rank as its rank, so the student side (rank 0
    logging and checkpoints, data shards, the resume world size) is exactly a colocated run of S ranks.

    Each role has its own default process group (what DeepSpeed and the trainer see: students ZeRO over the students
    only, teachers ZeRO-3 over the teachers only), and `bridge` is a second process group over all W ranks (global
    rank numbering) that carries only the point-to-point traffic between them. Student s is served by teacher
    s % K (its global rank: S + s % K)."""

    def __init__(self, role: str, global_rank: int, global_world: int, teacher_ranks: int, bridge):
        self.role, self.global_rank, self.global_world = role, global_rank, global_world
        self.teacher_ranks, self.bridge = teacher_ranks, bridge

    @property
    def students(self) -> int:
        return self.global_world - self.teacher_ranks

    def teacher_of(self, student_rank: int) -> int:
        """Global rank of the teacher serving student `student_rank`."""
        return self.students + student_rank % self.teacher_ranks

    def students_of(self, teacher_local_rank: int) -> list[int]:
        """Student ranks (= their global ranks) served by teacher `teacher_local_rank` (its rank among teachers)."""
        return [s for s in range(self.students) if s % self.teacher_ranks == teacher_local_rank]

    DONE_TAG = 1000  # a student's last message to its teacher rank: its process ends normally (`shutdown`)

    def say_done(self) -> None:
        """Student: tell the teacher rank this process ends normally (the teacher waits for it, so that under
        srun --wait it does not exit while the students still export and evaluate)."""
        if self.role == "student":
            self.send(torch.ones(1, dtype=torch.int64, device=device() if not on_cpu() else "cpu"),
                      self.teacher_of(self.global_rank), self.DONE_TAG).wait()

    def send(self, tensor: torch.Tensor, dst: int, tag: int):
        """Asynchronous point-to-point send over the bridge (global ranks); returns the work to wait on. A peer
        already gone can fail the posting itself: that error is raised by the work's wait(), like a failure that
        comes later, so that one handler (the caller's, naming the peer) sees both."""
        try:
            return self.bridge.send([tensor], dst, tag)
        except RuntimeError as e:
            return _FailedWork(e)

    def recv(self, tensor: torch.Tensor, src: int, tag: int):
        try:
            return self.bridge.recv([tensor], src, tag)
        except RuntimeError as e:
            return _FailedWork(e)


class _FailedWork:
    """A bridge transfer whose posting failed: wait() raises that error."""

    def __init__(self, error: RuntimeError):
        self.error = error

    def wait(self):
        raise self.error


_PLACEMENT: Optional[Placement] = None


def placement() -> Optional[Placement]:
    """The role split of teacher.placement: separate (None for a colocated run)."""
    return _PLACEMENT


def split_roles(teacher_ranks: int, timeout_s: float) -> Placement:
    """Start one default process group per role and the bridge over all ranks, from one TCP store on
    MASTER_ADDR:MASTER_PORT (the launcher's rendezvous), each under its own key prefix."""
    global _PLACEMENT
    grank, gworld = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 1 <= teacher_ranks < gworld:
        raise DistillError(f"teacher.ranks: {teacher_ranks} of {gworld} launched ranks leaves "
                           f"{gworld - teacher_ranks} student ranks -> launch more ranks (at least teacher.ranks + 1) "
                           "or lower teacher.ranks")
    students = gworld - teacher_ranks
    role = "teacher" if grank >= students else "student"
    rank, size = (grank - students, teacher_ranks) if role == "teacher" else (grank, students)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), gworld, grank == 0,
                          timeout=timeout)
    on_gpu = get_accelerator().device_name() != "cpu"
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"{role}/", store), rank=rank, world_size=size,
                            timeout=timeout)
    # The bridge waits have no deadline of their own: a peer that dies closes its connections (the wait raises at
    # once), one that hangs is ended by its watchdog; a teacher rank waits for its students' normal end (their
    # export and evaluation: engines.shutdown) however long it takes.
    timeout = datetime.timedelta(days=7)
    bridge_store = dist.PrefixStore("bridge/", store)
    if on_gpu:  # hidden states go GPU to GPU (NCCL send/recv); untested here (no GPU on the test machines)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        bridge = dist.ProcessGroupNCCL(bridge_store, grank, gworld, opts)
    else:
        bridge = dist.ProcessGroupGloo(bridge_store, grank, gworld, timeout)
    _PLACEMENT = Placement(role, grank, gworld, teacher_ranks, bridge)
    # DeepSpeed (zero.Init) checks WORLD_SIZE against the default group: from here on the environment names the
    # role group too; the launcher's values stay under DS_DISTILL_GLOBAL_*
    os.environ.update({"DS_DISTILL_GLOBAL_RANK": str(grank), "DS_DISTILL_GLOBAL_WORLD_SIZE": str(gworld),
                       "DS_DISTILL_ROLE": role, "RANK": str(rank), "WORLD_SIZE": str(size)})
    return _PLACEMENT


def local_device_index(local_rank: int, visible: int) -> int:
    """The accelerator index of this rank among the devices its process sees.

    One process per node seeing every GPU (deepspeed, torchrun, srun without binding): device LOCAL_RANK. SLURM
    binding one GPU per task (--gpus-per-task=1, --gpu-bind=single:1) leaves each task exactly one visible device,
    numbered 0 whatever the task's local rank. Anything else would put two ranks on one GPU or point past the last.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise DistillError(f"local rank {local_rank} but this process sees {visible} accelerator(s) "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}) -> start one "
                       "rank per visible GPU (deepspeed --num_gpus, torchrun --nproc_per_node), or bind one GPU per "
                       "SLURM task (srun --gpus-per-task=1)")


# Environment variables through which a scheduler or a user hands GPUs to a job.
_SLURM_GPU_VARS = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
                   "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def gpu_evidence(env: Optional[dict] = None, dev_dir: str = "/dev") -> list[str]:
    """Signs that GPUs are meant for this job, whatever torch thinks: GPU variables of the scheduler or the user,
    and NVIDIA device files. Each entry names its source (the message of a refused start quotes them).

    CUDA_VISIBLE_DEVICES set by the deepspeed launcher (it sets it on CPU machines too, to the rank list) is not a
    sign; the device files of a GPU node still are.
    """
    import glob

    env = os.environ if env is None else env
    found = []
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    by_ds_launcher = "CROSS_RANK" in env and "LOCAL_SIZE" in env
    if cvd and cvd.strip() not in ("-1", "NoDevFiles") and not by_ds_launcher:
        found.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    for k in _SLURM_GPU_VARS:
        v = env.get(k, "").strip()
        if v and v not in ("0", "none", "(null)"):
            found.append(f"{k}={v}")
    devs = sorted(p for p in glob.glob(os.path.join(dev_dir, "nvidia*")) if os.path.basename(p)[6:].isdigit())
    if devs:
        found.append(f"{len(devs)} NVIDIA device file(s) ({', '.join(devs[:2])}{', ...' if len(devs) > 2 else ''})")
    return found


def _cuda_unusable_cause() -> Optional[str]:
    """None when torch can use CUDA, else why not, in words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None)"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
        torch.cuda.init()  # raises with the driver's own words (version mismatch, no device...)
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} CUDA devices"
    except Exception as e:  # noqa: BLE001 (any CUDA init failure is the cause we report)
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise CUDA: {e}"


def check_device(requested: str, env: Optional[dict] = None) -> str:
    """Refuse a start that would silently fall back to the CPU; returns the accelerator DeepSpeed will use.

    `requested` is train.device: auto (the accelerator DeepSpeed finds, but refused when GPUs are visible to the job
    and torch cannot use them), cuda (refused unless CUDA is usable) or cpu (refused when DeepSpeed chose another
    accelerator: it is chosen when deepspeed is imported, before any config is read).
    """
    accel = get_accelerator().device_name()
    fix = ("install a CUDA build of torch that matches the driver (nvidia-smi shows the driver's CUDA version) and "
           "run inside the GPU allocation (srun/sbatch --gpus...)")
    if requested == "cpu":
        if accel != "cpu":
            raise DistillError(f"train.device: cpu, but DeepSpeed chose its '{accel}' accelerator -> set "
                               "DS_ACCELERATOR=cpu in the environment of every rank (it is read when deepspeed is "
                               "imported)")
        return accel
    cause = _cuda_unusable_cause() if accel == "cpu" else None
    if requested == "cuda" and accel != "cuda":
        raise DistillError(f"train.device: cuda, but DeepSpeed chose its '{accel}' accelerator: "
                           f"{cause or 'DS_ACCELERATOR selects another one'} -> {fix}")
    evidence = gpu_evidence(env)
    if requested == "auto" and accel == "cpu" and evidence and cause is not None:
        raise DistillError(f"train.device: auto found GPUs meant for this job ({'; '.join(evidence)}), but {cause}, "
                           "so DeepSpeed fell back to the CPU (fp32, gloo, every model in host memory) -> "
                           f"{fix}, or set train.device: cpu to run on the CPU on purpose")
    return accel


def describe_device(precision: str) -> str:
    """One start-up line: device, accelerator, communication backend, precision (and the GPU's name)."""
    accel = get_accelerator()
    what = str(device())
    if accel.device_name() == "cuda":
        what += f" ({torch.cuda.get_device_name(device())}, torch CUDA {torch.version.cuda})"
    backend = dist.get_backend() if dist.is_initialized() else "none"
    return f"device {what}, accelerator {accel.device_name()}, backend {backend}, precision {precision}"


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles its shared-memory all-reduce op at every process-group start.
    Only `inference_all_reduce` uses it (training goes through torch.distributed / gloo), and a rank killed while
    holding the op's build lock (~/.cache/torch_extensions/.../lock) makes every later launch on the machine wait
    forever. Mark it unavailable; DeepSpeed then skips it. GPUs are unaffected (they have no such op)."""
    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('node[01-03],x' -> 'node01'), via scontrol when available."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def device() -> torch.device:
    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, local_device_index(int(os.environ.get("LOCAL_RANK", "0")),
                                                 get_accelerator().device_count()))


def device_memory_bytes() -> int:
    """Total memory of this rank's accelerator."""
    return int(get_accelerator().total_memory(device().index))


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on accelerators that support it, fp32 on CPU (bf16 matmuls are emulated there)."""
    if precision != "auto":
        return precision
    if on_cpu():
        return "fp32"
    return "bf16" if get_accelerator().is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _precision_block(precision: str) -> dict:
    return {"bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16}}


def resolve_optimizer(choice: str, device_type: Optional[str] = None) -> str:
    """train.optimizer -> 'torch' or 'deepspeed'. auto = torch's fused AdamW on accelerators (nothing to compile at
    start-up), DeepSpeed's AdamW op on the CPU (built once by launch/install.sh; the numbers of docs/BENCHMARKS.md)."""
    if choice != "auto":
        return choice
    device_type = device_type or get_accelerator().device_name()
    return "deepspeed" if device_type == "cpu" else "torch"


def optimizer_block(optimizer: str, *, lr: float, betas: list[float], weight_decay: float) -> dict:
    """The config's "optimizer" entry for a resolved train.optimizer.

    torch: DeepSpeed's `torch_adam` switch builds torch.optim.AdamW itself (runtime/engine.py,
    get_optimizer_configuration; checked before its FusedAdam / CPUAdam branches, so also under optimizer offload),
    passing the other params through: `fused=True` is torch's one-kernel AdamW (CUDA and CPU), no JIT build.
    deepspeed: DeepSpeed's FusedAdam (CUDA: compiled with nvcc on first use) or CPUAdam (offload), built on demand.
    """
    params: dict[str, Any] = {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay}
    if optimizer == "torch":
        params.update({"torch_adam": True, "fused": True})
    elif optimizer != "deepspeed":
        raise ValueError(f"optimizer {optimizer!r}: expected 'torch' or 'deepspeed'")
    return {"type": "AdamW", "params": params}


def describe_optimizer(engine) -> str:
    """What the engine really built: the optimizer class under DeepSpeed's ZeRO wrapper (and torch's fused flag)."""
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    name = f"{type(opt).__module__}.{type(opt).__name__}"
    if isinstance(opt, torch.optim.Optimizer) and opt.defaults.get("fused"):
        name += " (fused)"
    return name


def student_ds_config(*, micro_batch_size: int, grad_accum_steps: int, world_size: int, zero_stage: int,
                      precision: str, lr: float, betas: list[float], weight_decay: float, grad_clip: float,
                      offload_optimizer: bool, optimizer: str = "deepspeed", hpz_partition_size: int = 1,
                      overrides: Optional[dict] = None) -> dict:
    """DeepSpeed config of the trained student: AdamW (the schedule is `lr_schedule`, passed to the engine);
    `optimizer` is a resolved train.optimizer (`resolve_optimizer`)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0,
                     "stage3_prefetch_bucket_size": 0 if on_cpu() else 5e7})
        if hpz_partition_size > 1:  # ZeRO++ hpZ: secondary weight partition within groups of this many ranks
            zero["zero_hpz_partition_size"] = hpz_partition_size
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "optimizer": optimizer_block(optimizer, lr=lr, betas=betas, weight_decay=weight_decay),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        **_precision_block(precision),
    }
    return _merge(cfg, overrides or {})


def teacher_ds_config(path: str, *, micro_batch_size: int, world_size: int, precision: str,
                      offload_params: bool) -> dict:
    """The teacher's DeepSpeed JSON (ds_configs/teacher_zero3.json) with the run's batch and precision filled in."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch_size * world_size
    cfg.update(_precision_block(precision))
    zero = cfg.setdefault("zero_optimization", {"stage": 3})
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu()}
    cfg.setdefault("steps_per_print", 10 ** 9)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_partitioned(load_fn: Callable[[], torch.nn.Module], ds_config: dict) -> torch.nn.Module:
    """Run `load_fn` (a from_pretrained call) so that under ZeRO-3 each rank only ever holds its shard.

    transformers' HfDeepSpeedConfig makes from_pretrained build the model inside zero.Init and load the
    checkpoint shard by shard; for stages 0-2 the model loads normally.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIGS.append(HfDeepSpeedConfig(ds_config))
        try:
            return load_fn()
        finally:
            _HF_DS_CONFIGS.pop()
    return load_fn()


def lr_schedule(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier of optimizer step `step + 1`: linear warmup (1/w, 2/w, ... 1; never 0), then cosine to
    min_lr_ratio at max_steps."""
    import math

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mark_moe_leaves(model: torch.nn.Module) -> list[str]:
    """ZeRO-3 leaf modules for Mixture-of-Experts blocks: a module holding both `experts` and a router (`gate` /
    `router`) is gathered whole when it starts, instead of expert by expert. Without it, ranks whose tokens route
    to different experts would fetch different parameters in different orders and their collectives would not
    match (a hang). Returns the class names marked (empty for dense models)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules()
                      if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))},
                     key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def _zero3(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def build_student_engine(model: torch.nn.Module, ds_config: dict, *, warmup_steps: int, max_steps: int,
                         min_lr_ratio: float):
    """The trained student: returns the DeepSpeed engine (AdamW and the warmup + cosine schedule inside; the
    scheduler's state is saved in DeepSpeed checkpoints)."""
    if _zero3(ds_config):
        mark_moe_leaves(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fn = functools.partial(lr_schedule, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn))
    use_safe_checkpoint_loading(engine)
    return engine


class CheckpointFileError(Exception):
    """A DeepSpeed checkpoint file this rank could not load: `refused` when its pickle names a global outside
    CHECKPOINT_ALLOWED_GLOBALS (nothing of it was run), otherwise unreadable (truncated, corrupt)."""

    def __init__(self, path: str, reason: str, refused: bool):
        self.path, self.reason, self.refused = path, reason, refused
        super().__init__(f"{path}: {reason}")


def checkpoint_allowed_globals() -> list:
    """The only non-tensor classes DeepSpeed 0.19 writes into its checkpoint pickles (ZeRO 0-3, fp32 / bf16 / fp16:
    found by loading each with weights_only=True): torch.load(weights_only=True) rebuilds these and plain containers,
    numbers, strings and tensors, and refuses anything else before running it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    enums = (ZeroStageEnum,)
    # Python 3.11.0-3.11.4 (Debian 12's 3.11.2 among them) pickle an Enum member as getattr(EnumClass, "NAME"); the
    # name `builtins.getattr` then stands for enum_member_by_name, which rebuilds a member of these enums only
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
            (functools.partial(enum_member_by_name, enums), "builtins.getattr")]


def enum_member_by_name(allowed: tuple, cls, name):
    """`getattr(cls, name)` as an Enum member's pickle uses it, for the allowed enum classes and their member names
    only: anything else (another class, an attribute that is not a member) is refused before it runs."""
    import pickle

    if cls in allowed and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"Unsupported global: getattr({getattr(cls, '__name__', type(cls).__name__)}, "
                                 f"{name!r}) is not a member of an allowed enum")


def load_checkpoint_file(path: str, map_location=None):
    """torch.load of one DeepSpeed checkpoint file without arbitrary unpickling (see checkpoint_allowed_globals)."""
    import pickle

    try:
        with torch.serialization.safe_globals(checkpoint_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        what = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first
                    else "unsupported content")
        raise CheckpointFileError(path, f"refused: its pickle needs more than tensors and DeepSpeed's own state "
                                  f"({what}); it was not run", refused=True) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointFileError(path, f"unreadable ({reason})", refused=False) from None


def _weights_only_checkpoint_engine(config_params):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with torch.load(weights_only=True) and an allow-list."""

        def load(self, path: str, map_location=None):
            return load_checkpoint_file(path, map_location)

    return WeightsOnlyCheckpointEngine(config_params)  # the run's serialization settings, as DeepSpeed's


def use_safe_checkpoint_loading(engine) -> None:
    """Make `engine.load_checkpoint` read every file through load_checkpoint_file (DeepSpeed's own torch engine
    unpickles with weights_only=False: whoever can write the checkpoint directory would run code on every rank).
    Saving is unchanged (the same torch.save)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        from .errors import ConfigError

        raise ConfigError([f"ds_config_overrides: DeepSpeed checkpoint engine "
                           f"{type(engine.checkpoint_engine).__name__} -> remove the checkpoint engine setting: only "
                           "the torch engine's files are known to load without unpickling (weights_only)"])
    engine.checkpoint_engine = _weights_only_checkpoint_engine(engine._config)


class ReplicatedTeacher:
    """teacher.sharding: replicate: the whole teacher on this rank's device, a plain inference module (no DeepSpeed
    engine, no collective in its forward). Called like the ZeRO-3 engine; `.module` is the wrapped module."""

    def __init__(self, module: torch.nn.Module, dev: torch.device):
        self.module = module.to(dev).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self) -> "ReplicatedTeacher":
        self.module.eval()
        return self


def build_teacher_engine(model: torch.nn.Module, ds_config: dict):
    """The teacher as a ZeRO-3 inference engine: no optimizer, eval mode, no grads."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if _zero3(ds_config):
        mark_moe_leaves(model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.nn.Parameter]):
    """Context in which ZeRO-3 partitioned params are whole on every rank (read-only); a no-op otherwise."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def copy_gathered(src: torch.nn.Module, dst: torch.nn.Module, group_elements: int = 1 << 26) -> None:
    """Copy `src`'s parameters (ZeRO-3 partitioned or not) and buffers into `dst`, a plain module of the same
    structure: the gather-once refresh of on-policy sampling's unsharded student copy (generation.ReplicaGenerator).
    Collective under ZeRO-3: every rank gathers the same groups of parameters (about `group_elements` elements each,
    so the transient full copies stay small) in the same order: one all-gather per group per call, instead of one
    per layer per generated token through the engine's hooks."""
    dst_params = dict(dst.named_parameters())
    dst_modules = dict(dst.named_modules())
    group: list = []
    size = 0

    def flush():
        with gathered([p for _, p in group]), torch.no_grad():
            for name, p in group:
                dst_params[name].copy_(p.data)
        group.clear()

    for name, p in src.named_parameters():
        if name not in dst_params:
            raise RuntimeError(f"copy_gathered: parameter {name} has no counterpart in the copy")
        group.append((name, p))
        size += p.ds_numel if is_partitioned(p) else p.numel()
        if size >= group_elements:
            flush()
            size = 0
    if group:
        flush()
    with torch.no_grad():
        for name, b in src.named_buffers():
            mod_name, _, leaf = name.rpartition(".")
            dst_modules[mod_name]._buffers[leaf] = b.detach().to(next(iter(dst_params.values())).device, copy=True)


def forget_forward_trace(engine) -> None:
    """Make a ZeRO-3 engine forget the module order it recorded (and release what it prefetched), after a forward
    that ran other modules than the usual ones (trainer.probe_heads runs the model's whole HF forward, lm_head
    included). Without it the engine keeps prefetching, after every later forward, parameters of that one-off
    order (the teacher's lm_head, then still in flight when the loss gathers it). The next forward runs without
    prefetching, the one after records the order again. A no-op below stage 3."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    if not engine.zero_optimization_partition_weights() or not hasattr(offload, "get_param_coordinator"):
        return
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # DeepSpeed's own reaction to a forward that left its recorded order
    coordinator.release_and_reset_all(engine.module)


def register_external_param(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Tell ZeRO-3 that `module`'s forward uses `param` (owned by another submodule), so it is gathered for it."""
    if is_partitioned(param):
        deepspeed.zero.register_external_parameter(module, param)


def consolidated_state_dict(engine) -> Optional[dict]:
    """Full state dict of the engine's module, gathered layer by layer onto rank 0 (None on other ranks)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def partition_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model): ZeRO-3 keeps about 1/world of them per rank."""
    local = total = 0
    for p in module.parameters():
        if is_partitioned(p):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def full_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The full (unpartitioned) gradient of `param` after the boundary backward, for any ZeRO stage."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def local_peak_memory_gb() -> float:
    """Peak memory of this process: accelerator max-allocated on GPUs, peak RSS (ru_maxrss) on CPU (host queries,
    no device synchronisation)."""
    if on_cpu():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return get_accelerator().max_memory_allocated() / 2 ** 30


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (a JSON-able value: pickled by torch.distributed between our own ranks)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (JSON-able values between our own ranks)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def is_peer_failure(e: BaseException) -> bool:
    """True when `e` is a collective that broke because another rank went away (gloo / NCCL connection errors)."""
    if isinstance(e, getattr(dist, "DistBackendError", ())) or isinstance(e, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(m in text for m in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "[gloo", "gloo/transport",
        "NCCL communicator was aborted", "ProcessGroupGloo", "ProcessGroupNCCL"))


def shutdown(failed: bool = False, group_intact: bool = False) -> None:
    """End the process group. A clean end waits in a barrier first (without it gloo's teardown aborts about 1 run in
    12, NOTES.md). After an error that every rank raised together (`group_intact`: DistillError.shared, decided by a
    collective) every rank is here too, so the same barrier ends it cleanly. After any other error there is no
    barrier: a peer may be dead or waiting in another collective, and this rank must exit (and print) now, not when
    the process-group timeout fires; on gloo the group is then left to the process's end (errors.exit_process skips the
    interpreter's teardown, whose destructors can abort with 'terminate called without an active exception')."""
    if not dist.is_initialized():
        return
    if _PLACEMENT is not None and not failed:
        _PLACEMENT.say_done()
    if failed and not group_intact:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            if abort is not None and dist.get_backend() == "nccl":
                abort()  # NCCL's destroy may wait for the collectives in flight
        except Exception:  # noqa: BLE001 -- the process exits next; teardown errors must not mask the real one
            pass
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
