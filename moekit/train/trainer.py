"""The training loop: AdamW, warmup + cosine LR, batch ramp with gradient accumulation, clipping,
bf16 autocast on GPU, MoE aux losses, per-source validation, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from moekit.config import RunConfig
from moekit.data.pipeline import DataBundle, prepare_data, unigram_entropy
from moekit.data.tokenizer import Tokenizer
from moekit.errors import CheckpointError, TrainingError
from moekit.model.transformer import Transformer, build_model
from moekit.train import checkpoint as ckpt_io
from moekit.train.metrics import MetricsLogger, NullLogger, plot_run
from moekit.train.schedule import batch_tokens_at, lr_at
from moekit.train.stopping import StopRequests


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """bf16 on GPU by default; fp32 on CPU unless bfloat16 is asked for."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on GPU by default; fp32 on CPU unless bfloat16 is asked for."""
    if uses_bf16(device, dtype):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    # no weight decay on norms (1-D); matrices, experts and embeddings decay
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, kind: str = "kl") -> torch.Tensor:
    """Per token, averaged, on logits [..., V] softened by the temperature: "kl" is KL(teacher ||
    student) scaled by T^2 so gradients keep their size (Hinton et al., 2015); "tvd" is the total
    variation distance 1/2 |p - q|_1, whose complement is exactly the rate at which speculative
    sampling accepts the student's proposals (Leviathan et al., 2023)."""
    t = temperature
    log_s = torch.log_softmax(student.float() / t, -1)
    log_t = torch.log_softmax(teacher.float() / t, -1)
    if kind == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1).mean()
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t


@dataclass
class StepResult:
    loss: float  # cross-entropy, mean over the step's micro-batches
    balance: float
    z: float
    grad_norm: float
    expert_load: list[list[float]]  # [moe layers][experts]
    dropped: float
    distill_kl: float = 0.0


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, data: DataBundle, device: torch.device, dist_ctx=None):
        self.cfg, self.run_dir, self.data, self.device, self.dist = cfg, run_dir, data, device, dist_ctx
        torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
        self.model: Transformer = build_model(cfg.model, device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.ep_group = self.pipe = None
        if dist_ctx is not None and dist_ctx.dims.pp > 1:
            from moekit.parallel.pipeline import build_pipeline

            self.pipe = build_pipeline(self.model, dist_ctx.mesh, device, cfg.train.pp_schedule,
                                       cfg.train.pp_microbatches, bf16=device.type == "cuda")
            self.model = self.pipe.module  # this rank's stage; parameter names as in the plain model
        elif dist_ctx is not None:  # tensor, expert and data parallelism, in that order
            from moekit.parallel.parallelize import parallelize

            parallelize(self.model, dist_ctx.mesh, dist_ctx.dims)
            self.ep_group = dist_ctx.mesh.get_group("ep") if dist_ctx.dims.ep > 1 else None
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.opt = make_optimizer(self.model, cfg.train, device)
        self.step = 0
        self.teacher = None
        if cfg.train.distill_from:
            from moekit.infer.generate import load_for_inference

            self.teacher, _ = load_for_inference(cfg.train.distill_from, str(device))
            self.teacher.requires_grad_(False)
        self._teacher_engine = None
        self._served: Transformer | None = None
        self._written: list[tuple[torch.Tensor, torch.Tensor]] = []  # on-policy micro-batches not yet used
        self._evaluated: tuple[int, dict[str, float]] | None = None  # (step, figures) of the last evaluation
        self.stopped: str | None = None  # why fit() stopped before the last step

    # -- state -------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def state(self, optimizer: dict | None = None) -> dict:
        """Step, data cursor and RNG; and the optimizer state of full checkpoints, keyed by
        parameter name with whole tensors, which loads at any layout."""
        st = {"step": self.step, "data": self.data.mixture.state_dict(), "rng_cpu": torch.get_rng_state()}
        if self._written:
            st["on_policy_written"] = torch.stack([torch.stack(xy) for xy in self._written])  # [n, 2, B, T]
        if optimizer is not None:
            st["optimizer"] = optimizer
        if self.device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def load(self, ckpt: Path) -> None:
        from moekit.parallel.runtime import load_full_state

        st = ckpt_io.load_state(ckpt)
        sharded = ckpt_io.is_sharded(ckpt)
        if self.dist is None and not sharded:
            ckpt_io.load_weights(self.model, ckpt)  # checks names and shapes, then loads
        try:
            if sharded:  # torch.distributed.checkpoint reshards to this run's layout
                from moekit.parallel.sharded_checkpoint import load_sharded

                load_sharded(self.model, self.opt, ckpt / ckpt_io.DCP_DIR, self._ep_mesh())
            else:
                weights = load_file(str(ckpt / "model.safetensors")) if self.dist is not None else None
                osd = st["optimizer"]
                if self.pipe is not None:  # this stage's share of the full state
                    from moekit.parallel.pipeline import stage_subset

                    weights, osd = stage_subset(self.model, weights, osd)
                load_full_state(self.model, self.opt, weights, osd)
            self.data.mixture.load_state_dict(st["data"])
            self._evaluated = None
            self._written = [(xy[0], xy[1]) for xy in st.get("on_policy_written", [])]
            tc = self.cfg.train
            if any(x.shape != (tc.micro_batch, tc.seq_len) for x, _ in self._written) or self.dist is not None:
                self._written = []  # written for another layout: the teacher writes anew
            torch.set_rng_state(st["rng_cpu"])
            if "rng_cuda" in st and self.device.type == "cuda":
                torch.cuda.set_rng_state(st["rng_cuda"], self.device)
            self.step = int(st["step"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / 'state.pt'} does not match this run: {e}") from None

    def _ep_mesh(self):
        return self.dist.mesh["ep"] if self.ep_group is not None else None

    def save(self) -> Path | None:
        from moekit.parallel.runtime import full_model_state, full_optimizer_state

        if self.cfg.train.ckpt_format == "dcp":
            return self._save_sharded()
        if self.pipe is not None:  # every stage's share, gathered on rank 0
            from moekit.parallel.pipeline import gather_full_state

            weights, osd = gather_full_state(self.pipe, self.opt)
        else:
            weights = full_model_state(self.model) if self.dist is not None else None  # collective
            osd = full_optimizer_state(self.model, self.opt)  # collective under FSDP
        state = self.state(osd)
        path = None
        if self.is_main:
            path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.model, self.cfg, self.data.tokenizer,
                                           state, self.cfg.train.keep_last, weights=weights)
        if self.dist is not None:
            torch.distributed.barrier()
        return path

    def _save_sharded(self) -> Path | None:
        """torch.distributed.checkpoint: each rank writes its shard into the temp folder that rank 0
        made; rank 0 then adds config, tokenizer and state, the manifest, and renames it."""
        from moekit.parallel.sharded_checkpoint import save_sharded

        tmp = [ckpt_io.begin_checkpoint(self.run_dir, self.step) if self.is_main else None]
        if self.dist is not None:
            torch.distributed.broadcast_object_list(tmp, src=0)
        save_sharded(self.model, self.opt, tmp[0] / ckpt_io.DCP_DIR, self._ep_mesh())  # collective
        path = None
        if self.is_main:
            path = ckpt_io.finish_checkpoint(tmp[0], self.run_dir, self.step, self.cfg, self.data.tokenizer,
                                             self.state(), self.cfg.train.keep_last)
        if self.dist is not None:
            torch.distributed.barrier()
        return path

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> StepResult:
        tc = self.cfg.train
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, tc)
        accum = batch_tokens_at(self.step, tc) // (tc.micro_batch * tc.seq_len)
        self.model.train()
        if self.pipe is not None:
            return self._pipeline_step(accum)
        ce = bal = z = dropped = distill = torch.zeros((), device=self.device)
        load = None
        world = self.dist.world if self.dist else 1
        if self.dist is not None:
            from moekit.parallel.parallelize import data_shard

            shards, shard = data_shard(self.dist.mesh)  # dp x ep shards; tp ranks read the same rows
        else:
            shards, shard = 1, 0
        for _micro in range(accum):
            # every rank reads the same stream and keeps its own slice of the global micro-batch
            x, y = self.data.mixture.next_batch(tc.micro_batch * shards, tc.seq_len)  # [shards*B, T]
            x, y = x[shard * tc.micro_batch:(shard + 1) * tc.micro_batch], y[shard * tc.micro_batch:(shard + 1) * tc.micro_batch]
            if self._on_policy(accum, _micro):
                x, y = self._on_policy_batch(x, seed=(self.step * accum + _micro) * x.shape[0])
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_for(self.device, tc.dtype):
                out = self.forward(x, y)
                loss = out.loss
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(x).logits
                    kl = distill_loss(out.logits, teacher_logits, tc.distill_temperature, tc.distill_loss)
                    loss = loss + tc.distill_alpha * (kl - out.ce_loss)
                    distill = distill + kl.detach() / accum
            (loss / accum).backward()
            ce = ce + out.ce_loss.detach() / accum
            if out.router_stats:
                bal = bal + out.balance_loss.detach() / accum
                z = z + out.z_loss.detach() / accum
                layer_load = torch.stack([s.load for s in out.router_stats])  # [moe layers, E]
                load = layer_load / accum if load is None else load + layer_load / accum
                dropped = dropped + torch.stack([s.dropped for s in out.router_stats]).mean() / accum
        if self.dist is not None:
            from moekit.parallel.parallelize import clip_grad_norm, reduce_grads

            reduce_grads(self.model, self.dist.mesh, self.dist.dims)
            grad_norm = clip_grad_norm(self.model, tc.grad_clip, self.dist.dims)  # over all ranks' pieces
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        if self.dist is not None:  # log the global means
            for t in (ce, bal, z, dropped) + ((load,) if load is not None else ()):
                torch.distributed.all_reduce(t)
                t.div_(world)
        loss = ce.item()  # one host sync per optimizer step, for the NaN guard and the log
        if not math.isfinite(loss) or not math.isfinite(grad_norm.item()):
            ckpts = ckpt_io.list_checkpoints(self.run_dir)
            raise TrainingError(f"loss became {loss} (grad norm {grad_norm.item()}) at step {self.step}; "
                                f"stopped without saving; last good checkpoint: {ckpts[-1] if ckpts else 'none'}")
        if self.dist is not None:
            from moekit.parallel.parallelize import optimizer_step

            optimizer_step(self.opt)  # plain and DTensor parameters side by side under --tp
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(loss, bal.item(), z.item(), grad_norm.item(),
                          load.tolist() if load is not None else [], dropped.item(), distill.item())

    # -- on-policy distillation ---------------------------------------------------------------------
    def _on_policy(self, accum: int, micro: int) -> bool:
        """Whether this micro-batch is written by the teacher: a fixed share of them, spread evenly
        (decided by the step and the micro-batch, so a resumed run decides alike)."""
        f = self.cfg.train.distill_on_policy
        m = self.step * accum + micro
        return f > 0 and int((m + 1) * f) > int(m * f)

    def _served_teacher(self) -> Transformer:
        """The teacher as it is served, which a draft will be verified against: under bf16
        training on GPU a bf16 copy (made once; half the bytes per decode step of float32)."""
        if self._served is None:
            self._served = self.teacher
            if self.device.type == "cuda" and uses_bf16(self.device, self.cfg.train.dtype):
                self._served = copy.deepcopy(self.teacher).to(torch.bfloat16)
        return self._served

    def _on_policy_batch(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch written by the teacher. When none is waiting, the teacher writes
        distill_on_policy_pool of them in one go: from x and the next pool - 1 micro-batches of the
        data stream."""
        if not self._written:
            B, T = x.shape
            pool = self.cfg.train.distill_on_policy_pool if self.dist is None else 1
            rows = torch.cat([x] + [self.data.mixture.next_batch(B, T)[0] for _ in range(pool - 1)])
            xs, ys = self._teacher_writes(rows, seed=seed)
            self._written = list(zip(xs.split(B), ys.split(B)))
        return self._written.pop(0)

    @torch.no_grad()
    def _teacher_writes(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A corpus prefix of each row of x (its first quarter, or all but distill_on_policy_tokens),
        continued by the teacher through the inference engine to seq_len + 1 tokens (greedily, or
        sampled at distill_on_policy_temperature with row i seeded seed + i, so a resumed run
        writes the same): (inputs, next-token targets)."""
        from moekit.infer.engine import Engine, EngineConfig
        from moekit.infer.kv_cache import kv_bytes_per_token
        from moekit.infer.sampling import SamplingParams

        B, T = x.shape
        if self._teacher_engine is None:
            writer = self._served_teacher()
            dtype = next(writer.parameters()).dtype
            budget = B * (T + 64) * kv_bytes_per_token(writer.cfg, dtype)  # all rows at once
            chunk = max(1024, min(B * T, 32768))  # prompt tokens per prefill step
            self._teacher_engine = Engine(writer, None, EngineConfig(kv_budget=str(budget), max_num_seqs=B,
                                                                     max_num_batched_tokens=chunk))
        total = min(T + 1, self._teacher_engine.max_model_len)  # T + 1 tokens where the teacher's context allows
        written = self.cfg.train.distill_on_policy_tokens
        prefix = min(max(1, total - written if written else T // 4), total - 1)  # the teacher writes >= 1 token
        temp = self.cfg.train.distill_on_policy_temperature
        params = [SamplingParams(max_tokens=total - prefix, temperature=temp, seed=seed + i if temp else None,
                                 ignore_eos=True) for i in range(B)]
        outs = self._teacher_engine.generate([row[:prefix].tolist() for row in x], params)
        seqs = torch.tensor([row[:prefix].tolist() + o.output_token_ids for row, o in zip(x, outs)])
        y = torch.full((B, T), -100, dtype=seqs.dtype)  # a target past the teacher's context is ignored
        y[:, :total - 1] = seqs[:, 1:]
        return seqs[:, :T], y

    def _pipeline_step(self, accum: int) -> StepResult:
        """One optimizer step through the pipeline stages: the last stage computes the loss; the
        logged means reach every rank; the gradient norm is clipped over all stages."""
        from moekit.parallel import pipeline

        tc = self.cfg.train
        replicas, replica = self.dist.dims.dp, self.dist.mesh["dp"].get_local_rank()
        batches = []
        for _ in range(accum):  # every rank reads the same stream; a data-parallel replica keeps its slice
            x, y = self.data.mixture.next_batch(tc.micro_batch * replicas, tc.seq_len)  # [dp*B, T]
            rows = slice(replica * tc.micro_batch, (replica + 1) * tc.micro_batch)
            batches.append((x[rows].to(self.device), y[rows].to(self.device)))
        r = pipeline.train_step(self.pipe, batches, lambda: autocast_for(self.device, tc.dtype))
        grad_norm = pipeline.clip_grad_norm(self.pipe, tc.grad_clip)
        loss = r.ce.item()
        if not math.isfinite(loss) or not math.isfinite(grad_norm.item()):
            ckpts = ckpt_io.list_checkpoints(self.run_dir)
            raise TrainingError(f"loss became {loss} (grad norm {grad_norm.item()}) at step {self.step}; "
                                f"stopped without saving; last good checkpoint: {ckpts[-1] if ckpts else 'none'}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        moe = self.model.n_moe > 0
        return StepResult(loss, r.balance.item(), r.z.item(), grad_norm.item(),
                          r.load.tolist() if moe else [], r.dropped.item())

    def evaluate(self) -> dict[str, float]:
        """Validation loss per source (and a distilled draft's acceptance). The weights change only
        with the step, so a second call at the same step (the run's final report after its last
        step's evaluation) returns the figures already measured."""
        if self._evaluated is None or self._evaluated[0] != self.step:
            self._evaluated = (self.step, self._evaluate())
        return dict(self._evaluated[1])

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        tc = self.cfg.train
        if self.pipe is not None:
            from moekit.parallel.pipeline import evaluate_ce

            return {f"val/{name}": evaluate_ce(self.pipe, seqs, tc.micro_batch, self.device,
                                               lambda: autocast_for(self.device, tc.dtype))
                    for name, seqs in self.data.val.items()}
        self.model.eval()
        out = {}
        for name, seqs in self.data.val.items():  # [n, seq_len + 1]
            losses = []
            for i in range(0, len(seqs), tc.micro_batch):
                chunk = seqs[i:i + tc.micro_batch].to(self.device)
                with autocast_for(self.device, tc.dtype):
                    losses.append(self.model(chunk[:, :-1], chunk[:, 1:]).ce_loss.float() * len(chunk))
            out[f"val/{name}"] = (torch.stack(losses).sum() / len(seqs)).item()
        if self.teacher is not None and tc.distill_eval_prompts and self.dist is None:
            out.update(self._draft_acceptance())
        self.model.train()
        return out

    def _draft_acceptance(self) -> dict[str, float]:
        """The model as the teacher's speculative draft: greedy decoding of held-out prompts (the
        first half of validation sequences, taken from each source in turn), each continued for up
        to 32 tokens with distill_eval_k proposals a step. The acceptance rate and the tokens
        emitted per step, as the engine counts them."""
        from moekit.infer.engine import Engine, EngineConfig
        from moekit.infer.kv_cache import kv_bytes_per_token
        from moekit.infer.sampling import SamplingParams

        tc = self.cfg.train
        rows = [r for group in zip(*self.data.val.values()) for r in group][:tc.distill_eval_prompts]
        prefix = max(1, min(64, tc.seq_len // 2))
        target, draft = self._served_teacher(), copy.deepcopy(self.model).eval()
        draft = draft.to(next(target.parameters()).dtype)
        new = max(1, min(32, min(target.cfg.max_seq_len, draft.cfg.max_seq_len) - prefix - tc.distill_eval_k - 1))
        budget = len(rows) * 2 * (prefix + new + 64) * kv_bytes_per_token(target.cfg, torch.float32)
        cfg = EngineConfig(kv_budget=str(budget), max_num_seqs=len(rows), num_speculative_tokens=tc.distill_eval_k,
                           speculative_max_batch=len(rows), cuda_graphs=False)
        engine = Engine(target, None, cfg, draft=draft)
        engine.generate([r[:prefix].tolist() for r in rows],
                        SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        st = engine.spec.stats
        return {"spec/draft_acceptance": st.acceptance_rate, "spec/draft_tokens_per_step": st.mean_accepted_length}

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, logger: MetricsLogger, progress: bool = True, started: float | None = None) -> None:
        """Train to the last step, or stop early with a checkpoint (self.stopped says why): on
        SIGTERM or Ctrl-C, or before a step that could end past tc.time_limit seconds from `started`."""
        tc = self.cfg.train
        bar = tqdm(total=tc.steps, initial=self.step, disable=not progress, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        if self.step == 0:
            logger.log(0, self.evaluate())
        with StopRequests(tc.time_limit, started) as stop:
            self._loop(logger, bar, stop)
        bar.close()

    def _loop(self, logger: MetricsLogger, bar, stop: StopRequests) -> None:
        tc = self.cfg.train
        while self.step < tc.steps:
            t0 = time.perf_counter()
            tokens = batch_tokens_at(self.step, tc)
            r = self.train_step()
            dt = time.perf_counter() - t0
            rec = {"loss": r.loss, "balance_loss": r.balance, "z_loss": r.z, "grad_norm": r.grad_norm,
                   "lr": lr_at(self.step - 1, tc), "batch_tokens": tokens, "tokens_per_s": tokens / dt,
                   "dropped": r.dropped, "expert_load": r.expert_load}
            if self.teacher is not None:
                rec["distill_kl"] = r.distill_kl
            for i, layer in enumerate(r.expert_load):
                rec[f"expert_load_max/layer{i}"] = max(layer)
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                rec.update(self.evaluate())
            logger.log(self.step, rec)
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tokens / dt:,.0f}", batch=tokens)
            saved = self.step % tc.ckpt_every == 0 or self.step == tc.steps
            if saved:
                t = time.monotonic()
                self.save()
                stop.saved(time.monotonic() - t)
            if stop.due(self.dist, self.device) and self.step < tc.steps:
                if not saved:
                    self.save()
                self.stopped = stop.reason
                return


def train_main(cfg: RunConfig | None, resume: str | None = None, progress: bool = True,
               steps: int | None = None, layout: dict | None = None, time_limit: float | None = None,
               trainer_out: list | None = None) -> Path:
    """Start a run (cfg) or continue one (resume = run or checkpoint folder; steps = a new last step,
    which stretches the LR schedule; time_limit = new seconds for this process). Returns the run
    folder; trainer_out, if given, receives the Trainer (its .stopped says whether it stopped early)."""
    started = time.monotonic()
    tokenizer, ckpt = None, None
    if resume:
        ckpt = ckpt_io.resolve_checkpoint(resume)
        ckpt_io.verify(ckpt)
        cfg = ckpt_io.load_run_config(ckpt)
        if steps is not None:
            cfg.train.steps = steps
        if time_limit is not None:
            cfg.train.time_limit = time_limit
        if layout:  # checkpoints hold full tensors: resume at another --dp / --ep / --tp layout
            # dp x ep ranks read distinct data shards; tp ranks share theirs
            micro = cfg.train.micro_batch * cfg.train.dp * cfg.train.ep
            cfg.train = dataclasses.replace(cfg.train, **layout)
            ranks = cfg.train.dp * cfg.train.ep
            if micro % ranks:
                raise TrainingError(f"the global micro-batch of {micro} sequences does not split over {ranks} "
                                    "data shards (dp x ep)")
            cfg.train.micro_batch = micro // ranks  # same global batch, so the run continues exactly
        cfg.validate()
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
        run_dir = ckpt.parent
    else:
        cfg.validate()
        run_dir = Path(cfg.train.out_dir)
        if ckpt_io.list_checkpoints(run_dir):
            raise TrainingError(f"{run_dir} already holds checkpoints: continue it with "
                                f"--resume {run_dir}, or choose another --out-dir")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if ckpt is None and cfg.train.distill_from:
        from moekit.interop.convert import load_source

        src_cfg, _, tokenizer, _ = load_source(cfg.train.distill_from)  # the draft shares the tokenizer
        if cfg.model.vocab_size != src_cfg.vocab_size:
            cfg.model = dataclasses.replace(cfg.model, vocab_size=src_cfg.vocab_size)
    init_sd = None
    if ckpt is None and cfg.train.init_from:
        from moekit.interop.convert import load_source

        src_cfg, init_sd, tokenizer, _ = load_source(cfg.train.init_from)
        if build_model(src_cfg, "meta").state_dict().keys() != build_model(cfg.model, "meta").state_dict().keys():
            raise TrainingError(f"--init-from {cfg.train.init_from}: its weights do not fit the model config")
    from moekit.parallel.mesh import ParallelDims
    from moekit.parallel.runtime import init_distributed, load_full_state
    from moekit.parallel.tensor_parallel import check_tensor_parallel

    check_tensor_parallel(cfg.model, cfg.train.tp)  # before any process group exists
    ctx = init_distributed(ParallelDims(dp=cfg.train.dp, tp=cfg.train.tp, pp=cfg.train.pp, ep=cfg.train.ep), cfg.train.device)
    try:
        device = ctx.device if ctx is not None else resolve_device(cfg.train.device)
        data = prepare_data(cfg, tokenizer)
        trainer = Trainer(cfg, run_dir, data, device, ctx)
        main = trainer.is_main
        if init_sd is not None:
            load_full_state(trainer.model, None, init_sd, None)
        logger = MetricsLogger(run_dir) if main else NullLogger()
        progress = progress and main
        if ckpt is not None:
            trainer.load(ckpt)
            logger.truncate_after(trainer.step)
            if main:
                print(f"resumed {run_dir} at step {trainer.step}")
        elif main:
            run_dir.mkdir(parents=True, exist_ok=True)
            sizes = ", ".join(f"{k}: {v['train_docs']} docs / {v['train_tokens']:,} tokens" for k, v in data.stats.items())
            n = sum(p.numel() for p in build_model(cfg.model, "meta").parameters())
            where = str(device) if ctx is None else f"{ctx.world} ranks (" + " x ".join(
                f"{k} {getattr(ctx.dims, k)}" for k in ("dp", "ep", "tp") if getattr(ctx.dims, k) > 1) + ")"
            if ctx is not None and ctx.dims.pp > 1:
                where = f"{ctx.world} ranks ({ctx.dims.pp} pipeline stages, {cfg.train.pp_schedule}, dp {ctx.dims.dp})"
            print(f"run {run_dir}: {n / 1e6:.2f}M parameters on {where}; corpus {sizes}")
        if trainer_out is not None:
            trainer_out.append(trainer)
        try:
            trainer.fit(logger, progress, started)
        finally:
            logger.close()
        if trainer.stopped:
            if main:
                print(f"stopped at step {trainer.step} of {cfg.train.steps} ({trainer.stopped}), with a checkpoint; "
                      f"continue with: moekit train --resume {run_dir}")
            return run_dir
        final = trainer.evaluate()  # collective under FSDP: every rank runs it
        if not main:
            return run_dir
        baseline = unigram_entropy(data.mixture.sources, data.tokenizer.vocab_size)
        plots = plot_run(run_dir, baseline)
        print("validation loss: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in final.items() if k.startswith("val/"))
              + f" (unigram entropy of the corpus: {baseline:.3f})")
        if "spec/draft_acceptance" in final:
            print(f"as the teacher's draft (k = {cfg.train.distill_eval_k}, greedy, {cfg.train.distill_eval_prompts} "
                  f"held-out prompts): {final['spec/draft_acceptance']:.1%} of proposals accepted, "
                  f"{final['spec/draft_tokens_per_step']:.2f} tokens per step")
        print("plots: " + ", ".join(str(p) for p in plots))
        if cfg.train.sample_tokens and ctx is None:
            from moekit.infer.generate import sample_text

            text = sample_text(trainer.model, data.tokenizer, cfg.train.sample_prompt, cfg.train.sample_tokens,
                               temperature=0.8, top_k=50, seed=cfg.train.seed)
            print(f"--- sample ---\n{text}\n--------------")
        return run_dir
    finally:
        if ctx is not None and torch.distributed.is_initialized():
            # tear the process group down before exit: gloo aborts when its peers vanish first
            if sys.exc_info()[0] is None:  # after a failure a peer may never reach the barrier
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
