"""``segllm train``: a recipe run with accelerate (one CPU, one GPU or several processes).

Data positions are global: optimizer step s consumes training items
[s * G, (s + 1) * G) with G = processes x batch size x accumulation, each process taking its own
slice. A checkpoint therefore records where the data stream stands, and a run resumes (on
any number of processes) exactly where it stopped. Randomness (feature dropout) is seeded
from (seed, step, rank), so nothing else needs saving.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from segllm.checkpoint import CONFIG_NAME, WEIGHTS_NAME, usual_permissions
from segllm.config import from_dict
from segllm.data.check import DataCheck, DataMissingError, check_mix
from segllm.data.mix import MixedConversations
from segllm.data.records import ConversationFolder, WorldConversations
from segllm.data.released.convert import ReleasedConversations
from segllm.data.world import WorldConfig
from segllm.decoders.hipie import HipieDecoderConfig
from segllm.errors import CheckpointError, ConfigError, SegLLMError
from segllm.eval.evaluate import evaluate, evaluate_baseline
from segllm.model.builder import build_segllm
from segllm.model.llava import segllm_from_llava15
from segllm.model.loading import load_pretrained, load_with_decoder_changes
from segllm.precision import warn_if_slow_bfloat16
from segllm.tokenizer import train_bpe_tokenizer
from segllm.train import fsdp
from segllm.train.objective import training_loss
from segllm.train.recipe import TRACKERS, TrainRecipe
from segllm.train.state import load_optimizer, read_optimizer_state, save_optimizer, save_optimizer_state

log = logging.getLogger(__name__)

LAST = "checkpoint-last"


@dataclass
class TrainSummary:
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    skipped: int = 0
    output_dir: str = ""


def check_data(recipe: TrainRecipe) -> DataCheck | None:
    """The data check of a recipe's released conversation files (see :mod:`segllm.data.check`):
    the files, the image sets and the annotations their records use; None when the recipe reads
    none (world data, dataset folders)."""
    d = recipe.data
    sources = d.train_sources()
    train = [s for s in sources if s.endswith(".json")]
    val = d.val if d.val.endswith(".json") else None
    if not train and val is None:
        return None
    if d.images is None or d.annotations is None:
        raise ValueError(f"data source {(train or [val])[0]} is a released conversation file: set data.images and data.annotations")
    return check_mix("of this recipe", train, val, d.images, d.annotations, overrides=d.annotation_overrides())


def build_datasets(recipe: TrainRecipe, *, processes: int = 1):
    """(train, val) datasets of the recipe; ``processes`` sizes the global batch of a mix.

    Released conversation files are checked first (:func:`check_data`): missing files, image
    sets or annotations raise :class:`DataMissingError` listing them, before anything is read.
    """
    d = recipe.data
    check = check_data(recipe)
    if check is not None and not check.runnable:
        raise DataMissingError(check)
    overrides = d.annotation_overrides()

    def make(source: str, split: str, size: int):
        if source == "world":
            return WorldConversations(split, size, seed=d.seed, config=WorldConfig.from_dict(d.world), max_rounds=d.max_rounds)
        if source.endswith(".json"):
            # validation reads the evaluation annotations (path_eval), as the original's evaluation does
            return ReleasedConversations(source, d.images, d.annotations, max_rounds=d.max_rounds, overrides=overrides,
                                         is_eval=split == "val")
        return ConversationFolder(source, max_rounds=d.max_rounds)

    sources = d.train_sources()
    if d.mix or d.conversation_config:
        global_batch = recipe.batch_size * processes * recipe.grad_accum
        train_set = MixedConversations([make(s, "train", d.train_size) for s in sources], global_batch=global_batch, seed=d.seed)
    else:
        train_set = make(d.train, "train", d.train_size)
    return train_set, make(d.val, "val", d.val_size)


def build_tokenizer(recipe: TrainRecipe, train_set):
    t = recipe.tokenizer
    if t.path:
        return AutoTokenizer.from_pretrained(t.path, local_files_only=True)
    texts = []
    for i in range(min(t.corpus_conversations, len(train_set))):
        conv = train_set.get(i)
        if conv is not None:
            texts += [r.question for r in conv.rounds] + [r.answer for r in conv.rounds]
    return train_bpe_tokenizer(texts, vocab_size=t.vocab_size)


def lr_lambda(recipe: TrainRecipe, elapsed=None):
    """The learning-rate factor at an optimizer step: linear warm-up over ``warmup_steps``, then
    a cosine decay to ``min_lr_ratio``, over the remaining steps or, with a time budget
    (``recipe.time_limit_s``), over the elapsed share of it (``elapsed()``: seconds so far)."""
    o = recipe.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if recipe.time_limit_s and elapsed is not None:
            progress = min(1.0, elapsed() / recipe.time_limit_s)
        else:
            progress = min(1.0, (step - o.warmup_steps) / max(1, recipe.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of one process from a run's (re)start, in order, for a DataLoader.

    Item j is micro-step ``j % accum`` of optimizer step ``j // accum`` after the start; it holds
    the conversations at the global data positions that process owns (see the module
    docstring): ``(number of conversations, Batch or None when all were unusable, the records
    skipped while building it)``. The skips travel with the item because a data-loader worker
    counts them in its own copy of the dataset.
    """

    def __init__(self, data, prepare, *, start: int, batch_size: int, processes: int, rank: int, accum: int, count: int) -> None:
        self.data, self.prepare = data, prepare
        self.start, self.batch_size, self.processes, self.rank, self.accum, self.count = start, batch_size, processes, rank, accum, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int):
        step, micro = divmod(j, self.accum)
        base = self.start + step * self.processes * self.batch_size * self.accum + (micro * self.processes + self.rank) * self.batch_size
        before = len(self.data.skipped)
        convs = [c for i in range(base, base + self.batch_size) if (c := self.data.get(i % len(self.data))) is not None]
        return len(convs), (self.prepare(convs) if convs else None), self.data.skipped.items[before:]


def _keep(item):
    return item


def train(recipe: TrainRecipe, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> TrainSummary:
    """Run a recipe; returns the losses and evaluations of this run (main process).

    Args:
        resume: continue from ``output_dir/checkpoint-last`` (or, after a save interrupted between
            its renames, from the newest complete checkpoint it left; see :func:`_recover_last`).
            Raises :class:`CheckpointError` naming the folder where there is none.
        progress: show a progress bar.
        stop_after: stop (with a checkpoint) once this step is reached, as if interrupted; the
            schedule stays that of ``recipe.steps``, so ``resume`` continues the same run.
    """
    run = _Run(recipe, resume=resume, progress=progress, stop_after=stop_after)
    while run.step < run.end and not run.timed_out:
        terms = run.train_step()
        run.log(terms)
        r = run.recipe
        if r.eval_every and (run.step % r.eval_every == 0 or run.step == r.steps or run.timed_out):
            run.evaluate()
        if (r.save_every and (run.step % r.save_every == 0 or run.step == r.steps)) or run.step == run.end or run.timed_out:
            run.save()
    return run.finish()


def _start_model(recipe: TrainRecipe, train_set, last: Path, resume: bool):
    """The model a run starts from and where it stands: (model, step, samples seen, history).

    Resuming: checkpoint-last's model and trainer state. Otherwise, in order of precedence: a
    LLaVA-1.5 folder (``model.llava``), a checkpoint (``model.init``) or a model built from the
    recipe (with a tokenizer trained on the data where the recipe names none); then the recipe's
    memory switch, loss overrides and context length.
    """
    if resume and (last / "trainer_state.json").is_file():
        state = json.loads((last / "trainer_state.json").read_text())
        return load_pretrained(last / "model"), state["step"], state["samples_seen"], state.get("history", {"evals": []})
    if resume:
        raise CheckpointError(f"--resume: no checkpoint to resume from in {last.parent} (no complete {LAST} folder there)")
    if recipe.model.llava.path:
        li = recipe.model.llava
        hipie = from_dict(HipieDecoderConfig, li.hipie)
        model = segllm_from_llava15(li.path, vision_tower=li.vision_tower, hipie=hipie, hipie_weights=li.hipie_weights, seed=recipe.seed)
    elif recipe.model.init and recipe.model.decoder:
        model = load_with_decoder_changes(recipe.model.init, recipe.model.decoder)
    elif recipe.model.init:
        model = load_pretrained(recipe.model.init)
        if recipe.model.lora.r and not model.config.llm.lora.r:
            model.add_lora(recipe.model.lora)
    else:
        tokenizer = build_tokenizer(recipe, train_set)
        torch.manual_seed(recipe.seed)
        model = build_segllm(recipe.model_config(len(tokenizer)), tokenizer)
    model.config.memory.enabled = recipe.model.memory
    if recipe.model.trainable:
        model.config.trainable = recipe.model.trainable
    if recipe.model.loss:  # also for a model started from a checkpoint (model.init)
        model.config.loss = recipe.model_loss(model.config.loss)
    if recipe.model.max_length:
        model.config.template.max_length = model.processor.max_length = recipe.model.max_length
    return model, 0, 0, {"evals": []}


class _PendingTerms:
    """A step's loss terms (0-dim tensors on the training device) on their way to the host.

    On a CUDA device they are stacked into one tensor and copied into page-locked host memory
    without waiting (an event marks the copy's end), so the host can queue the next step while
    the device still works on this one; :meth:`read` waits for that copy alone, not for work
    queued after it. Elsewhere the values are read when asked.
    """

    def __init__(self, terms: dict[str, Tensor]) -> None:
        self.names = list(terms)
        values = torch.stack(list(terms.values())) if terms else torch.zeros(0)
        self.event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            values = host
        self.values = values

    def read(self) -> dict[str, float]:
        """Each term's value (waits for the copy on CUDA)."""
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.names, self.values.tolist()))


def _data_start(recipe: TrainRecipe, last: Path, resume: bool) -> int:
    """The training position the run began at (``data.start``): a resumed run keeps the one its
    checkpoint was made with, so that it continues the same stream of conversations even where
    the command line that resumes it says otherwise."""
    start = recipe.data.start
    state = last / "trainer_state.json"
    if resume and state.is_file():
        saved = json.loads(state.read_text()).get("recipe", {}).get("data", {}).get("start", 0)
        if saved != start:
            log.warning("resuming: data.start stays %d, the run's own (the recipe says %d)", saved, start)
        start = saved
    return start


def _part_groups(core) -> list[list[torch.nn.Parameter]]:
    """Each trainable part's parameters, once each (tied weights in the first part that has
    them): the groups that per-part clipping clips separately."""
    seen_ids: set[int] = set()
    groups = []
    for group in core.part_parameters().values():
        mine = [p for p in group if p.requires_grad and id(p) not in seen_ids]
        seen_ids.update(id(p) for p in mine)
        if mine:
            groups.append(mine)
    return groups


class _Run:
    """One training run: set up once (:meth:`__init__`), then :meth:`train_step`, :meth:`log`,
    :meth:`evaluate` and :meth:`save` in turn, and :meth:`finish`."""

    def __init__(self, recipe: TrainRecipe, *, resume: bool, progress: bool, stop_after: int | None) -> None:
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        check_trackers(recipe.log_with)  # before anything is built: a missing package is a message, at once
        if recipe.mixed_precision == "bf16" and not torch.cuda.is_available():
            warn_if_slow_bfloat16("cpu", 'mixed_precision = "bf16"', "autocast runs emulated, many times slower than "
                                  'float32 (a step of configs/direct_refine.toml: 9x in session 30); mixed_precision = "no" is faster')
        self.acc = acc = Accelerator(
            # accelerate treats several CPU processes as distributed (gloo) only when told it runs on CPU
            cpu=not torch.cuda.is_available(),
            mixed_precision=recipe.mixed_precision,
            gradient_accumulation_steps=recipe.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=list(recipe.log_with) or None,
            project_dir=str(Path(recipe.output_dir) / "trackers") if recipe.log_with else None,
        )
        self.out = out = Path(recipe.output_dir)
        last = out / LAST
        if resume:
            # every process must see the same folder: the main one repairs an interrupted save first
            if acc.is_main_process:
                _recover_last(out)
            acc.wait_for_everyone()
        self.train_set, self.val_set = build_datasets(recipe, processes=acc.num_processes)
        self.recipe = recipe = recipe.resolved(getattr(self.train_set, "epoch_size", None) or len(self.train_set), acc.num_processes)
        # a resumed run keeps its own data.start, also in the checkpoints it writes from here on
        recipe.data.start = _data_start(recipe, last, resume)
        model, start_step, self.samples_seen, self.history = _start_model(recipe, self.train_set, last, resume)
        if start_step and acc.is_main_process:
            log.info("resuming from %s at step %d", last, start_step)
        model.set_trainable()
        model.train()
        if recipe.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.per_step = acc.num_processes * recipe.batch_size * recipe.grad_accum
        self.end = min(recipe.steps, stop_after) if stop_after is not None else recipe.steps
        micro_batches = MicroBatches(
            self.train_set, model.prepare, start=recipe.data.start + self.samples_seen, batch_size=recipe.batch_size, processes=acc.num_processes,
            rank=acc.process_index, accum=recipe.grad_accum, count=max(0, self.end - start_step) * recipe.grad_accum,
        )
        # on a CUDA device the batches arrive in page-locked memory, so that copying one to the
        # device does not make the host wait for the work queued before it (Batch.pin_memory)
        self.pinned = acc.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            micro_batches, batch_size=None, collate_fn=_keep, num_workers=recipe.workers,
            prefetch_factor=4 if recipe.workers else None, pin_memory=self.pinned,
        )
        # started now, while the model is still on the CPU: the workers fork with a CPU copy of the
        # preprocessing it does (and never touch the training device)
        self.batches = iter(loader)
        self.sharded = sharded = recipe.parallel == "fsdp" and acc.num_processes > 1
        # DeepSpeed comes from `accelerate launch --config_file` (configs/accelerate/deepspeed_zero2.yaml)
        self.deepspeed = deepspeed = acc.state.deepspeed_plugin is not None
        if deepspeed and sharded:
            raise ValueError("parallel = 'fsdp' and a DeepSpeed launch exclude each other: choose one")
        if sharded:
            fsdp.shard(model.to(acc.device), acc.device.type)
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = recipe.optim
        opt = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        if start_step:
            if sharded:
                fsdp.load_full_optimizer_state(model, opt, read_optimizer_state(last / "optimizer.safetensors"))
            elif not deepspeed:  # DeepSpeed's optimizer state is loaded once it wraps the optimizer
                load_optimizer(opt, last / "optimizer.safetensors")
        self.t_start = time.time() - self.history.get("elapsed_s", 0.0)  # a resumed run continues its time budget
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe, self.elapsed), last_epoch=start_step - 1)
        if deepspeed:
            # our batches do not pass through accelerate, so DeepSpeed learns their size here; the
            # recipe's clipping replaces DeepSpeed's default (1.0)
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = recipe.batch_size
            ds_config["gradient_clipping"] = o.grad_clip
        if not sharded:  # FSDP shards above; accelerate would wrap the model in DDP
            model, opt = acc.prepare(model, opt)
        if deepspeed and start_step:
            acc.load_state(str(last / "deepspeed"))
        self.model, self.opt = model, opt
        self.core = acc.unwrap_model(model)
        self.summary = TrainSummary(start_step, output_dir=str(out), evals=list(self.history["evals"]))
        self.bar = tqdm(total=recipe.steps, initial=start_step, disable=not (progress and acc.is_main_process), unit="step", desc="train")
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        if recipe.log_with:
            # one tracker run per output folder; hyperparameters as flat scalars/strings (what every tracker takes)
            acc.init_trackers(out.name or "segllm", config=_flat(recipe.to_dict()))
        self.t0, self.seen0 = time.time(), 0
        # seconds the loop has waited for its next batch, and where the last log line left it:
        # the share of each logged interval spent waiting says whether the batch builders (near 1)
        # or the model's steps (near 0) set the pace, on a GPU too, where the host runs ahead
        self.data_wait_s = 0.0
        self._logged_at = (self.t0, 0.0)
        self.step = start_step
        self.grad_norms: dict[str, float] = {}
        self.part_groups = _part_groups(self.core)
        self.timed_out = False
        self._pending: tuple | None = None  # the last step's loss terms, not yet read (see log)

    def elapsed(self) -> float:
        """Seconds of training so far, resumed runs included (the time budget's clock)."""
        return time.time() - self.t_start

    def train_step(self) -> _PendingTerms:
        """One optimizer step over ``grad_accum`` micro-batches; returns each loss term's mean,
        still on the training device until read (:class:`_PendingTerms`)."""
        r, acc, o = self.recipe, self.acc, self.recipe.optim
        terms: dict[str, Tensor] = {}
        for micro in range(r.grad_accum):
            asked = time.perf_counter()
            n_convs, batch, skips = next(self.batches)
            self.data_wait_s += time.perf_counter() - asked
            if r.workers:  # counted in a worker's copy of the dataset
                self.train_set.skipped.items.extend(skips)
            torch.manual_seed(r.seed * 1_000_003 + self.step * 1009 + acc.process_index * 31 + micro)
            if batch is None:
                continue
            batch = batch.to(acc.device, non_blocking=self.pinned)
            with acc.accumulate(self.model):
                res = self.model(batch, objective=training_loss)
                acc.backward(res.loss)
                if acc.sync_gradients:
                    if self.step % r.log_every == r.log_every - 1 and not self.sharded and not self.deepspeed:
                        self.grad_norms = part_grad_norms(self.core)  # before clipping: what each part receives
                    if o.grad_clip > 0 and o.clip_mode == "per_part" and not self.deepspeed:
                        for group in self.part_groups:
                            acc.clip_grad_norm_(group, o.grad_clip)
                    elif o.grad_clip > 0:
                        acc.clip_grad_norm_(self.params, o.grad_clip)
                self.opt.step()
                self.opt.zero_grad()
            parts = {name: getattr(res, name) for name in ("loss", "lm_loss", "mask_loss", "dice_loss", "ref_loss", "iou_loss", "box_loss", "dense_loss", "select_loss")}
            parts = {k: v for k, v in parts.items() if v is not None}
            parts |= {f"set_{k}": v for k, v in (res.set_terms or {}).items()}  # HIPIE's set-prediction terms
            for name, value in parts.items():
                # kept on the device: reading a value back here would make the host wait for the
                # accelerator at every step (see _PendingTerms)
                value = value.detach().float() / r.grad_accum
                terms[name] = terms[name] + value if name in terms else value
            self.seen0 += n_convs
        self.sched.step()
        self.samples_seen += self.per_step
        self.step += 1
        self.history["elapsed_s"] = self.elapsed()
        if r.time_limit_s:
            timed_out = self.elapsed() >= r.time_limit_s
            if acc.num_processes > 1:
                # every process must stop at the same step: the main process's clock decides
                flag = torch.tensor([float(timed_out)], device=acc.device)
                timed_out = bool(acc.reduce(flag, reduction="max").item())
            self.timed_out = timed_out
        return _PendingTerms(terms)

    def log(self, terms: _PendingTerms) -> None:
        """Record a step's loss terms. They are read one step late: the previous step's are
        written now, while this step's work may still run on the accelerator, so that the host
        goes on to the next batch instead of waiting for it (:meth:`flush` writes the last one
        before a validation, a checkpoint or the end of the run)."""
        previous = self._pending
        # when the step ended and how long the loop had waited for batches by then
        self._pending = (self.step, self.timed_out, self.sched.get_last_lr()[0], self.grad_norms, terms, time.time(), self.data_wait_s)
        if previous is not None:
            self._write_log(*previous)

    def flush(self) -> None:
        """Write the loss terms of the last step, if not yet written (waits for them)."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._write_log(*previous)

    def _write_log(self, step: int, timed_out: bool, lr: float, grad_norms: dict[str, float], pending: _PendingTerms,
                   ended: float, waited: float) -> None:
        """A step's loss into the summary; every ``log_every`` steps, a line of ``log.jsonl``
        (the terms, learning rate, conversations per second since the run started, the share of
        the wall time since the last line that the loop spent waiting for batches, and each part's
        gradient norm)."""
        terms = pending.read()
        self.summary.losses.append(terms.get("loss", float("nan")))
        if not self.acc.is_main_process:
            return
        self.bar.update(1)
        if step % self.recipe.log_every == 0 or step == self.recipe.steps or timed_out:
            rate = self.seen0 * self.acc.num_processes / max(1e-9, time.time() - self.t0)
            (then, wait_then), self._logged_at = self._logged_at, (ended, waited)
            data_wait_share = min(1.0, (waited - wait_then) / max(1e-9, ended - then))
            self.bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.3f}", conv_s=f"{rate:.1f}")
            entry = {"step": step, "lr": lr, "conv_per_s": rate, "data_wait_share": round(data_wait_share, 4), **terms}
            if grad_norms:
                entry["grad_norm"] = grad_norms
            with (self.out / "log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.recipe.log_with:
                self.acc.log(_flat({k: v for k, v in entry.items() if k != "step"}, prefix="train/"), step=step)

    def evaluate(self) -> None:
        """Oracle-history cIoU per round on the validation slice, into ``eval.jsonl`` and the
        summary; on world data also the grounded rate and the IoU given grounded per round, all
        three per question family, and the question-blind cIoU of the same slice (issue 13's
        diagnostics; ``segllm eval`` gives the same and more on any split)."""
        self.flush()  # the log up to this step first
        acc, core = self.acc, self.core
        if acc.is_main_process or self.sharded:  # sharded: every process takes part in each forward
            with (fsdp.unsharded(core) if self.sharded else contextlib.nullcontext()):
                res_eval = evaluate(core, self.val_set, protocol="oracle", limit=self.recipe.eval_size, batch_size=self.recipe.batch_size)
            rounds = {k: round(v["cIoU"], 2) for k, v in res_eval.metrics.items()}
            entry = {"step": self.step, "oracle_cIoU": rounds}
            per_round = res_eval.diagnostics.get("per_round", {})
            if per_round:  # world data: the share of predictions on the right object, and how well those fit
                entry["oracle_grounded"] = {k: _pct(v["grounded"], 1) for k, v in per_round.items()}
                entry["oracle_iou_given_grounded"] = {k: _pct(v["IoU|grounded"], 1) for k, v in per_round.items()}
                entry["oracle_by_family"] = {f: {"cIoU": _pct(v["cIoU"]), "grounded": _pct(v["grounded"], 1), "iou_given_grounded": _pct(v["IoU|grounded"], 1)}
                                             for f, v in res_eval.diagnostics.get("per_family", {}).items()}
                blind = self.question_blind
                if blind is not None:
                    entry["question_blind_cIoU"] = blind
            if res_eval.multi_target:  # rounds with several targets (world multi_target_prob)
                m = res_eval.multi_target
                entry["oracle_multi_target"] = {"matched_cIoU": round(m["matched cIoU"], 2), "union_cIoU": round(m["union cIoU"], 2)}
            self.summary.evals.append(entry)
            self.history["evals"] = self.summary.evals
            if acc.is_main_process:
                with (self.out / "eval.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                if self.recipe.log_with:
                    self.acc.log(_flat({k: v for k, v in entry.items() if k != "step"}, prefix="val/"), step=self.step)
                self.bar.write(f"step {self.step}: val cIoU per round {rounds}")
        acc.wait_for_everyone()
        core.train()

    @functools.cached_property
    def question_blind(self) -> dict[str, float] | None:
        """cIoU per round of the question-blind answer (every round the union of all objects of
        its image) on the validation slice, computed once per run: what a model that ignores the
        question scores there. None where the data has no object annotations."""
        try:
            res = evaluate_baseline(self.val_set, limit=self.recipe.eval_size)
        except SegLLMError:
            return None
        return {k: _pct(v["cIoU"]) for k, v in res.metrics.items()}

    def save(self) -> None:
        """checkpoint-last, atomically (see :func:`_save`), with the trainer state to resume from."""
        self.flush()  # log.jsonl holds every step the checkpoint has
        state = {"step": self.step, "samples_seen": self.samples_seen, "recipe": self.recipe.to_dict(), "history": self.history, "processes": self.acc.num_processes}
        _save(self.acc, self.core, self.opt, self.out, state, sharded=self.sharded, deepspeed=self.deepspeed)
        if self.recipe.keep_checkpoints and self.acc.is_main_process:
            _keep_numbered(self.out, self.step, self.recipe.keep_checkpoints)

    def finish(self) -> TrainSummary:
        """Close the run; the summary of what it did."""
        self.flush()
        self.bar.close()
        acc = self.acc
        if self.timed_out and acc.is_main_process:
            log.info("time budget of %.0f s spent at step %d", self.recipe.time_limit_s, self.step)
        self.summary.steps = self.step
        self.summary.skipped = len(self.train_set.skipped) + len(self.val_set.skipped)
        if self.summary.skipped and acc.is_main_process:
            log.warning("skipped %d unusable record(s); see the warnings above", self.summary.skipped)
        acc.end_training()
        return self.summary


def part_grad_norms(model) -> dict[str, float]:
    """L2 norm of the current gradient of each model part (``SegLLM.part_parameters``); parts
    without gradients are left out. Logged to show which parts learn (issue 13's diagnosis found
    the vision path receiving ~1e-4 of the decoder's gradient)."""
    out = {}
    for name, group in model.part_parameters().items():
        grads = [p.grad.detach().float() for p in group if p.grad is not None]
        if grads:
            out[name] = round(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))), 6)
    return out


def check_trackers(names: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`ConfigError` naming the package to install for each tracker of ``names``
    (``log_with``) that cannot be imported here (accelerate would drop it with only a log line)."""
    for name in names:
        packages = TRACKERS[name]
        if not any(importlib.util.find_spec(p) is not None for p in packages):
            raise ConfigError(
                f"log_with = {list(names)} asks for {name}, but no {' or '.join(packages)} package is installed: "
                f"pip install {packages[0]} (or pip install 'segllm[{name}]'), or leave {name} out of log_with"
            )


def _pct(x: float, digits: int = 2) -> float | None:
    """A percentage for the logs, rounded; None for NaN (a slice without masks), which JSON lacks."""
    return None if x != x else round(x, digits)


def _flat(data: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """A nested dict as one level of ``a/b`` keys (trackers take scalars and strings, not dicts);
    lists and None become strings."""
    flat: dict[str, float | int | str | bool] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat |= _flat(v, f"{prefix}{k}/")
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


NUMBERED = "checkpoint-"  # numbered copies: checkpoint-<step>
NUMBERED_TMP = ".numbered."  # their temp folders, .numbered.<step>


def numbered_checkpoints(out: Path) -> dict[int, Path]:
    """The numbered checkpoints in ``out``: step -> folder, oldest first."""
    found = {}
    for p in out.glob(NUMBERED + "*"):
        suffix = p.name[len(NUMBERED):]
        if p.is_dir() and suffix.isdigit():
            found[int(suffix)] = p
    return dict(sorted(found.items()))


def _link_or_copy(src: str, dst: str) -> None:
    # hard links cost no space and are safe: a save never rewrites a file in place, it writes a
    # new folder and renames it; a file system without hard links gets a copy
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _keep_numbered(out: Path, step: int, keep: int) -> None:
    """After a save: ``checkpoint-last`` copied to ``checkpoint-<step>`` (through a temp folder
    and one rename, as checkpoint-last is written, so a crash leaves no half folder under that
    name), then the oldest numbered checkpoints beyond the newest ``keep`` deleted."""
    for stale in out.glob(NUMBERED_TMP + "*"):  # left by a crash between copy and rename
        shutil.rmtree(stale, ignore_errors=True)
    tmp, target = out / f"{NUMBERED_TMP}{step}", out / f"{NUMBERED}{step}"
    shutil.copytree(out / LAST, tmp, copy_function=_link_or_copy)
    if target.exists():  # the same step saved again (a resumed run): the newer save wins
        shutil.rmtree(target)
    os.replace(tmp, target)
    numbered = numbered_checkpoints(out)
    for old_step in list(numbered)[: max(0, len(numbered) - keep)]:
        shutil.rmtree(numbered[old_step])


OLD = ".checkpoint-old"  # _save's name for the previous checkpoint-last while the new one is renamed in
TMP_PREFIX = ".ckpt."  # _save's temp folders, .ckpt.<step>


def _complete_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (its trainer_state.json, written last, parses, and
    the model's config and weights are there), else None."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    model = folder / "model"
    if not ((model / CONFIG_NAME).is_file() and (model / WEIGHTS_NAME).is_file()):
        return None
    return step


def _recover_last(out: Path) -> Path | None:
    """Make ``out/checkpoint-last`` the newest complete checkpoint after an interrupted save.

    :func:`_save` writes a temp folder (``.ckpt.<step>``), renames checkpoint-last to
    ``.checkpoint-old`` and the temp folder to checkpoint-last; a run killed between those renames
    leaves no checkpoint-last, only the old one (and the complete new temp folder). The newest
    complete candidate is renamed to checkpoint-last (the same renames as a save, so a crash here
    loses nothing either) and the other temp folders are deleted; returns it, or None where there
    is no complete checkpoint at all.
    """
    last = out / LAST
    candidates = [last, out / OLD, *sorted(out.glob(TMP_PREFIX + "*"))]
    steps = {c: _complete_step(c) for c in candidates if c.is_dir()}
    complete = {c: s for c, s in steps.items() if s is not None}
    if not complete:
        return None
    best = max(complete, key=lambda c: (complete[c], c == last))  # the newest; checkpoint-last on a tie
    _drop_stale_temp(out, keep=best)
    if best != last:
        log.warning("checkpoint-last is missing or older: resuming from %s (step %d), left by an interrupted save", best, complete[best])
        if last.exists():
            old = out / OLD
            if best != old and old.exists():
                shutil.rmtree(old)
            if best == old:  # checkpoint-last is damaged or older: kept aside, never deleted
                stale = out / ".checkpoint-stale"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(last, stale)
            else:
                os.replace(last, old)
        os.replace(best, last)
    return last


def _drop_stale_temp(out: Path, keep: Path) -> None:
    """Delete the temp folders (``.ckpt.<step>``) that saves killed midway left under ``out``, all
    but ``keep``: each is half-written or older than the checkpoint resumed from, and without this
    every interrupted save would leave one behind for good."""
    for tmp in out.glob(TMP_PREFIX + "*"):
        if tmp != keep and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _save(acc, core, opt, out: Path, state: dict, *, sharded: bool = False, deepspeed: bool = False) -> None:
    """Write checkpoint-last atomically: a crash loses at most the steps since the last save.

    Sharded (FSDP) runs gather the full model and optimizer state first (every process takes
    part), so the files are the same as an unsharded run's. DeepSpeed runs keep the optimizer
    state in DeepSpeed's own sharded format (``deepspeed/``, written by every process through
    accelerate); their model folder is the usual one (ZeRO-2 keeps whole parameters everywhere).
    """
    acc.wait_for_everyone()
    model_state = opt_state = None
    if sharded:
        model_state, opt_state = fsdp.full_model_state(core), fsdp.full_optimizer_state(core, opt)
    # a name every process knows, so that all of them can write into it (DeepSpeed)
    tmp = out / f"{TMP_PREFIX}{state['step']}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        if deepspeed:
            acc.save_state(str(tmp / "deepspeed"))
        if acc.is_main_process:
            core.save_pretrained(tmp / "model", extra={"step": state["step"]}, state_dict=model_state)
            if opt_state is not None:
                save_optimizer_state(opt_state, tmp / "optimizer.safetensors")
            elif not deepspeed:
                save_optimizer(opt.optimizer if hasattr(opt, "optimizer") else opt, tmp / "optimizer.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            usual_permissions(tmp)
            old = out / OLD
            if old.exists():
                shutil.rmtree(old)
            if (out / LAST).exists():
                os.replace(out / LAST, old)
            os.replace(tmp, out / LAST)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
