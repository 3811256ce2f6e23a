"""Per-device memory estimate of a distillation run, from the models' config.json files only (no weights).

    python launch/plan.py --config ds_configs/X.yaml --gpu_memory_gb 80 --num_gpus 8 [--nodes 2]

The model: every rank holds a ZeRO shard of the student and of the teacher (both engines span all ranks, as the
trainer builds them) and runs one micro-batch of `train.micro_batch_size` sequences of `data.max_length` tokens.
Bytes per rank, with e = bytes per weight element (2 for bf16/fp16, 4 for fp32), N = student elements,
Nt = trainable student elements (N, or the LoRA adapters), dp = number of ranks:

Resident for the whole run ("states")
  student parameters   ZeRO-3: N e / dp.   ZeRO 0-2: N e.
  optimizer            AdamW m and v in fp32 (8 Nt bytes, created at the first step) + an fp32 master copy
                       (4 Nt), over dp at ZeRO >= 1. ZeRO 1-3 keep the master partition as a separate copy even when
                       the weights are fp32 (seen with DeepSpeed 0.19.8); ZeRO-0 has one only in bf16/fp16.
  gradients            ZeRO-3: fp32 partitions 4 Nt / dp. ZeRO-2: Nt e / dp. ZeRO-0/1: full Nt e.
                       train.offload_optimizer moves optimizer states, master weights and (ZeRO-3) gradient
                       partitions to host memory.
  reduce bucket        ZeRO-2/3 copy gradients into a contiguous bucket of reduce_bucket_size elements (DeepSpeed
                       default 5e8: 1 GB in bf16). On CPU only the part gradients touch counts: min(bucket, Nt).
  teacher parameters   ZeRO-3 shard N_teacher e / dp (host memory with teacher.offload_params); teacher.sharding
                       replicate: N_teacher e, and no gathered teacher layer or lm_head below.

Transient, at the largest of three moments
  student forward end  (the peak in practice) ZeRO-3 gathered student weights: DeepSpeed keeps parameters that are
                       used again within stage3_max_reuse_distance elements (default 1e9), and in training every
                       forward weight is reused in backward, so about min(N, R/2 + one layer + lm_head) stays
                       gathered until backward frees it;
                       activations saved for backward (below) for micro_batch_size x max_length tokens;
                       the teacher's final hidden states and its gathered lm_head (V x H_teacher);
                       the fused loss: two [chunk_size, V] fp32 logit buffers (+ one in e when e != 4), 6 fp32
                       [slab, V] temporaries (9 with loss.layout vocab_major; slab = 8 rows on CPU, 128 on GPU),
                       the fp32 lm_head gradient accumulator (V x H, full fine-tuning only) and the hidden-state
                       gradient ([tokens, H]), all from losses._FusedLinearDistill;
                       one layer's activation gradients in backward.
  teacher forward      gathered layer + prefetch bucket, one layer's inference activations.
  optimizer init       (ZeRO-3) a zero-filled fp32 buffer of the largest sub-group (min(Nt, 1e9) elements).

Activations saved for backward per decoder layer and token (elements; counted with saved_tensors_hooks on a
Qwen3 / Llama layer, tests/test_planner.py): 6 H + 4 Hq + 4 I + n_heads + 2 (two RMSNorms keep their input, the
normalised input and their output; SDPA keeps q, k and v repeated to Hq, its output and the logsumexp; the MLP
keeps gate, up, act(gate) and their product), + 2 Hq + 2 Hkv + n_heads + n_kv for Qwen3's q/k norms, + r per
LoRA-targeted module. With activation checkpointing only each layer's input (H) is kept, and one layer is
recomputed at a time in backward. Each layer also keeps its own copy of the 4-D attention mask (B x S x S; 4 bytes
per element on CPU where SDPA gets a float mask, counted as 1 on GPU). Once per model: the final norm (2 H + 1) and
the input ids.

Not counted: the CUDA context and allocator fragmentation (keep ~10% free: `--headroom`), NCCL buffers,
DeepSpeed's communication buffers (small against the above), the evaluation pass (smaller than training) and the
model loading phase (host memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

GiB = 2 ** 30
DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed defaults
DS_REUSE_DISTANCE = int(1e9)
DS_SUB_GROUP = int(1e9)


@dataclass
class Arch:
    """What the estimate needs from a causal LM's config.json (counted on a meta-device instance)."""
    params: int  # unique elements (a tied lm_head counted once)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_rows: int
    tied: bool
    qk_norm: bool
    layer_params: int  # largest decoder layer
    lm_head_params: int
    linear_shapes: dict = field(default_factory=dict)  # per-layer Linear name -> (in, out)
    softcap: bool = False  # the family caps its logits (heads.py): the loss keeps one more [slab, V] buffer

    @property
    def hq(self) -> int:
        return self.heads * self.head_dim

    @property
    def hkv(self) -> int:
        return self.kv_heads * self.head_dim

    def act_per_token(self, lora_targets=(), lora_rank: int = 0, lora_dropout: float = 0.0) -> int:
        """Elements saved for backward per decoder layer and token (see the module docstring)."""
        n = 6 * self.hidden + 4 * self.hq + 4 * self.intermediate + self.heads + 2
        if self.qk_norm:
            n += 2 * self.hq + 2 * self.hkv + self.heads + self.kv_heads
        if lora_rank:
            for t in lora_targets:
                if t in self.linear_shapes:
                    n += lora_rank + (self.linear_shapes[t][0] if lora_dropout > 0 else 0)
        return n


def read_arch(path: str, trust_remote_code: bool = False) -> Arch:
    """Build the model from `path`/config.json on the meta device (no weights read) and measure its shapes."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_distill.heads import transform_of

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    layers = model.get_decoder().layers
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    shapes = {}
    for name, m in layers[0].named_modules():
        if isinstance(m, nn.Linear):
            shapes[name.rsplit(".", 1)[-1]] = (m.in_features, m.out_features)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    heads = tc.num_attention_heads
    return Arch(params=total, layers=len(layers), hidden=tc.hidden_size, heads=heads,
                kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
                intermediate=tc.intermediate_size, vocab_rows=head.weight.shape[0], tied=tied,
                qk_norm=any(n.endswith("q_norm") for n, _ in layers[0].named_modules()),
                layer_params=layer_params, lm_head_params=head.weight.numel(), linear_shapes=shapes,
                softcap=transform_of(tc).softcap is not None)


@dataclass
class Item:
    name: str
    bytes: float
    where: str = "device"  # device | host
    note: str = ""


@dataclass
class Plan:
    world_size: int
    micro_batch_size: int
    chunk_size: int
    max_length: int
    precision: str
    states: list  # resident Items
    phases: dict  # phase name -> list of transient Items
    notes: list = field(default_factory=list)

    def device_bytes(self, items) -> float:
        return sum(i.bytes for i in items if i.where == "device")

    @property
    def resident(self) -> float:
        return self.device_bytes(self.states)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.device_bytes(self.phases[k]))

    @property
    def peak(self) -> float:
        return self.resident + self.device_bytes(self.phases[self.peak_phase])

    @property
    def host(self) -> float:
        return sum(i.bytes for i in self.states if i.where == "host")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# teacher.placement: separate: micro-batches a teacher rank keeps in flight per student (teacher_apart.QUEUE_DEPTH)
SEPARATE_QUEUE_DEPTH = 2
REPLICATE_FRACTION = 0.25  # teacher.sharding auto replicates a teacher whose weights take at most this of a GPU


def auto_teacher_sharding(teacher_bytes: float, device_memory_bytes: Optional[float], *, offload_params: bool) -> str:
    """teacher.sharding: auto -> replicate or zero3. Replicated, the teacher's forward needs no collective at all
    (ZeRO-3 all-gathers the whole teacher for every micro-batch); it is chosen on GPUs when its weights take at most
    REPLICATE_FRACTION of one device's memory (the student, its optimizer and the activations need the rest). On
    CPU ranks (device_memory_bytes None: the ranks of a host share its memory) and with teacher.offload_params:
    zero3."""
    if offload_params or not device_memory_bytes:
        return "zero3"
    return "replicate" if teacher_bytes <= REPLICATE_FRACTION * device_memory_bytes else "zero3"


def teacher_gather_seconds(teacher_params: int, e: int, world_size: int, gpus_per_node: int, *,
                           intra_gbps: float, inter_gbps: float) -> tuple[float, float]:
    """(bytes each rank receives, seconds) of the all-gathers of one ZeRO-3 teacher forward: (dp - 1)/dp of the
    teacher's weights, the part held within the node at `intra_gbps`, the rest at `inter_gbps` (GB/s per GPU)."""
    received = teacher_params * e * (world_size - 1) / world_size
    local = teacher_params * e * (min(gpus_per_node, world_size) - 1) / world_size
    remote = received - local
    return received, local / (intra_gbps * 1e9) + remote / (inter_gbps * 1e9)


@dataclass
class _Setup:
    """The quantities every part of a student-side estimate shares (estimate() derives them once)."""
    cfg: object
    device: str
    role: str
    e: int  # bytes per element of the precision
    dp: int  # data-parallel ranks of the student
    B: int
    S: int
    c_size: int
    stage: int
    s: Arch
    t: Optional[Arch]
    lora_targets: list
    N: int  # student parameters (+ adapters)
    Nt: int  # trainable parameters
    opt_where: str
    replicated: bool

    @property
    def tok(self) -> int:
        return self.B * self.S

    @property
    def mask_bytes(self) -> int:  # per layer that keeps its activations
        return self.B * self.S * self.S * (4 if self.device == "cpu" else 1)


def estimate(cfg, *, world_size: int, device: str = "gpu", student: Optional[Arch] = None,
             teacher: Optional[Arch] = None, micro_batch_size: Optional[int] = None,
             chunk_size: Optional[int] = None, precision: Optional[str] = None,
             teacher_sharding: str = "zero3", role: str = "colocated", teacher_ranks: int = 1) -> Plan:
    """Estimate per-rank memory for `cfg` (a DistillConfig) on `world_size` ranks of kind `device` (gpu | cpu);
    `teacher_sharding` is a resolved teacher.sharding (replicate: the whole teacher on every rank, no gathers).

    teacher.placement: separate: `world_size` counts every launched rank and `role` picks whose memory: "student"
    (the world_size - teacher_ranks student ranks: ZeRO over them, no teacher weights but its lm_head whole, as
    received from the teacher rank) or "teacher" (a teacher rank: the teacher ZeRO-3 over teacher_ranks or
    replicated, its forward, and the hidden states queued for its students)."""
    if role == "teacher":
        return _teacher_rank_plan(cfg, world_size=world_size, device=device, teacher=teacher,
                                  micro_batch_size=micro_batch_size, precision=precision,
                                  teacher_sharding=teacher_sharding, teacher_ranks=teacher_ranks)
    T = cfg.train
    prec = precision or T.precision
    if prec == "auto":
        prec = "bf16" if device == "gpu" else "fp32"
    s = student or read_arch(cfg.student.path, cfg.student.trust_remote_code)
    kd = cfg.loss.alpha > 0 and (cfg.teacher.path is not None or teacher is not None)
    t = teacher if teacher is not None else (read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code)
                                             if kd and cfg.teacher.path else None)
    lora = cfg.student.lora
    lora_targets = list(lora.target_modules) if lora.rank > 0 else []
    adapters = sum(lora.rank * (i + o) for name, (i, o) in s.linear_shapes.items() if name in lora_targets) * s.layers
    u = _Setup(cfg=cfg, device=device, role=role, e=4 if prec == "fp32" else 2,
               dp=world_size - teacher_ranks if role == "student" else world_size,
               B=micro_batch_size or T.micro_batch_size, S=cfg.data.max_length,
               c_size=chunk_size or cfg.loss.chunk_size, stage=T.zero_stage, s=s, t=t, lora_targets=lora_targets,
               N=s.params + adapters, Nt=adapters if lora.rank > 0 else s.params,
               opt_where="host" if T.offload_optimizer else "device",
               replicated=t is not None and teacher_sharding == "replicate")
    states = _student_states(u) + _teacher_states(u)
    phases = {"student forward end": _forward_end_phase(u)}
    if t is not None and role != "student":  # on the teacher ranks when they are separate
        phases["teacher forward"] = _teacher_forward_phase(u)
    if u.stage == 3:
        sub_group = int((cfg.ds_config_overrides or {}).get("zero_optimization", {}).get("sub_group_size",
                                                                                         DS_SUB_GROUP))
        phases["optimizer init"] = [Item("fp32 sub-group buffer (ZeRO-3 init)", 4 * min(u.Nt, sub_group),
                                         u.opt_where)]
    _add_on_policy(u, states, phases)
    plan = Plan(world_size=u.dp, micro_batch_size=u.B, chunk_size=u.c_size, max_length=u.S, precision=prec,
                states=states, phases=phases)
    if role == "student":
        plan.notes.append(f"teacher.placement: separate: the {u.dp} student ranks of {world_size}; the teacher's "
                          "weights are on the teacher ranks")
    elif cfg.teacher.offload_params and t is not None:
        plan.notes.append(f"teacher.offload_params: every forward copies the teacher's shard host->device "
                          f"({_ceil_div(t.params, u.dp) * u.e / GiB:.2f} GiB per rank per micro-batch over PCIe)")
    return plan


def _student_states(u: _Setup) -> list[Item]:
    """The student's model states: parameters, AdamW, master weights, gradients, the reduce bucket."""
    e, dp, N, Nt, stage, opt_where = u.e, u.dp, u.N, u.Nt, u.stage, u.opt_where
    states: list[Item] = []
    if stage == 3:
        states.append(Item("student params (ZeRO-3 shard)", _ceil_div(N, dp) * e, note=f"{N / 1e6:.1f}M / {dp}"))
    else:
        states.append(Item(f"student params (ZeRO-{stage}: whole)", N * e, note=f"{N / 1e6:.1f}M"))
    opt_div = dp if stage >= 1 else 1
    states.append(Item("AdamW m + v (fp32)", 8 * _ceil_div(Nt, opt_div), opt_where,
                       f"{Nt / 1e6:.2f}M trainable" + (f" / {opt_div}" if opt_div > 1 else "")))
    if e != 4 or stage >= 1:
        states.append(Item("fp32 master weights", 4 * _ceil_div(Nt, opt_div), opt_where))
    if stage == 3:
        states.append(Item("gradient partitions (fp32)", 4 * _ceil_div(Nt, dp), opt_where))
    elif stage == 2:
        states.append(Item("gradient partitions", e * _ceil_div(Nt, dp)))
    else:
        states.append(Item("gradients (whole)", e * Nt))
        if stage == 0 and e != 4:
            states.append(Item("fp32 gradient accumulators (bf16 optimizer)", 4 * Nt))
    if stage in (2, 3):
        bucket = int((u.cfg.ds_config_overrides or {}).get("zero_optimization", {}).get("reduce_bucket_size",
                                                                                        DS_REDUCE_BUCKET))
        b = bucket if u.device == "gpu" else min(bucket, Nt)
        states.append(Item("reduce bucket", b * e, note=f"reduce_bucket_size {bucket:.0e}"))
    return states


def _teacher_states(u: _Setup) -> list[Item]:
    """The teacher's weights on a student-side rank: its shard, a replica, or only its head (separate ranks)."""
    t, e = u.t, u.e
    if t is None:
        return []
    if u.role == "student":
        return [Item("teacher lm_head (whole, sent by its teacher rank)", t.lm_head_params * e,
                     note=f"{t.lm_head_params / 1e6:.1f}M")]
    if u.replicated:
        return [Item("teacher params (replicated: whole)", t.params * e, note=f"{t.params / 1e6:.1f}M")]
    offload = u.cfg.teacher.offload_params
    return [Item("teacher params (ZeRO-3 shard)", _ceil_div(t.params, u.dp) * e, "host" if offload else "device",
                 f"{t.params / 1e6:.1f}M / {u.dp}" + (" (offloaded)" if offload else ""))]


def _forward_end_phase(u: _Setup) -> list[Item]:
    """What is live when the student's forward ends and its backward starts (the peak of most runs)."""
    cfg, s, t, e, tok, B, S = u.cfg, u.s, u.t, u.e, u.tok, u.B, u.S
    lora = cfg.student.lora
    ph: list[Item] = []
    if u.stage == 3:
        reuse = int((cfg.ds_config_overrides or {}).get("zero_optimization", {}).get("stage3_max_reuse_distance",
                                                                                     DS_REUSE_DISTANCE))
        gathered = min(u.N, reuse // 2 + s.layer_params + s.lm_head_params)
        ph.append(Item("gathered student weights (ZeRO-3 reuse window)", gathered * e,
                       note=f"min(N, stage3_max_reuse_distance/2 + layer + lm_head) = {gathered / 1e6:.1f}M"))
    per_tok = s.act_per_token(u.lora_targets, lora.rank, lora.dropout)
    final = 2 * s.hidden + 1
    if cfg.student.activation_checkpointing:
        acts = tok * e * (s.layers * s.hidden + per_tok + final) + u.mask_bytes
        note = f"{s.layers} x layer inputs + 1 recomputed layer ({per_tok} el/token)"
    else:
        acts = tok * e * (s.layers * per_tok + final) + s.layers * u.mask_bytes
        note = f"{s.layers} layers x {per_tok} el/token"
    ph.append(Item("student activations", acts + tok * 8, note=f"{note}, {B} x {S} tokens"))
    ph.append(Item("activation gradients (one layer, backward)", tok * e * (2 * s.intermediate + 2 * s.hidden)))
    # fused loss (losses._FusedLinearDistill): hidden out, two selections, grad_h + its scatter, chunk buffers
    V = min(s.vocab_rows, t.vocab_rows) if t is not None else s.vocab_rows
    c = min(u.c_size, tok)
    ph.append(Item("student final hidden + loss row copies + hidden grads", tok * s.hidden * e * 5))
    chunk = c * V * 4 * (2 if t is not None else 1) + (c * V * e if e != 4 else 0)
    from ds_distill.losses import slab_rows, slab_temps

    # compiled slabs (loss.compile) allocate their own temporaries, the softcap's derivative included
    # (auto counts as on for GPUs, as if Triton were installed there)
    compiled = cfg.loss.impl == "chunked" and (cfg.loss.compile in (True, "on")
                                               or cfg.loss.compile == "auto" and u.device == "gpu")
    slab = min(slab_rows(u.device, V), c)
    temps = slab_temps(cfg.loss.layout, compiled) + (1 if s.softcap and not compiled else 0)
    ph.append(Item("loss chunk buffers", chunk + temps * slab * V * 4,
                   note=f"{'2' if t is not None else '1'} x {c} x {V} fp32 + {temps} x {slab} x V"))
    if lora.rank == 0:
        ph.append(Item("lm_head gradient accumulator (fp32)", s.vocab_rows * s.hidden * 4
                       + (s.vocab_rows * s.hidden * (4 + e) if e != 4 else 0)))
    if t is not None:
        ph.append(Item("teacher hidden states + row copies", tok * t.hidden * e * 3))
        if not u.replicated and u.role != "student":
            ph.append(Item("teacher lm_head (gathered)", t.lm_head_params * e))
    return ph


def _teacher_forward_phase(u: _Setup) -> list[Item]:
    """The teacher's forward: a gathered layer and the prefetch (ZeRO-3), its layer activations (no grad)."""
    import json

    t, e = u.t, u.e
    tjs = {}
    try:
        with open(u.cfg.teacher.ds_config) as f:
            tjs = json.load(f).get("zero_optimization", {})
    except OSError:
        pass
    prefetch = int(tjs.get("stage3_prefetch_bucket_size", 5e7))
    return ([] if u.replicated else [
        Item("teacher gathered layer + prefetch", (t.layer_params + min(prefetch, t.params)) * e)]) + [
        Item("teacher layer activations (no grad)",
             u.tok * e * (3 * t.intermediate + 4 * t.hq + 3 * t.hidden) + u.mask_bytes)]


def _add_on_policy(u: _Setup, states: list[Item], phases: dict) -> None:
    """on-policy sampling (generation.py): unsharded copies kept between steps, the KV cache while sampling."""
    op = getattr(u.cfg, "on_policy", None)
    if op is None or (op.lmbda <= 0 and op.seq_kd <= 0):
        return
    s, t, e, B = u.s, u.t, u.e, u.B
    if op.lmbda > 0 and op.generator == "gathered" and u.stage == 3:
        states.append(Item("on-policy student copy (unsharded, generator: gathered)", s.params * e,
                           note=f"{s.params / 1e6:.1f}M; generator: engine avoids it"))
    if op.seq_kd > 0 and t is not None and not u.replicated:
        states.append(Item("seq-KD teacher copy (unsharded)", t.params * e, note=f"{t.params / 1e6:.1f}M"))
    gen_len = u.S + op.max_new_tokens
    sampler = max([s] + ([t] if op.seq_kd > 0 and t is not None else []), key=lambda a: a.layers * a.hkv)
    phases["on-policy sampling"] = [
        Item("KV cache", 2 * sampler.layers * sampler.hkv * B * gen_len * e,
             note=f"{B} x (max_length + max_new_tokens = {gen_len}) tokens"),
        Item("next-token logits + sampling buffers (fp32)", 4 * B * sampler.vocab_rows * 4)]


def _teacher_rank_plan(cfg, *, world_size: int, device: str, teacher: Optional[Arch], micro_batch_size: Optional[int],
                       precision: Optional[str], teacher_sharding: str, teacher_ranks: int) -> Plan:
    """Memory of one teacher rank of teacher.placement: separate (see `estimate`)."""
    import json

    prec = precision or cfg.train.precision
    if prec == "auto":
        prec = "bf16" if device == "gpu" else "fp32"
    e = 4 if prec == "fp32" else 2
    t = teacher or read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code)
    K = teacher_ranks
    B = micro_batch_size or cfg.train.micro_batch_size
    S = cfg.data.max_length
    tok = B * S
    served = _ceil_div(world_size - K, K)  # student ranks per teacher rank (the first ones serve one more)
    offload = cfg.teacher.offload_params and teacher_sharding != "replicate"
    if teacher_sharding == "replicate":
        states = [Item("teacher params (replicated: whole)", t.params * e, note=f"{t.params / 1e6:.1f}M")]
    else:
        states = [Item("teacher params (ZeRO-3 shard over the teacher ranks)", _ceil_div(t.params, K) * e,
                       "host" if offload else "device", f"{t.params / 1e6:.1f}M / {K}")]
    mask_bytes = B * S * S * (4 if device == "cpu" else 1)
    tjs = {}
    try:
        with open(cfg.teacher.ds_config) as f:
            tjs = json.load(f).get("zero_optimization", {})
    except OSError:
        pass
    prefetch = int(tjs.get("stage3_prefetch_bucket_size", 5e7))
    fwd = ([] if teacher_sharding == "replicate" else [
        Item("teacher gathered layer + prefetch", (t.layer_params + min(prefetch, t.params)) * e)]) + [
        Item("teacher layer activations (no grad)", tok * e * (3 * t.intermediate + 4 * t.hq + 3 * t.hidden)
             + mask_bytes),
        Item("hidden states queued for its students", (SEPARATE_QUEUE_DEPTH + 1) * served * tok * t.hidden * e,
             note=f"({SEPARATE_QUEUE_DEPTH} + 1) x {served} student(s) x [{B}, {S}, {t.hidden}]")]
    phases = {"teacher forward": fwd, "start: lm_head gathered to send": [
        Item("teacher lm_head (whole)", t.lm_head_params * e)]}
    plan = Plan(world_size=K, micro_batch_size=B, chunk_size=cfg.loss.chunk_size, max_length=S, precision=prec,
                states=states, phases=phases)
    plan.notes.append(f"teacher.placement: separate: one of the {K} teacher ranks of {world_size}, serving {served} "
                      "student rank(s); no optimizer, no student")
    return plan


def suggest(cfg, *, world_size: int, memory_bytes: float, device: str = "gpu", headroom: float = 0.1,
            student: Optional[Arch] = None, teacher: Optional[Arch] = None,
            max_micro_batch: int = 1024, teacher_sharding: str = "zero3", role: str = "colocated",
            teacher_ranks: int = 1) -> Optional[tuple[int, int, Plan]]:
    """Largest power-of-two micro_batch_size <= max_micro_batch (then the largest chunk_size up to 4096) whose
    peak fits in memory x (1 - headroom).

    Returns (micro_batch_size, chunk_size, plan) or None when even micro_batch_size 1 with chunk_size 128 does not
    fit.
    """
    budget = memory_bytes * (1 - headroom)
    s = student or read_arch(cfg.student.path, cfg.student.trust_remote_code)
    t = teacher
    if t is None and cfg.loss.alpha > 0 and cfg.teacher.path:
        t = read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code)
    kw = dict(world_size=world_size, device=device, student=s, teacher=t, teacher_sharding=teacher_sharding,
              role=role, teacher_ranks=teacher_ranks)
    chunks = [128, 256, 512, 1024, 2048, 4096]  # beyond ~4k rows a chunk saves kernel launches, not time
    best = None
    mbs = 1
    while mbs <= max_micro_batch:
        fits = [c for c in chunks if estimate(cfg, micro_batch_size=mbs, chunk_size=c, **kw).peak <= budget]
        if not fits:
            break
        best = (mbs, fits[-1])
        mbs *= 2
    if best is None:
        return None
    return best[0], best[1], estimate(cfg, micro_batch_size=best[0], chunk_size=best[1], **kw)


def render(plan: Plan, memory_bytes: Optional[float] = None, headroom: float = 0.1) -> str:
    """A table of the estimate (GiB per rank)."""
    def row(i: Item) -> str:
        return f"  {i.name:<52} {i.bytes / GiB:>9.3f} {i.where:<6} {i.note}"

    lines = [f"per-rank memory estimate: {plan.world_size} ranks, micro_batch_size {plan.micro_batch_size} x "
             f"max_length {plan.max_length}, chunk_size {plan.chunk_size}, {plan.precision}",
             f"  {'resident':<52} {'GiB':>9}"]
    lines += [row(i) for i in plan.states]
    lines.append(f"  {'= resident on device':<52} {plan.resident / GiB:>9.3f}")
    for name, items in plan.phases.items():
        lines.append(f"  transient: {name}" + ("   <- peak" if name == plan.peak_phase else ""))
        lines += [row(i) for i in items]
    lines.append(f"  {'= PEAK on device':<52} {plan.peak / GiB:>9.3f}")
    if plan.host:
        lines.append(f"  {'host memory (offloaded)':<52} {plan.host / GiB:>9.3f}")
    if memory_bytes:
        budget = memory_bytes * (1 - headroom)
        verdict = "fits" if plan.peak <= budget else "DOES NOT FIT"
        lines.append(f"  {verdict} in {memory_bytes / GiB:.1f} GiB with {headroom:.0%} headroom "
                     f"({budget / GiB:.1f} GiB usable)")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
