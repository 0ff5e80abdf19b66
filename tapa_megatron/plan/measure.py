"""Measured memory of real training steps on CPU, beside the model's prediction.

Each case builds a TAPA GPT (Megatron-Core, local spec, gloo ranks) in a fresh process forked from a
clean server, preallocates the parameter gradients (as Megatron's grad buffer is), and runs one
forward and backward under `LiveTensorBytes`, a dispatch-mode tracker that sees every tensor storage
an op creates and its release. That counts exact bytes of live tensors, where the process's peak RSS
(also reported) mixes in the allocator's caching, the interpreter and the libraries: the tracker is
the measurement the error is computed on.

    activations  live bytes at the end of forward (everything autograd keeps, plus the loss)
    peak         the highest live bytes during forward + backward, over what was live before
"""

import os
import queue
import resource
import socket
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tapa_megatron.plan.memory import Layout, Step, memory_per_gpu



class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created under the mode and still alive; `peak` is their maximum.

    Storages that existed before (parameters, inputs) count zero. A storage counts once, whatever
    number of views share it, and is uncounted when it is freed. Every storage seen is watched until
    it dies, so a new storage at a freed one's address is told apart from it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = {}  # storage address -> bytes counted for it (0 for storages made outside the mode)

    def _watch(self, tensor, nbytes):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._counted:
            self._counted[key] = nbytes(storage)
            self.live += self._counted[key]
            weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor):
                self._watch(tensor, lambda storage: 0)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._watch(tensor, lambda storage: storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _release(self, key):
        self.live -= self._counted.pop(key)


@dataclass(frozen=True)
class Case:
    attention: str = "torch"  # "torch" (block-wise) or "reference"
    seq_len: int = 2048
    dtype: str = "fp32"
    tp: int = 1
    cp: int = 1
    vocab: int = 2048  # a multiple of 128, so the trainer's padding leaves it as it is

    @property
    def step(self):
        return Step(seq_len=self.seq_len, attention=self.attention, spec="local", sequence_parallel=False,
                    activation_bytes=2 if self.dtype == "bf16" else 4, vocab_size=self.vocab)

    @property
    def layout(self):
        return Layout(tp=self.tp, cp=self.cp)

    def __str__(self):
        layout = "".join(f" {name}{size}" for name, size in (("TP", self.tp), ("CP", self.cp)) if size > 1)
        return f"{self.attention} {self.dtype} S={self.seq_len} V={self.vocab}{layout}"


DEFAULT_CASES = (
    Case("torch", 1024), Case("torch", 2048), Case("torch", 4096), Case("torch", 8192),
    Case("torch", 2048, "bf16"), Case("torch", 8192, "bf16"),
    Case("torch", 1024, vocab=256), Case("torch", 2048, vocab=256),  # the peak moves into the layers' backward
    Case("reference", 256), Case("reference", 512), Case("reference", 1024),
    Case("torch", 4096, cp=2), Case("torch", 1024, cp=2, vocab=256), Case("torch", 4096, tp=2),
)
QUICK_CASES = (Case("torch", 1024, vocab=256), Case("torch", 4096), Case("reference", 512),
               Case("torch", 1024, cp=2, vocab=256))


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_rank(rank, case, port, results):
    """One rank of a case: build the model, run forward + backward under the tracker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (case.tp * case.cp)))
    from megatron.core import parallel_state

    from tapa_megatron.model import ModelConfig, TapaSettings, build_gpt_model, transformer_config
    from tapa_megatron.parallel import layout as cp_layout

    world = case.tp * case.cp
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(case.tp, 1, context_parallel_size=case.cp)
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    model_cfg = ModelConfig(preset="tiny", tapa=TapaSettings(backend=case.attention))
    config = transformer_config(model_cfg, tensor_parallel=case.tp, context_parallel=case.cp, params_dtype=dtype,
                                bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    model = build_gpt_model(model_cfg, config, vocab_size=case.vocab, max_sequence_length=case.seq_len).to(dtype)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    tokens = torch.randint(0, case.vocab, (1, case.seq_len), generator=torch.Generator().manual_seed(1))
    if case.cp > 1:  # this rank's zigzag shard, as the trainer feeds it
        tokens = cp_layout.shard_sequence(tokens, [case.seq_len], case.cp, parallel_state.get_context_parallel_rank())
    rss_before = _rss_bytes()
    tracker = LiveTensorBytes()
    with tracker:
        losses = model(tokens, None, None, labels=tokens)
        activations = tracker.live
        losses.sum().backward()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    results.put((rank, dict(activations=activations, peak=tracker.peak, rss_growth=rss_growth)))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case, context):
    """Measured bytes of rank 0 of a case, every rank in its own process from `context`."""
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_measure_rank, args=(rank, case, port, results))
             for rank in range(case.tp * case.cp)]
    for process in ranks:
        process.start()
    measured = {}
    while len(measured) < len(ranks):
        try:
            rank, values = results.get(timeout=1)
            measured[rank] = values
        except queue.Empty:
            failed = [p.exitcode for p in ranks if p.exitcode not in (None, 0)]
            if failed:
                for process in ranks:
                    process.kill()
                raise RuntimeError(f"measuring {case} failed: a rank exited with code {failed[0]} (its traceback "
                                   "is above)") from None
    for process in ranks:
        process.join()
    return measured[0]


@dataclass
class Comparison:
    case: str
    predicted_activations: float
    measured_activations: float
    predicted_peak: float
    measured_peak: float
    rss_growth: float

    @property
    def activation_error(self):
        return self.predicted_activations / self.measured_activations - 1

    @property
    def peak_error(self):
        return self.predicted_peak / self.measured_peak - 1


def predict(case):
    """(activations, peak) bytes the model predicts for rank 0 of a case (peak: over the state before the step)."""
    from tapa_megatron.model import ModelConfig

    memory = memory_per_gpu(ModelConfig(preset="tiny"), case.layout, case.step)
    return memory.activations, memory.activations + memory.workspace


def validate(cases=DEFAULT_CASES):
    """Measure every case (forked from a server that imports the model code once) and compare."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tapa_megatron.model", "tapa_megatron.plan.measure"])
    rows = []
    for case in cases:
        measured = measure(case, context)
        activations, peak = predict(case)
        rows.append(Comparison(str(case), activations, measured["activations"], peak, measured["peak"],
                               measured["rss_growth"]))
    return rows


def format_comparisons(rows):
    mib = 2**20
    header = ("case (tiny preset, 1 sequence)", "activations pred MiB", "meas MiB", "error", "peak pred MiB",
              "meas MiB", "error", "RSS growth MiB")
    lines = [header] + [(r.case, f"{r.predicted_activations / mib:.2f}", f"{r.measured_activations / mib:.2f}",
                         f"{r.activation_error:+.2%}", f"{r.predicted_peak / mib:.2f}", f"{r.measured_peak / mib:.2f}",
                         f"{r.peak_error:+.2%}", f"{r.rss_growth / mib:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def as_dicts(rows):
    return [dict(asdict(r), activation_error=r.activation_error, peak_error=r.peak_error) for r in rows]
